//! The registry's SQL, and nothing else does SQL.

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use fieldline_common::{ApiError, auth::ScopeLevel, time::format_rfc3339};
use tokio_postgres::{Row, error::SqlState};

use crate::domain::{DeviceOut, KeyOut, NewDevice, NewKey, ProjectOut, rfc3339_opt, scopes_of};

#[derive(Clone)]
pub struct Repo {
    pool: Pool,
}

/// A stored credential, as the auth RPC needs it.
pub enum Credential {
    ApiKey {
        id: String,
        project: String,
        scope: ScopeLevel,
        platform_admin: bool,
        expires_at: Option<DateTime<Utc>>,
        revoked: bool,
    },
    Device {
        id: String,
        project: String,
    },
}

fn scope_from_db(value: &str) -> ScopeLevel {
    match value {
        "admin" => ScopeLevel::Admin,
        "write" => ScopeLevel::Write,
        _ => ScopeLevel::Read,
    }
}

fn key_out(row: &Row) -> KeyOut {
    KeyOut {
        id: row.get("id"),
        name: row.get("name"),
        prefix: row.get("secret_prefix"),
        scopes: scopes_of(scope_from_db(row.get("scope"))),
        platform_admin: row.get("platform_admin"),
        created_at: format_rfc3339(&row.get("created_at")),
        expires_at: rfc3339_opt(row.get("expires_at")),
        revoked_at: rfc3339_opt(row.get("revoked_at")),
        last_used_at: rfc3339_opt(row.get("last_used_at")),
    }
}

fn device_out(row: &Row) -> DeviceOut {
    DeviceOut {
        id: row.get("id"),
        project: row.get("project"),
        name: row.get("name"),
        device_type: row.get("device_type"),
        group: row.get("device_group"),
        tags: row.get("tags"),
        metadata: row.get("metadata"),
        heartbeat_interval_s: row.get("heartbeat_interval_s"),
        created_at: format_rfc3339(&row.get("created_at")),
        updated_at: format_rfc3339(&row.get("updated_at")),
    }
}

const DEVICE_COLUMNS: &str = "project, id, name, device_type, device_group, tags, metadata, \
                              heartbeat_interval_s, created_at, updated_at";
const KEY_COLUMNS: &str = "id, name, secret_prefix, scope, platform_admin, created_at, \
                           expires_at, revoked_at, last_used_at";

/// Filters and keyset position of a device listing.
pub struct DeviceFilter<'a> {
    pub device_type: Option<&'a str>,
    pub after_id: Option<&'a str>,
    pub limit: i64,
}

impl Repo {
    pub fn new(pool: Pool) -> Self {
        Self { pool }
    }

    /// On an empty registry, creates project `default` and the platform admin key. Returns
    /// true when it did. Concurrent starts are serialized by an advisory lock.
    pub async fn bootstrap(
        &self,
        admin_secret_hash: &[u8],
        admin_secret_prefix: &str,
        key_id: &str,
    ) -> anyhow::Result<bool> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtext('fieldline-registry-bootstrap'))",
            &[],
        )
        .await?;
        let existing: i64 = tx
            .query_one("SELECT count(*) FROM registry.projects", &[])
            .await?
            .get(0);
        if existing > 0 {
            return Ok(false);
        }
        tx.execute(
            "INSERT INTO registry.projects (slug, name) VALUES ('default', 'Default project')",
            &[],
        )
        .await?;
        tx.execute(
            "INSERT INTO registry.api_keys (id, project, name, secret_hash, secret_prefix, scope, platform_admin)
             VALUES ($1, 'default', 'platform admin (bootstrap)', $2, $3, 'admin', true)",
            &[&key_id, &admin_secret_hash, &admin_secret_prefix],
        )
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Looks a secret's hash up among API keys and device tokens.
    pub async fn find_credential(
        &self,
        secret_hash: &[u8],
        is_device_token: bool,
    ) -> Result<Option<Credential>, ApiError> {
        let client = self.pool.get().await?;
        if is_device_token {
            let row = client
                .query_opt(
                    "SELECT project, id FROM registry.devices WHERE token_hash = $1",
                    &[&secret_hash],
                )
                .await?;
            return Ok(row.map(|row| Credential::Device {
                project: row.get(0),
                id: row.get(1),
            }));
        }
        let row = client
            .query_opt(
                "SELECT id, project, scope, platform_admin, expires_at, revoked_at IS NOT NULL
                 FROM registry.api_keys WHERE secret_hash = $1",
                &[&secret_hash],
            )
            .await?;
        Ok(row.map(|row| Credential::ApiKey {
            id: row.get(0),
            project: row.get(1),
            scope: scope_from_db(row.get(2)),
            platform_admin: row.get(3),
            expires_at: row.get(4),
            revoked: row.get(5),
        }))
    }

    /// Records that a key was used; at most one write a minute per key.
    pub async fn touch_key(&self, key_id: &str) -> Result<(), ApiError> {
        let client = self.pool.get().await?;
        client
            .execute(
                "UPDATE registry.api_keys SET last_used_at = now()
                 WHERE id = $1 AND (last_used_at IS NULL OR last_used_at < now() - interval '1 minute')",
                &[&key_id],
            )
            .await?;
        Ok(())
    }

    pub async fn create_key(
        &self,
        project: &str,
        key_id: &str,
        key: &NewKey,
        secret_hash: &[u8],
        secret_prefix: &str,
    ) -> Result<KeyOut, ApiError> {
        let client = self.pool.get().await?;
        let row = client
            .query_one(
                &format!(
                    "INSERT INTO registry.api_keys (id, project, name, secret_hash, secret_prefix, scope, expires_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING {KEY_COLUMNS}"
                ),
                &[&key_id, &project, &key.name, &secret_hash, &secret_prefix, &key.scope.as_str(), &key.expires_at],
            )
            .await?;
        Ok(key_out(&row))
    }

    pub async fn list_keys(
        &self,
        project: &str,
        after: Option<(DateTime<Utc>, String)>,
        limit: i64,
    ) -> Result<Vec<(KeyOut, DateTime<Utc>)>, ApiError> {
        let client = self.pool.get().await?;
        let (after_time, after_id) = after.unzip();
        let rows = client
            .query(
                &format!(
                    "SELECT {KEY_COLUMNS} FROM registry.api_keys
                     WHERE project = $1
                       AND ($2::timestamptz IS NULL OR (created_at, id) < ($2, $3))
                     ORDER BY created_at DESC, id DESC LIMIT $4"
                ),
                &[&project, &after_time, &after_id, &limit],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|row| (key_out(row), row.get("created_at")))
            .collect())
    }

    /// Revokes a key of `project`; false when there is no such key there.
    pub async fn revoke_key(&self, project: &str, key_id: &str) -> Result<bool, ApiError> {
        let client = self.pool.get().await?;
        let updated = client
            .execute(
                "UPDATE registry.api_keys SET revoked_at = coalesce(revoked_at, now())
                 WHERE project = $1 AND id = $2",
                &[&project, &key_id],
            )
            .await?;
        Ok(updated == 1)
    }

    /// Inserts a device; `None` when the id already exists in the project.
    pub async fn create_device(
        &self,
        project: &str,
        device: &NewDevice,
        token_hash: &[u8],
    ) -> Result<Option<DeviceOut>, ApiError> {
        let client = self.pool.get().await?;
        let result = client
            .query_one(
                &format!(
                    "INSERT INTO registry.devices
                       (project, id, name, device_type, device_group, tags, metadata, heartbeat_interval_s, token_hash)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING {DEVICE_COLUMNS}"
                ),
                &[
                    &project,
                    &device.id.as_str(),
                    &device.name,
                    &device.device_type.as_str(),
                    &device.group,
                    &device.tags,
                    &device.metadata,
                    &device.heartbeat_interval_s,
                    &token_hash,
                ],
            )
            .await;
        match result {
            Ok(row) => Ok(Some(device_out(&row))),
            Err(error) if error.code() == Some(&SqlState::UNIQUE_VIOLATION) => Ok(None),
            Err(error) => Err(error.into()),
        }
    }

    pub async fn get_device(
        &self,
        project: &str,
        device_id: &str,
    ) -> Result<Option<DeviceOut>, ApiError> {
        let client = self.pool.get().await?;
        let row = client
            .query_opt(
                &format!(
                    "SELECT {DEVICE_COLUMNS} FROM registry.devices WHERE project = $1 AND id = $2"
                ),
                &[&project, &device_id],
            )
            .await?;
        Ok(row.as_ref().map(device_out))
    }

    pub async fn list_devices(
        &self,
        project: &str,
        filter: &DeviceFilter<'_>,
    ) -> Result<Vec<DeviceOut>, ApiError> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {DEVICE_COLUMNS} FROM registry.devices
                     WHERE project = $1
                       AND ($2::text IS NULL OR device_type = $2)
                       AND ($3::text IS NULL OR id > $3)
                     ORDER BY id LIMIT $4"
                ),
                &[
                    &project,
                    &filter.device_type,
                    &filter.after_id,
                    &filter.limit,
                ],
            )
            .await?;
        Ok(rows.iter().map(device_out).collect())
    }

    /// Creates a project and its first admin key in one transaction; `None` when the slug
    /// is taken.
    pub async fn create_project(
        &self,
        slug: &str,
        name: &str,
        key_id: &str,
        secret_hash: &[u8],
        secret_prefix: &str,
    ) -> Result<Option<(ProjectOut, KeyOut)>, ApiError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let inserted = tx
            .query_opt(
                "INSERT INTO registry.projects (slug, name) VALUES ($1, $2)
                 ON CONFLICT (slug) DO NOTHING RETURNING slug, name, created_at",
                &[&slug, &name],
            )
            .await?;
        let Some(project) = inserted else {
            return Ok(None);
        };
        let key = tx
            .query_one(
                &format!(
                    "INSERT INTO registry.api_keys (id, project, name, secret_hash, secret_prefix, scope)
                     VALUES ($1, $2, 'project admin (first key)', $3, $4, 'admin') RETURNING {KEY_COLUMNS}"
                ),
                &[&key_id, &slug, &secret_hash, &secret_prefix],
            )
            .await?;
        tx.commit().await?;
        let project = ProjectOut {
            slug: project.get(0),
            name: project.get(1),
            created_at: format_rfc3339(&project.get(2)),
        };
        Ok(Some((project, key_out(&key))))
    }

    pub async fn list_projects(&self) -> Result<Vec<ProjectOut>, ApiError> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT slug, name, created_at FROM registry.projects ORDER BY slug",
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|row| ProjectOut {
                slug: row.get(0),
                name: row.get(1),
                created_at: format_rfc3339(&row.get(2)),
            })
            .collect())
    }

    /// Type and group of a device, for the device lookup RPC.
    pub async fn device_summary(
        &self,
        project: &str,
        device_id: &str,
    ) -> Result<Option<(String, Option<String>)>, ApiError> {
        let client = self.pool.get().await?;
        let row = client
            .query_opt(
                "SELECT device_type, device_group FROM registry.devices WHERE project = $1 AND id = $2",
                &[&project, &device_id],
            )
            .await?;
        Ok(row.map(|row| (row.get(0), row.get(1))))
    }
}
