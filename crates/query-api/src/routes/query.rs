//! `POST /api/v1/query`: several devices and metrics at once, raw or aggregated, with a bound
//! on the rows returned (`limit`, default 1,000, at most 10,000; past it `truncated` is true).

use actix_web::{HttpResponse, web};
use chrono::Utc;
use fieldline_common::{
    ApiError,
    auth::{ApiKey, ScopeLevel},
    envelope,
    extract::Json,
};
use serde::Serialize;

use crate::{State, aggregate, domain::MultiQueryIn};

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/api/v1/query").route(web::post().to(query)));
}

async fn query(
    state: web::Data<State>,
    key: ApiKey,
    Json(body): Json<MultiQueryIn>,
) -> Result<HttpResponse, ApiError> {
    let principal = key.require(ScopeLevel::Read)?;
    let query = body.parse(Utc::now())?;
    // Every device must be the caller's project's; the first that is not answers 404 with its
    // name, exactly as an absent one would.
    let checks = query.devices.iter().map(|device| {
        state
            .context
            .auth
            .require_device(&principal.project, device)
    });
    futures::future::try_join_all(checks).await?;
    let series = state
        .repo
        .series_of_devices(&principal.project, &query.devices, &query.metrics)
        .await?;
    let pairs = query
        .devices
        .iter()
        .flat_map(|device| query.metrics.iter().map(move |metric| (device, metric)));

    let Some(spec) = &query.aggregate else {
        let mut readings: Vec<QueryReading> = Vec::new();
        let mut truncated = false;
        for (device, metric) in pairs {
            let Some(series_id) = series.get(&(device.clone(), metric.clone())) else {
                continue;
            };
            let remaining = query.limit - readings.len();
            let rows = state
                .repo
                .series_readings(
                    *series_id,
                    query.start_us,
                    query.end_us,
                    remaining as i64 + 1,
                )
                .await?;
            for (ts, value) in rows {
                if readings.len() == query.limit {
                    truncated = true;
                    break;
                }
                readings.push(QueryReading {
                    device_id: device.clone(),
                    metric: metric.clone(),
                    ts,
                    value,
                });
            }
            if truncated {
                break;
            }
        }
        return Ok(envelope::ok(&QueryReadings {
            readings,
            limit: query.limit,
            truncated,
        }));
    };

    let ids: Vec<i32> = series.values().copied().collect();
    let (buckets, sources) = aggregate::fetch(&state.repo, &ids, spec).await?;
    let empty = aggregate::Buckets::new();
    let mut out = aggregate::AggregateOut::new(spec, &sources);
    let mut rows = 0usize;
    let mut truncated = false;
    for (device, metric) in pairs {
        let of_series = series
            .get(&(device.clone(), metric.clone()))
            .and_then(|id| buckets.get(id))
            .unwrap_or(&empty);
        aggregate::check_numeric(metric, of_series, spec)?;
        if truncated {
            continue;
        }
        let (rendered, cut) = aggregate::render(of_series, spec, query.limit - rows);
        rows += rendered.len();
        truncated = cut;
        out.series.push(aggregate::SeriesOut {
            device_id: Some(device),
            metric,
            buckets: rendered,
        });
    }
    out.limit = Some(query.limit);
    out.truncated = Some(truncated);
    Ok(envelope::ok(&out))
}

/// One reading of a multi-device query.
#[derive(Serialize, utoipa::ToSchema)]
pub struct QueryReading {
    pub device_id: String,
    pub metric: String,
    pub ts: String,
    #[schema(value_type = fieldline_common::openapi::ReadingValue)]
    pub value: serde_json::Value,
}

/// Raw readings of a multi-device query (no `interval`).
#[derive(Serialize, utoipa::ToSchema)]
pub struct QueryReadings {
    pub readings: Vec<QueryReading>,
    pub limit: usize,
    /// More rows matched than `limit`.
    pub truncated: bool,
}
