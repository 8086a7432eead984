//! voltcast's HTTP API (axum): alerts and batteries for service desks, acknowledgements
//! from head units, health for orchestrators, metrics for Prometheus.
//!
//! `/api/*` takes a bearer token when `[api] token` is set; health and metrics stay open
//! (they are what a load balancer and a scraper reach without credentials). Errors are
//! JSON `{"error": "..."}` naming the parameter or id at fault.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::extract::{Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;
use subtle::ConstantTimeEq;

use crate::alerts::{AlertError, AlertFilter, AlertService, AlertStatus, iso_day};

/// `[api]` settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Address to serve on; empty: no API.
    pub listen: String,
    /// Bearer token for `/api/*`; empty: open.
    pub token: String,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8088".into(),
            token: String::new(),
        }
    }
}

/// What the handlers share.
#[derive(Clone)]
pub struct ApiState {
    pub alerts: Arc<AlertService>,
    pub token: Option<Arc<str>>,
    /// Set once the source is consuming.
    pub ready: Arc<AtomicBool>,
    /// Called before `/metrics` renders, to copy in counters kept elsewhere.
    pub refresh: Arc<dyn Fn() + Send + Sync>,
}

pub fn router(state: ApiState) -> Router {
    let api = Router::new()
        .route("/api/alerts", get(list_alerts))
        .route("/api/alerts/{id}", get(get_alert))
        .route("/api/alerts/{id}/ack", post(ack))
        .route("/api/batteries/{id}", get(battery))
        .route("/api/webhooks/dead", get(dead_webhooks))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such endpoint") })
        .route_layer(middleware::from_fn_with_state(state.clone(), bearer));
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(api)
        .with_state(state)
}

/// Binds and serves in the background; returns the bound address.
pub async fn spawn(listen: &str, state: ApiState) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router(state)).await {
            tracing::error!(error = %e, "API server stopped");
        }
    });
    Ok(addr)
}

fn error(status: StatusCode, message: impl std::fmt::Display) -> Response {
    (status, Json(json!({ "error": message.to_string() }))).into_response()
}

async fn bearer(State(s): State<ApiState>, req: Request, next: Next) -> Response {
    if let Some(token) = &s.token {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        // Constant time: a byte-by-byte comparison that stops at the first difference
        // tells a patient caller how much of its guess was right.
        let matches = given.is_some_and(|g| bool::from(g.as_bytes().ct_eq(token.as_bytes())));
        if !matches {
            return error(
                StatusCode::UNAUTHORIZED,
                "missing or wrong bearer token (Authorization: Bearer <api.token>)",
            );
        }
    }
    next.run(req).await
}

async fn readyz(State(s): State<ApiState>) -> Response {
    if s.ready.load(Ordering::Relaxed) {
        "ready".into_response()
    } else {
        error(StatusCode::SERVICE_UNAVAILABLE, "not consuming yet")
    }
}

async fn metrics(State(s): State<ApiState>) -> Response {
    // A pass over every battery's latest assessment, under the store's lock: on a
    // thread for blocking work, so a scrape never holds up the runtime's other tasks.
    let rendered = tokio::task::spawn_blocking(move || {
        (s.refresh)();
        {
            let store = s.alerts.store.lock().unwrap_or_else(|e| e.into_inner());
            s.alerts.metrics().refresh_fleet(store.latest_all());
        }
        s.alerts.metrics().render()
    })
    .await;
    match rendered {
        Ok(text) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response(),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("rendering metrics: {e}"),
        ),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AlertQuery {
    battery: Option<String>,
    vehicle: Option<String>,
    since: Option<String>,
    status: Option<String>,
    limit: Option<String>,
}

/// RFC 3339, or a date meaning its midnight UTC.
fn parse_since(s: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&chrono::Utc));
    }
    let d = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").ok()?;
    Some(d.and_hms_opt(0, 0, 0)?.and_utc())
}

async fn list_alerts(
    State(s): State<ApiState>,
    query: Result<Query<AlertQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Query(q) = match query {
        Ok(q) => q,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("query: {}", e.body_text())),
    };
    let mut f = AlertFilter {
        battery: q.battery,
        vehicle: q.vehicle,
        ..Default::default()
    };
    if let Some(since) = q.since {
        match parse_since(&since) {
            Some(t) => f.since = Some(t),
            None => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "parameter `since`: expected an RFC 3339 time or YYYY-MM-DD, got {since:?}"
                    ),
                );
            }
        }
    }
    if let Some(status) = q.status {
        match AlertStatus::parse(&status) {
            Some(st) => f.status = Some(st),
            None => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "parameter `status`: expected open, acknowledged, escalated or resolved, got {status:?}"
                    ),
                );
            }
        }
    }
    if let Some(limit) = q.limit {
        match limit.parse::<usize>() {
            Ok(n) if n > 0 => f.limit = Some(n),
            _ => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("parameter `limit`: expected a positive integer, got {limit:?}"),
                );
            }
        }
    }
    let alerts = s
        .alerts
        .store
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .query(&f);
    match alerts {
        Ok(alerts) => Json(json!({ "count": alerts.len(), "alerts": alerts })).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

async fn get_alert(State(s): State<ApiState>, Path(id): Path<String>) -> Response {
    let store = s.alerts.store.lock().unwrap_or_else(|e| e.into_inner());
    match store.get(&id) {
        Ok(Some(a)) => Json(a).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, format!("no alert {id:?}")),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

#[derive(Debug, Default, Deserialize)]
struct AckBody {
    by: Option<String>,
}

async fn ack(
    State(s): State<ApiState>,
    Path(id): Path<String>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    // A browser sends a form or text/plain post to any site without asking it first; a
    // JSON post from another origin needs a CORS preflight this API never grants. So an
    // acknowledgement must say it is JSON, even with an empty body.
    if !is_json(&headers) {
        return error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "POST /api/alerts/{id}/ack takes Content-Type: application/json (body optional: {\"by\": \"...\"})",
        );
    }
    let by = if body.is_empty() {
        None
    } else {
        match serde_json::from_slice::<AckBody>(&body) {
            Ok(b) => b.by,
            Err(e) => return error(StatusCode::BAD_REQUEST, format!("body: {e}")),
        }
    };
    match s.alerts.acknowledge(&id, by.as_deref().unwrap_or("api")) {
        Ok(a) => Json(a).into_response(),
        Err(AlertError::NotFound(_)) => error(StatusCode::NOT_FOUND, format!("no alert {id:?}")),
        Err(e @ AlertError::NotActive(..)) => error(StatusCode::CONFLICT, e),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

/// `Content-Type: application/json`, parameters (charset) allowed.
fn is_json(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"))
}

async fn battery(State(s): State<ApiState>, Path(id): Path<String>) -> Response {
    let store = s.alerts.store.lock().unwrap_or_else(|e| e.into_inner());
    let Some(u) = store.latest(&id) else {
        return error(
            StatusCode::NOT_FOUND,
            format!("no battery {id:?} (not seen, or no day of it closed yet)"),
        );
    };
    let first = u.day + 1 - u.recent.len() as i32;
    let history: Vec<_> = u
        .recent
        .iter()
        .enumerate()
        .map(|(i, d)| json!({ "date": iso_day(first + i as i32), "cycles": d[0], "minutes": d[1], "trips": d[2] }))
        .collect();
    let z = 1.644_853_6_f32; // 90% two-sided
    let forecast: Vec<_> = u
        .forecast
        .mean()
        .zip(u.forecast.sd())
        .enumerate()
        // In f32, as kept: JSON then shows the shortest digits that read back the same.
        .map(|(i, (m, sd))| {
            json!({
                "date": iso_day(u.day + 1 + i as i32),
                "cycles": m,
                "lower_90": (m - z * sd).max(0.0),
                "upper_90": m + z * sd,
            })
        })
        .collect();
    let alerts = match store.query(&AlertFilter {
        battery: Some(id.clone()),
        ..Default::default()
    }) {
        Ok(alerts) => alerts,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e),
    };
    Json(json!({
        "battery_id": u.battery_id,
        "vehicle_id": u.vehicle_id,
        "as_of_day": iso_day(u.day),
        "age_days": u.age,
        "lifetime_cycles": u.lifetime,
        "rated_cycles": u.rated,
        "model": u.model,
        "model_version": u.model_version,
        "risk": u.risk,
        "drivers": u.drivers,
        "history": history,
        "forecast": forecast,
        "alerts": alerts,
    }))
    .into_response()
}

async fn dead_webhooks(State(s): State<ApiState>) -> Response {
    let dead = s.alerts.dead_letters();
    Json(json!({ "count": dead.len(), "deliveries": dead })).into_response()
}
