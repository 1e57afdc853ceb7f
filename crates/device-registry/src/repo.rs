//! The registry's SQL, and nothing else does SQL.

mod alerts;
pub mod commands;
mod limits;
pub mod state;

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use fieldline_common::{ApiError, auth::ScopeLevel, time::format_rfc3339};
use tokio_postgres::{Row, error::SqlState};

pub use self::{
    alerts::{FiringAlert, FiringFilter, RuleFilter},
    commands::CommandFilter,
    state::SeenDevice,
};
use crate::{
    domain::{DeviceOut, KeyOut, NewDevice, NewKey, ProjectOut, rfc3339_opt, scopes_of},
    outbox::{EventKind, Messages, OutboxMessage},
};

#[derive(Clone)]
pub struct Repo {
    pool: Pool,
    messages: Messages,
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
        status: row.get("status"),
        last_seen: rfc3339_opt(row.get("last_seen")),
        config_version: row.get("config_version"),
        created_at: format_rfc3339(&row.get("created_at")),
        updated_at: format_rfc3339(&row.get("updated_at")),
    }
}

const DEVICE_COLUMNS: &str = "project, id, name, device_type, device_group, tags, metadata, \
                              heartbeat_interval_s, status, last_seen, config_version, \
                              created_at, updated_at";
const KEY_COLUMNS: &str = "id, name, secret_prefix, scope, platform_admin, created_at, \
                           expires_at, revoked_at, last_used_at";

/// Filters and keyset position of a device listing.
pub struct DeviceFilter<'a> {
    pub device_type: Option<&'a str>,
    pub status: Option<&'a str>,
    pub group: Option<&'a str>,
    pub tag: Option<&'a str>,
    pub after_id: Option<&'a str>,
    pub limit: i64,
}

/// A device and the seed of its token (`None` when the token is not derivable).
pub struct DeviceSeed {
    pub project: String,
    pub device_id: String,
    pub seed: Option<Vec<u8>>,
}

fn platform_key_forbidden() -> ApiError {
    ApiError::forbidden("only the platform admin key may revoke or rotate the platform admin key")
}

/// Writes outbox rows inside the caller's transaction.
async fn enqueue(
    tx: &deadpool_postgres::Transaction<'_>,
    messages: &[OutboxMessage],
) -> Result<(), tokio_postgres::Error> {
    if messages.is_empty() {
        return Ok(());
    }
    let subjects: Vec<&str> = messages.iter().map(|m| m.subject.as_str()).collect();
    let ids: Vec<&str> = messages.iter().map(|m| m.msg_id.as_str()).collect();
    let payloads: Vec<&[u8]> = messages.iter().map(|m| m.payload.as_slice()).collect();
    let insert = tx
        .prepare_cached(
            "INSERT INTO registry.outbox (subject, msg_id, payload)
             SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[])",
        )
        .await?;
    tx.execute(&insert, &[&subjects, &ids, &payloads]).await?;
    Ok(())
}

impl Repo {
    pub fn new(pool: Pool, messages: Messages) -> Self {
        Self { pool, messages }
    }

    /// Publishes up to `limit` outbox rows with `publish` and deletes them once it succeeds,
    /// all under row locks (SKIP LOCKED), so two registry instances never publish the same
    /// row at once. Returns how many were published.
    pub async fn drain_outbox<F, Fut>(&self, limit: i64, publish: F) -> anyhow::Result<usize>
    where
        F: FnOnce(Vec<OutboxMessage>) -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<()>>,
    {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let rows = tx
            .query(
                "SELECT seq, subject, msg_id, payload FROM registry.outbox
                 ORDER BY seq LIMIT $1 FOR UPDATE SKIP LOCKED",
                &[&limit],
            )
            .await?;
        if rows.is_empty() {
            return Ok(0);
        }
        let seqs: Vec<i64> = rows.iter().map(|row| row.get(0)).collect();
        let messages = rows
            .iter()
            .map(|row| OutboxMessage {
                subject: row.get(1),
                msg_id: row.get(2),
                payload: row.get(3),
            })
            .collect();
        publish(messages).await?;
        tx.execute("DELETE FROM registry.outbox WHERE seq = ANY($1)", &[&seqs])
            .await?;
        tx.commit().await?;
        Ok(seqs.len())
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

    /// Revokes a key of `project`; false when there is no such key there. Only the platform
    /// admin may revoke the platform admin key (a project admin of `default` sees it listed).
    pub async fn revoke_key(
        &self,
        project: &str,
        key_id: &str,
        caller_is_platform_admin: bool,
    ) -> Result<bool, ApiError> {
        let client = self.pool.get().await?;
        let target = client
            .query_opt(
                "SELECT platform_admin FROM registry.api_keys WHERE project = $1 AND id = $2",
                &[&project, &key_id],
            )
            .await?;
        match target {
            None => return Ok(false),
            Some(row) if row.get::<_, bool>(0) && !caller_is_platform_admin => {
                return Err(platform_key_forbidden());
            }
            Some(_) => {}
        }
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
        token_seed: Option<&[u8]>,
    ) -> Result<Option<DeviceOut>, ApiError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let version: i64 = if device.config.is_some() { 1 } else { 0 };
        let config = device
            .config
            .clone()
            .unwrap_or_else(|| serde_json::json!({}));
        let result = tx
            .query_one(
                &format!(
                    "INSERT INTO registry.devices
                       (project, id, name, device_type, device_group, tags, metadata, heartbeat_interval_s, token_hash,
                        config, config_version, config_updated_at, token_seed)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11::bigint, CASE WHEN $11::bigint > 0 THEN now() END, $12)
                     RETURNING {DEVICE_COLUMNS}"
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
                    &config,
                    &version,
                    &token_seed,
                ],
            )
            .await;
        let row = match result {
            Ok(row) => row,
            Err(error) if error.code() == Some(&SqlState::UNIQUE_VIOLATION) => return Ok(None),
            Err(error) => return Err(error.into()),
        };
        if version == 1 {
            self.record_config(
                &tx,
                project,
                device.id.as_str(),
                0,
                1,
                &config,
                "device creation",
            )
            .await?;
        }
        tx.commit().await?;
        Ok(Some(device_out(&row)))
    }

    /// Stores a configuration version and queues its event and its push to the device.
    #[allow(clippy::too_many_arguments)]
    async fn record_config(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        project: &str,
        device_id: &str,
        previous_version: i64,
        version: i64,
        config: &serde_json::Value,
        changed_by: &str,
    ) -> Result<(), tokio_postgres::Error> {
        tx.execute(
            "INSERT INTO registry.device_configs (project, device_id, version, config, changed_by)
             VALUES ($1, $2, $3, $4, $5)",
            &[&project, &device_id, &version, config, &changed_by],
        )
        .await?;
        let now = fieldline_common::time::now_us();
        let event = serde_json::json!({
            "version": version,
            "previous_version": previous_version,
            "config": config,
            "changed_by": changed_by,
        });
        enqueue(
            tx,
            &[
                self.messages
                    .event(EventKind::Config, project, device_id, now, &event),
                self.messages
                    .config_push(project, device_id, version, config),
            ],
        )
        .await
    }

    /// Replaces the writable fields of a device; `None` when there is no such device.
    pub async fn update_device(
        &self,
        project: &str,
        device: &NewDevice,
        default_interval_s: i32,
    ) -> Result<Option<DeviceOut>, ApiError> {
        let client = self.pool.get().await?;
        let row = client
            .query_opt(
                &format!(
                    "UPDATE registry.devices SET
                       name = $3, device_type = $4, device_group = $5, tags = $6, metadata = $7,
                       heartbeat_interval_s = $8, updated_at = now(),
                       offline_after = last_seen + make_interval(secs => 3 * coalesce($8::int4, $9::int4))
                     WHERE project = $1 AND id = $2 RETURNING {DEVICE_COLUMNS}"
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
                    &default_interval_s,
                ],
            )
            .await?;
        Ok(row.as_ref().map(device_out))
    }

    /// Deletes a device and everything of it (configs, commands, alert states).
    /// Its retained config on the broker is cleared through the outbox, in the same transaction.
    pub async fn delete_device(&self, project: &str, device_id: &str) -> Result<bool, ApiError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let deleted = tx
            .execute(
                "DELETE FROM registry.devices WHERE project = $1 AND id = $2",
                &[&project, &device_id],
            )
            .await?;
        if deleted == 1 {
            enqueue(&tx, &[self.messages.config_clear(project, device_id)]).await?;
        }
        tx.commit().await?;
        Ok(deleted == 1)
    }

    /// Gives a device a new token; the old one stops matching at once.
    pub async fn rotate_device_token(
        &self,
        project: &str,
        device_id: &str,
        token_hash: &[u8],
        token_seed: Option<&[u8]>,
    ) -> Result<bool, ApiError> {
        let client = self.pool.get().await?;
        let updated = client
            .execute(
                "UPDATE registry.devices SET token_hash = $3, token_seed = $4, updated_at = now()
                 WHERE project = $1 AND id = $2",
                &[&project, &device_id, &token_hash, &token_seed],
            )
            .await?;
        Ok(updated == 1)
    }

    /// The digest of the token key recorded by the first start with a key, recording
    /// `digest` if there is none yet.
    pub async fn token_key_digest(&self, digest: &str) -> Result<String, ApiError> {
        let client = self.pool.get().await?;
        client
            .execute(
                "INSERT INTO registry.token_key_check (digest) VALUES ($1) ON CONFLICT DO NOTHING",
                &[&digest],
            )
            .await?;
        let row = client
            .query_one("SELECT digest FROM registry.token_key_check", &[])
            .await?;
        Ok(row.get(0))
    }

    /// Which of the broker accounts `usernames` (`{root}/{project}/{device}`) belong to a
    /// device that exists now.
    pub async fn existing_devices(
        &self,
        root: &str,
        usernames: &[String],
    ) -> Result<std::collections::HashSet<String>, ApiError> {
        let (projects, ids): (Vec<&str>, Vec<&str>) = usernames
            .iter()
            .filter_map(|username| {
                username
                    .strip_prefix(root)?
                    .strip_prefix('/')?
                    .split_once('/')
            })
            .unzip();
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT d.project, d.id FROM registry.devices d
                 JOIN unnest($1::text[], $2::text[]) AS wanted(project, id)
                   ON d.project = wanted.project AND d.id = wanted.id",
                &[&projects, &ids],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|row| {
                let (project, id): (String, String) = (row.get(0), row.get(1));
                format!("{root}/{project}/{id}")
            })
            .collect())
    }

    /// One page of every project's devices with their token seeds, in (project, id) order
    /// after `after`: what the broker's accounts should be.
    pub async fn device_seeds(
        &self,
        after: Option<&(String, String)>,
        limit: i64,
    ) -> Result<Vec<DeviceSeed>, ApiError> {
        let client = self.pool.get().await?;
        let (after_project, after_id) = after
            .map(|(project, id)| (project.as_str(), id.as_str()))
            .unwrap_or(("", ""));
        let rows = client
            .query(
                "SELECT project, id, token_seed FROM registry.devices
                 WHERE (project, id) > ($1, $2)
                 ORDER BY project, id
                 LIMIT $3",
                &[&after_project, &after_id, &limit],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|row| DeviceSeed {
                project: row.get(0),
                device_id: row.get(1),
                seed: row.get(2),
            })
            .collect())
    }

    /// A device's current configuration; `None` when there is no such device.
    pub async fn get_config(
        &self,
        project: &str,
        device_id: &str,
    ) -> Result<Option<(i64, serde_json::Value, Option<DateTime<Utc>>)>, ApiError> {
        let client = self.pool.get().await?;
        let row = client
            .query_opt(
                "SELECT config_version, config, config_updated_at FROM registry.devices
                 WHERE project = $1 AND id = $2",
                &[&project, &device_id],
            )
            .await?;
        Ok(row.map(|row| (row.get(0), row.get(1), row.get(2))))
    }

    /// A device's configuration versions, newest first (`None`: no such device).
    pub async fn config_versions(
        &self,
        project: &str,
        device_id: &str,
        limit: i64,
    ) -> Result<Option<Vec<crate::domain::commands::ConfigVersionOut>>, ApiError> {
        let client = self.pool.get().await?;
        let exists = client
            .query_opt(
                "SELECT 1 FROM registry.devices WHERE project = $1 AND id = $2",
                &[&project, &device_id],
            )
            .await?;
        if exists.is_none() {
            return Ok(None);
        }
        let rows = client
            .query(
                "SELECT version, config, changed_by, created_at FROM registry.device_configs
                 WHERE project = $1 AND device_id = $2 ORDER BY version DESC LIMIT $3",
                &[&project, &device_id, &limit],
            )
            .await?;
        Ok(Some(
            rows.iter()
                .map(|row| crate::domain::commands::ConfigVersionOut {
                    version: row.get(0),
                    config: row.get(1),
                    changed_by: row.get(2),
                    created_at: format_rfc3339(&row.get(3)),
                })
                .collect(),
        ))
    }

    /// Changes a device's configuration: `change` turns the current document into the next
    /// one under a row lock. A document equal to the current one makes no new version.
    /// Returns the version and document after, and whether they changed; `None` when there is
    /// no such device.
    pub async fn change_config(
        &self,
        project: &str,
        device_id: &str,
        changed_by: &str,
        change: impl FnOnce(&serde_json::Value) -> Result<serde_json::Value, ApiError>,
    ) -> Result<Option<(i64, serde_json::Value, Option<DateTime<Utc>>, bool)>, ApiError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let Some(row) = tx
            .query_opt(
                "SELECT config_version, config, config_updated_at FROM registry.devices
                 WHERE project = $1 AND id = $2 FOR UPDATE",
                &[&project, &device_id],
            )
            .await?
        else {
            return Ok(None);
        };
        let version: i64 = row.get(0);
        let current: serde_json::Value = row.get(1);
        let next = change(&current)?;
        if next == current && version > 0 {
            return Ok(Some((version, current, row.get(2), false)));
        }
        let updated_at: DateTime<Utc> = tx
            .query_one(
                "UPDATE registry.devices SET config = $3, config_version = $4,
                   config_updated_at = now(), updated_at = now()
                 WHERE project = $1 AND id = $2 RETURNING config_updated_at",
                &[&project, &device_id, &next, &(version + 1)],
            )
            .await?
            .get(0);
        self.record_config(
            &tx,
            project,
            device_id,
            version,
            version + 1,
            &next,
            changed_by,
        )
        .await?;
        tx.commit().await?;
        Ok(Some((version + 1, next, Some(updated_at), true)))
    }

    /// Creates a key for `key_id`'s project with the same name, scope and expiry, and makes
    /// the old key expire after `grace`. `None` when there is no such live key.
    #[allow(clippy::too_many_arguments)]
    pub async fn rotate_key(
        &self,
        project: &str,
        key_id: &str,
        new_key_id: &str,
        secret_hash: &[u8],
        secret_prefix: &str,
        grace_seconds: i64,
        caller_is_platform_admin: bool,
    ) -> Result<Option<(KeyOut, KeyOut)>, ApiError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let old = tx
            .query_opt(
                "SELECT name, scope, expires_at, platform_admin FROM registry.api_keys
                 WHERE project = $1 AND id = $2 AND revoked_at IS NULL
                   AND (expires_at IS NULL OR expires_at > now())
                 FOR UPDATE",
                &[&project, &key_id],
            )
            .await?;
        let Some(old) = old else {
            return Ok(None);
        };
        let name: String = old.get(0);
        let scope: String = old.get(1);
        let expires_at: Option<DateTime<Utc>> = old.get(2);
        let platform_admin: bool = old.get(3);
        if platform_admin && !caller_is_platform_admin {
            return Err(platform_key_forbidden());
        }
        let new_key = tx
            .query_one(
                &format!(
                    "INSERT INTO registry.api_keys
                       (id, project, name, secret_hash, secret_prefix, scope, expires_at, platform_admin)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING {KEY_COLUMNS}"
                ),
                &[&new_key_id, &project, &name, &secret_hash, &secret_prefix, &scope, &expires_at, &platform_admin],
            )
            .await?;
        let old_key = tx
            .query_one(
                &format!(
                    "UPDATE registry.api_keys
                     SET expires_at = least(coalesce(expires_at, 'infinity'), now() + make_interval(secs => $3))
                     WHERE project = $1 AND id = $2 RETURNING {KEY_COLUMNS}"
                ),
                &[&project, &key_id, &(grace_seconds as f64)],
            )
            .await?;
        tx.commit().await?;
        Ok(Some((key_out(&new_key), key_out(&old_key))))
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
                       AND ($5::text IS NULL OR status = $5)
                       AND ($6::text IS NULL OR device_group = $6)
                       AND ($7::text IS NULL OR tags @> ARRAY[$7])
                     ORDER BY id LIMIT $4"
                ),
                &[
                    &project,
                    &filter.device_type,
                    &filter.after_id,
                    &filter.limit,
                    &filter.status,
                    &filter.group,
                    &filter.tag,
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
    ) -> Result<Option<(String, Option<String>, Vec<String>)>, ApiError> {
        let client = self.pool.get().await?;
        let row = client
            .query_opt(
                "SELECT device_type, device_group, tags FROM registry.devices WHERE project = $1 AND id = $2",
                &[&project, &device_id],
            )
            .await?;
        Ok(row.map(|row| (row.get(0), row.get(1), row.get(2))))
    }
}
