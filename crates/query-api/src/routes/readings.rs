//! One device's history: `GET /api/v1/devices/{id}/readings` (a page, or an export with
//! `format=csv|ndjson` / `Accept: text/csv`), `/readings/latest`, `/readings/aggregate` and
//! `/metrics`.

use actix_web::{HttpRequest, HttpResponse, http::header, web};
use chrono::Utc;
use fieldline_common::{
    ApiError,
    auth::{ApiKey, ScopeLevel},
    envelope::{self},
    extract::Query,
    time::{MAX_TIME_US, MIN_TIME_US},
};

use crate::{
    State, aggregate,
    domain::{AggregateParams, LatestParams, ReadingsParams, parse_metrics},
    export::{self, Export},
};

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/api/v1/devices/{id}/readings").route(web::get().to(readings)))
        .service(web::resource("/api/v1/devices/{id}/readings/latest").route(web::get().to(latest)))
        .service(
            web::resource("/api/v1/devices/{id}/readings/aggregate")
                .route(web::get().to(aggregate)),
        )
        .service(web::resource("/api/v1/devices/{id}/metrics").route(web::get().to(metrics)))
        .service(web::resource("/api/v1/stats/readings").route(web::get().to(activity)));
}

async fn readings(
    state: web::Data<State>,
    request: HttpRequest,
    key: ApiKey,
    path: web::Path<String>,
    Query(params): Query<ReadingsParams>,
) -> Result<HttpResponse, ApiError> {
    let principal = key.require(ScopeLevel::Read)?;
    let accept = request
        .headers()
        .get(header::ACCEPT)
        .and_then(|value| value.to_str().ok());
    let format = params.export_format(accept)?;
    if format.is_some() {
        for (name, given) in [
            ("cursor", params.cursor.is_some()),
            ("limit", params.limit.is_some()),
        ] {
            if given {
                return Err(ApiError::bad_request(
                    "invalid_query",
                    format!("{name}: an export streams every row in range; leave {name} out"),
                ));
            }
        }
    }
    let query = params.parse(Utc::now())?;
    let device_id = state
        .context
        .auth
        .require_device(&principal.project, &path)
        .await?;
    let Some(format) = format else {
        let rows = state
            .repo
            .readings(&principal.project, device_id.as_str(), &query)
            .await?;
        return Ok(envelope::keyset_page(rows, query.limit));
    };
    let series = state
        .repo
        .device_series(
            &principal.project,
            device_id.as_str(),
            query.metrics.as_deref(),
        )
        .await?;
    let ids: Vec<i32> = series.iter().map(|series| series.series_id).collect();
    let start_us = query.start.map_or(MIN_TIME_US, |t| t.timestamp_micros());
    let end_us = query.end.map_or(MAX_TIME_US, |t| t.timestamp_micros());
    // What the series hold of the range: an empty range when nothing.
    let (start_us, end_us) = state
        .repo
        .narrow_range(&ids, start_us, end_us)
        .await?
        .unwrap_or((start_us, start_us));
    let body = export::start(
        state.repo.history_pool().clone(),
        Export {
            series,
            start_us,
            end_us,
            order: query.order,
            format,
        },
    );
    let extension = match format {
        crate::domain::ExportFormat::Csv => "csv",
        crate::domain::ExportFormat::Ndjson => "ndjson",
    };
    Ok(HttpResponse::Ok()
        .content_type(format.content_type())
        .insert_header((
            header::CONTENT_DISPOSITION,
            format!("attachment; filename=\"{device_id}-readings.{extension}\""),
        ))
        .streaming(body))
}

async fn latest(
    state: web::Data<State>,
    key: ApiKey,
    path: web::Path<String>,
    Query(params): Query<LatestParams>,
) -> Result<HttpResponse, ApiError> {
    let principal = key.require(ScopeLevel::Read)?;
    let metrics = parse_metrics(params.metric.as_deref())?;
    let device_id = state
        .context
        .auth
        .require_device(&principal.project, &path)
        .await?;
    let latest = state
        .repo
        .latest(&principal.project, device_id.as_str(), metrics.as_deref())
        .await?;
    Ok(envelope::ok(&latest))
}

async fn aggregate(
    state: web::Data<State>,
    key: ApiKey,
    path: web::Path<String>,
    Query(params): Query<AggregateParams>,
) -> Result<HttpResponse, ApiError> {
    let principal = key.require(ScopeLevel::Read)?;
    let (metrics, spec) = params.parse(Utc::now())?;
    let device_id = state
        .context
        .auth
        .require_device(&principal.project, &path)
        .await?;
    let series = state
        .repo
        .device_series(&principal.project, device_id.as_str(), Some(&metrics))
        .await?;
    let ids: Vec<i32> = series.iter().map(|s| s.series_id).collect();
    let (buckets, sources) = aggregate::fetch(&state.repo, &ids, &spec).await?;
    let empty = aggregate::Buckets::new();
    let mut out = aggregate::AggregateOut::new(&spec, &sources);
    out.device_id = Some(device_id.as_str());
    for metric in &metrics {
        let of_metric = series
            .iter()
            .find(|s| &s.metric == metric)
            .and_then(|s| buckets.get(&s.series_id))
            .unwrap_or(&empty);
        aggregate::check_numeric(metric, of_metric, &spec)?;
        let (rendered, _) = aggregate::render(of_metric, &spec, usize::MAX);
        out.series.push(aggregate::SeriesOut {
            device_id: None,
            metric,
            buckets: rendered,
        });
    }
    Ok(envelope::ok(&out))
}

async fn metrics(
    state: web::Data<State>,
    key: ApiKey,
    path: web::Path<String>,
    Query(_): Query<NoParams>,
) -> Result<HttpResponse, ApiError> {
    let principal = key.require(ScopeLevel::Read)?;
    let device_id = state
        .context
        .auth
        .require_device(&principal.project, &path)
        .await?;
    let metrics = state
        .repo
        .metrics(&principal.project, device_id.as_str())
        .await?;
    Ok(envelope::ok(&metrics))
}

/// An endpoint without parameters refuses unknown ones.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct NoParams {}

/// `GET /api/v1/stats/readings`: the project's readings per minute over the last five
/// minutes (by reading time), and how many devices sent them.
async fn activity(state: web::Data<State>, key: ApiKey) -> Result<HttpResponse, ApiError> {
    let principal = key.require(ScopeLevel::Read)?;
    let (readings, devices) = state.repo.recent_activity(&principal.project).await?;
    Ok(envelope::ok(&ActivityOut {
        window_s: 300,
        readings,
        readings_per_minute: readings as f64 / 5.0,
        devices_reporting: devices,
    }))
}

/// A project's recent readings: how many in the window, per minute, from how many devices.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ActivityOut {
    /// The window, in seconds, ending now.
    pub window_s: i64,
    pub readings: i64,
    pub readings_per_minute: f64,
    pub devices_reporting: i64,
}
