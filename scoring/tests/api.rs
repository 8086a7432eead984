//! The HTTP API over real HTTP: filters, acknowledgements, batteries, auth, errors,
//! health and metrics.

use std::sync::Arc;

use chrono::Utc;
use serde_json::Value;
use voltcast_forecaster::{FailureRisk, Forecast, ModelKind};
use voltcast_scoring::VoltcastConfig;
use voltcast_scoring::alerts::{AlertConfig, AlertStage};
use voltcast_scoring::forecasting::RiskUpdate;
use voltcast_scoring::pipeline::Services;

fn update(
    battery: &str,
    vehicle: &str,
    day: i32,
    probability: f64,
    days_to_eol: u32,
) -> RiskUpdate {
    RiskUpdate {
        battery_id: Arc::from(battery),
        vehicle_id: Some(Arc::from(vehicle)),
        day,
        age: 1000,
        lifetime: 192.0,
        rated: 200.0,
        model: ModelKind::MstlEts,
        model_version: 3,
        risk: FailureRisk {
            probability,
            expected_cycles: 9.0,
            sd_cycles: 0.8,
            remaining: 8.0,
            days_to_eol: Some(days_to_eol),
            low_confidence: false,
            at_risk: probability >= 0.9,
        },
        forecast: Forecast {
            mean: vec![0.3; 30],
            sd: vec![0.04; 30],
            sum_sd: vec![0.8; 30],
        }
        .into(),
        recent: vec![[0.3, 120.0, 4.0]; 30].into_iter().collect(),
        drivers: ["8.0 of 200 rated cycles left"].into_iter().collect(),
    }
}

struct Api {
    base: String,
    client: reqwest::Client,
    token: Option<&'static str>,
}

impl Api {
    async fn call(&self, method: &str, path: &str) -> (u16, Value) {
        let url = format!("{}{path}", self.base);
        let mut req = match method {
            "POST" => self
                .client
                .post(url)
                .header("content-type", "application/json"),
            "FORM" => self
                .client
                .post(url)
                .header("content-type", "application/x-www-form-urlencoded")
                .body("by=evil"),
            "BARE" => self.client.post(url),
            _ => self.client.get(url),
        };
        if let Some(t) = self.token {
            req = req.bearer_auth(t);
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_batteries_acks_auth_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = VoltcastConfig {
        source: voltcast_scoring::SourceKind::File,
        ..Default::default()
    };
    config.api.listen = "127.0.0.1:0".into();
    config.api.token = "letmein".into();
    config.alerts.store_path = dir.path().join("alerts");
    let services = Services::start(&config).await.unwrap();
    let base = format!("http://{}", services.api_addr.unwrap());
    let mut stage = AlertStage::new(&AlertConfig::default(), services.alerts.clone()).unwrap();
    stage.take(update("B1", "V1", 20_000, 0.95, 20));
    stage.take(update("B2", "V2", 20_000, 0.2, 200));
    stage.take(update("B1", "V1", 20_001, 0.99, 5)); // escalates
    stage.take(update("B3", "V3", 20_001, 0.92, 25));

    let api = Api {
        base: base.clone(),
        client: reqwest::Client::new(),
        token: Some("letmein"),
    };
    let anonymous = Api {
        token: None,
        ..Api {
            base,
            client: reqwest::Client::new(),
            token: None,
        }
    };

    let (s, body) = anonymous.call("GET", "/api/alerts").await;
    assert_eq!(s, 401, "{body}");
    assert!(body["error"].as_str().unwrap().contains("bearer"));
    assert_eq!(anonymous.call("GET", "/healthz").await.0, 200);
    for wrong in ["letmeout", "letme", "letmein2", ""] {
        let guess = Api {
            base: api.base.clone(),
            client: reqwest::Client::new(),
            token: Some(wrong),
        };
        assert_eq!(guess.call("GET", "/api/alerts").await.0, 401, "{wrong:?}");
    }

    let (s, all) = api.call("GET", "/api/alerts").await;
    assert_eq!(s, 200);
    assert_eq!(all["count"], 3, "{all}");
    let (_, b1) = api.call("GET", "/api/alerts?battery=B1").await;
    assert_eq!(b1["count"], 2);
    assert_eq!(b1["alerts"][0]["severity"], "critical", "newest first");
    assert_eq!(b1["alerts"][1]["status"], "escalated");
    let (_, open) = api.call("GET", "/api/alerts?status=open&vehicle=V3").await;
    assert_eq!(open["count"], 1);
    let (_, future) = api.call("GET", "/api/alerts?since=2999-01-01").await;
    assert_eq!(future["count"], 0);

    for (query, word) in [
        ("since=yesterday", "since"),
        ("status=burning", "status"),
        ("limit=0", "limit"),
        ("colour=red", "colour"),
    ] {
        let (s, e) = api.call("GET", &format!("/api/alerts?{query}")).await;
        assert_eq!(s, 400, "{query}: {e}");
        assert!(e["error"].as_str().unwrap().contains(word), "{query}: {e}");
    }

    let id = open["alerts"][0]["alert_id"].as_str().unwrap().to_string();
    // A cross-site form post (or one without a type) acknowledges nothing.
    for how in ["FORM", "BARE"] {
        let (s, e) = api.call(how, &format!("/api/alerts/{id}/ack")).await;
        assert_eq!(s, 415, "{how}: {e}");
        assert!(e["error"].as_str().unwrap().contains("application/json"));
    }
    let (_, still) = api.call("GET", &format!("/api/alerts/{id}")).await;
    assert_eq!(still["status"], "open", "{still}");
    let (s, acked) = api.call("POST", &format!("/api/alerts/{id}/ack")).await;
    assert_eq!(
        (s, acked["status"].as_str()),
        (200, Some("acknowledged")),
        "{acked}"
    );
    let (_, again) = api.call("GET", "/api/alerts?status=acknowledged").await;
    assert_eq!(again["alerts"][0]["alert_id"], id.as_str());
    let superseded = b1["alerts"][1]["alert_id"].as_str().unwrap();
    assert_eq!(
        api.call("POST", &format!("/api/alerts/{superseded}/ack"))
            .await
            .0,
        409
    );
    let (s, e) = api.call("POST", "/api/alerts/al-nope/ack").await;
    assert_eq!(s, 404);
    assert!(e["error"].as_str().unwrap().contains("al-nope"));

    let (s, battery) = api.call("GET", "/api/batteries/B1").await;
    assert_eq!(s, 200);
    assert_eq!(battery["forecast"].as_array().unwrap().len(), 30);
    assert_eq!(battery["history"].as_array().unwrap().len(), 30);
    assert_eq!(battery["model"], "mstl_ets");
    assert_eq!(battery["alerts"].as_array().unwrap().len(), 2);
    assert!(
        battery["forecast"][0]["lower_90"].as_f64() < battery["forecast"][0]["upper_90"].as_f64()
    );
    assert_eq!(api.call("GET", "/api/batteries/B999").await.0, 404);

    let (s, metrics) = anonymous.call("GET", "/metrics").await;
    assert_eq!(s, 200);
    let text = metrics.as_str().unwrap();
    assert!(
        text.contains("voltcast_alerts_raised_total{severity=\"critical\"} 1"),
        "{text}"
    );
    assert!(text.contains("voltcast_alerts_raised_total{severity=\"warning\"} 2"));
    assert!(text.contains("voltcast_batteries_at_risk 2"));
    assert!(
        text.contains("voltcast_battery_days_to_eol_bucket{le=\"7\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("voltcast_top_at_risk_days_to_eol{battery_id=\"B1\",vehicle_id=\"V1\"} 5")
    );
    let _ = Utc::now();
}
