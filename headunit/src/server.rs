//! The head-unit simulator's HTTP side.
//!
//! `POST /vehicles/{vehicle_id}/alerts` takes a signed alert: 401 for a missing, wrong or
//! stale signature, 409 for a request replayed byte for byte (same signature), 200
//! `duplicate` for an alert id already in the inbox (a sender's retry with a fresh
//! signature), 200 `accepted` otherwise. A retry after a lost response is therefore
//! harmless, while a captured request cannot be played again.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::mpsc;

use crate::signature::{self, IDEMPOTENCY_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER};

#[derive(Debug, Clone)]
pub struct HeadUnitConfig {
    pub secret: String,
    /// How far a request's timestamp may be from this clock.
    pub tolerance_seconds: i64,
    /// voltcast's API, for "Book service" acknowledgements (`POST /api/alerts/{id}/ack`).
    pub voltcast_url: Option<String>,
    pub api_token: Option<String>,
    /// Answer each webhook this much later: a slow car on a weak mobile link, for
    /// exercising the sender's timeouts and a restart mid-delivery.
    pub response_delay: Option<Duration>,
}

impl HeadUnitConfig {
    pub fn new(secret: impl Into<String>) -> Self {
        Self {
            secret: secret.into(),
            tolerance_seconds: 300,
            voltcast_url: None,
            api_token: None,
            response_delay: None,
        }
    }
}

/// An alert as the head unit shows it. Fields the car does not display are ignored, and
/// missing ones default: the car keeps working when voltcast adds a field.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InboxAlert {
    pub alert_id: String,
    #[serde(default)]
    pub battery_id: String,
    #[serde(default)]
    pub severity: String,
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub reasons: Vec<String>,
    #[serde(default)]
    pub days_remaining: Option<u32>,
    #[serde(default)]
    pub expected_eol_date: Option<String>,
    #[serde(default)]
    pub created_at: String,
    /// Set when the driver booked service and voltcast took the acknowledgement.
    #[serde(default)]
    pub booked: bool,
}

/// What arrived, for tests and benchmarks that watch the receiver.
#[derive(Debug, Clone)]
pub struct Received {
    pub vehicle_id: String,
    pub alert_id: String,
    pub at: std::time::Instant,
}

#[derive(Default)]
struct Inboxes {
    by_vehicle: HashMap<String, Vec<InboxAlert>>,
    ids: HashSet<String>,
    /// Signatures seen within the tolerance window, oldest first.
    signatures: VecDeque<(i64, String)>,
    seen_signatures: HashSet<String>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct HeadUnitStats {
    pub accepted: u64,
    pub duplicates: u64,
    pub rejected: u64,
    pub replays: u64,
}

struct Shared {
    config: HeadUnitConfig,
    inboxes: Mutex<Inboxes>,
    stats: Mutex<HeadUnitStats>,
    notify: Option<mpsc::UnboundedSender<Received>>,
    http: reqwest::Client,
}

/// A running (or ready to run) head-unit simulator.
#[derive(Clone)]
pub struct HeadUnit {
    shared: Arc<Shared>,
}

impl HeadUnit {
    pub fn new(config: HeadUnitConfig, notify: Option<mpsc::UnboundedSender<Received>>) -> Self {
        Self {
            shared: Arc::new(Shared {
                config,
                inboxes: Mutex::default(),
                stats: Mutex::default(),
                notify,
                http: reqwest::Client::builder()
                    .timeout(Duration::from_secs(10))
                    .build()
                    .unwrap_or_default(),
            }),
        }
    }

    pub fn router(&self) -> Router {
        Router::new()
            .route("/", get(index))
            .route("/healthz", get(|| async { "ok" }))
            .route("/received", get(received))
            .route("/vehicles/{vehicle_id}", get(vehicle_page))
            .route("/vehicles/{vehicle_id}/alerts", post(receive).get(inbox))
            .route("/vehicles/{vehicle_id}/alerts/{alert_id}/book", post(book))
            .with_state(self.clone())
    }

    /// Serves on `listener` until `shutdown` resolves.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        axum::serve(listener, self.router())
            .with_graceful_shutdown(shutdown)
            .await
    }

    /// Binds `addr` and serves in the background; returns the bound address.
    pub async fn spawn(self, addr: SocketAddr) -> std::io::Result<SocketAddr> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let bound = listener.local_addr()?;
        tokio::spawn(async move {
            if let Err(e) = self.serve(listener, std::future::pending()).await {
                tracing::error!(error = %e, "head unit stopped");
            }
        });
        Ok(bound)
    }

    pub fn stats(&self) -> HeadUnitStats {
        *self.shared.stats.lock().expect("stats lock")
    }

    /// A vehicle's alerts, newest first.
    pub fn inbox(&self, vehicle_id: &str) -> Vec<InboxAlert> {
        let inboxes = self.shared.inboxes.lock().expect("inbox lock");
        let mut v = inboxes
            .by_vehicle
            .get(vehicle_id)
            .cloned()
            .unwrap_or_default();
        v.reverse();
        v
    }

    pub fn vehicles(&self) -> Vec<(String, usize)> {
        let inboxes = self.shared.inboxes.lock().expect("inbox lock");
        let mut v: Vec<(String, usize)> = inboxes
            .by_vehicle
            .iter()
            .map(|(k, a)| (k.clone(), a.len()))
            .collect();
        v.sort();
        v
    }

    fn count(&self, f: impl FnOnce(&mut HeadUnitStats)) {
        f(&mut self.shared.stats.lock().expect("stats lock"));
    }
}

fn error(status: StatusCode, message: impl std::fmt::Display) -> Response {
    (status, Json(json!({ "error": message.to_string() }))).into_response()
}

async fn receive(
    State(unit): State<HeadUnit>,
    Path(vehicle_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let now = chrono::Utc::now().timestamp();
    let config = &unit.shared.config;
    if let Some(delay) = config.response_delay {
        tokio::time::sleep(delay).await;
    }
    let signature = match signature::verify(
        config.secret.as_bytes(),
        header(TIMESTAMP_HEADER),
        header(SIGNATURE_HEADER),
        &body,
        now,
        config.tolerance_seconds,
    ) {
        Ok(canonical) => canonical,
        Err(e) => {
            unit.count(|s| s.rejected += 1);
            return error(StatusCode::UNAUTHORIZED, e);
        }
    };
    let mut alert: InboxAlert = match serde_json::from_slice(&body) {
        Ok(a) => a,
        Err(e) => {
            unit.count(|s| s.rejected += 1);
            return error(StatusCode::BAD_REQUEST, format!("alert body: {e}"));
        }
    };
    if header(IDEMPOTENCY_HEADER).is_some_and(|k| k != alert.alert_id) {
        unit.count(|s| s.rejected += 1);
        return error(
            StatusCode::BAD_REQUEST,
            "idempotency-key differs from the body's alert_id",
        );
    }
    alert.booked = false;
    let duplicate = {
        let mut inboxes = unit.shared.inboxes.lock().expect("inbox lock");
        while inboxes
            .signatures
            .front()
            .is_some_and(|(t, _)| now - t > 2 * config.tolerance_seconds)
        {
            if let Some((_, s)) = inboxes.signatures.pop_front() {
                inboxes.seen_signatures.remove(&s);
            }
        }
        if !inboxes.seen_signatures.insert(signature.clone()) {
            drop(inboxes);
            unit.count(|s| s.replays += 1);
            return error(
                StatusCode::CONFLICT,
                "replayed request: signature already used",
            );
        }
        inboxes.signatures.push_back((now, signature));
        let duplicate = !inboxes.ids.insert(alert.alert_id.clone());
        if !duplicate {
            inboxes
                .by_vehicle
                .entry(vehicle_id.clone())
                .or_default()
                .push(alert.clone());
        }
        duplicate
    };
    if duplicate {
        unit.count(|s| s.duplicates += 1);
        return Json(json!({ "status": "duplicate", "alert_id": alert.alert_id })).into_response();
    }
    unit.count(|s| s.accepted += 1);
    if let Some(tx) = &unit.shared.notify {
        let _ = tx.send(Received {
            vehicle_id,
            alert_id: alert.alert_id.clone(),
            at: std::time::Instant::now(),
        });
    }
    Json(json!({ "status": "accepted", "alert_id": alert.alert_id })).into_response()
}

/// Everything this head unit accepted, by alert id, and its counts: what a fleet test
/// compares across runs (each alert once, duplicates and replays counted apart).
async fn received(State(unit): State<HeadUnit>) -> Response {
    let mut alerts: Vec<_> = {
        let inboxes = unit.shared.inboxes.lock().expect("inbox lock");
        inboxes
            .by_vehicle
            .iter()
            .flat_map(|(vehicle, list)| {
                list.iter().map(move |a| {
                    json!({
                        "alert_id": a.alert_id,
                        "vehicle_id": vehicle,
                        "battery_id": a.battery_id,
                        "severity": a.severity,
                    })
                })
            })
            .collect()
    };
    alerts.sort_by(|a, b| a["alert_id"].as_str().cmp(&b["alert_id"].as_str()));
    Json(json!({ "stats": unit.stats(), "alerts": alerts })).into_response()
}

async fn inbox(State(unit): State<HeadUnit>, Path(vehicle_id): Path<String>) -> Response {
    Json(unit.inbox(&vehicle_id)).into_response()
}

async fn index(State(unit): State<HeadUnit>) -> Html<String> {
    Html(crate::page::index(&unit.vehicles()))
}

async fn vehicle_page(Path(vehicle_id): Path<String>) -> Html<String> {
    Html(crate::page::vehicle(&vehicle_id))
}

/// "Book service": acknowledge the alert to voltcast, then mark it booked here.
async fn book(
    State(unit): State<HeadUnit>,
    Path((vehicle_id, alert_id)): Path<(String, String)>,
) -> Response {
    let known = unit
        .inbox(&vehicle_id)
        .iter()
        .any(|a| a.alert_id == alert_id);
    if !known {
        return error(
            StatusCode::NOT_FOUND,
            format!("no alert {alert_id} for vehicle {vehicle_id}"),
        );
    }
    let config = &unit.shared.config;
    if let Some(base) = &config.voltcast_url {
        let url = format!("{}/api/alerts/{alert_id}/ack", base.trim_end_matches('/'));
        let mut req = unit
            .shared
            .http
            .post(&url)
            .header("content-type", "application/json")
            .body(json!({ "by": format!("head-unit:{vehicle_id}") }).to_string());
        if let Some(token) = &config.api_token {
            req = req.bearer_auth(token);
        }
        match req.send().await {
            Ok(r) if r.status().is_success() => {}
            Ok(r) => {
                let status = r.status();
                let text = r.text().await.unwrap_or_default();
                return error(
                    StatusCode::BAD_GATEWAY,
                    format!("voltcast refused the acknowledgement ({status}): {text}"),
                );
            }
            Err(e) => {
                return error(
                    StatusCode::BAD_GATEWAY,
                    format!("voltcast unreachable at {url}: {e}"),
                );
            }
        }
    }
    let mut inboxes = unit.shared.inboxes.lock().expect("inbox lock");
    if let Some(a) = inboxes
        .by_vehicle
        .get_mut(&vehicle_id)
        .and_then(|v| v.iter_mut().find(|a| a.alert_id == alert_id))
    {
        a.booked = true;
    }
    Json(json!({ "status": "booked", "alert_id": alert_id })).into_response()
}
