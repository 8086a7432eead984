//! The head-unit simulator as a webhook receiver, over real HTTP: what it accepts, what
//! it refuses, and what the driver's page shows.

use std::net::SocketAddr;

use serde_json::json;
use voltcast_headunit::signature::{IDEMPOTENCY_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, sign};
use voltcast_headunit::{HeadUnit, HeadUnitConfig};

const SECRET: &str = "test-secret";

async fn start() -> (HeadUnit, SocketAddr) {
    let unit = HeadUnit::new(HeadUnitConfig::new(SECRET), None);
    let addr = unit
        .clone()
        .spawn("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    (unit, addr)
}

async fn post(
    addr: SocketAddr,
    body: &[u8],
    ts: i64,
    signature: &str,
    key: &str,
) -> (u16, serde_json::Value) {
    let r = reqwest::Client::new()
        .post(format!("http://{addr}/vehicles/V7/alerts"))
        .header(TIMESTAMP_HEADER, ts.to_string())
        .header(SIGNATURE_HEADER, signature)
        .header(IDEMPOTENCY_HEADER, key)
        .body(body.to_vec())
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or_default())
}

fn alert(attempt: u32) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "alert_id": "al-1",
        "battery_id": "B7",
        "severity": "warning",
        "message": "Battery B7 is expected to reach its rated 200 cycles in about 12 days.",
        "reasons": ["Driving time up 20% over the last 30 days"],
        "delivery_attempt": attempt,
    }))
    .unwrap()
}

#[tokio::test]
async fn rejects_bad_signatures_stale_timestamps_and_replays_and_dedupes_retries() {
    let (unit, addr) = start().await;
    let now = chrono::Utc::now().timestamp();
    let body = alert(1);

    let (status, err) = post(addr, &body, now, &sign(b"wrong", now, &body), "al-1").await;
    assert_eq!(status, 401, "{err}");
    assert!(err["error"].as_str().unwrap().contains("does not match"));

    let stale = now - 3600;
    let (status, err) = post(
        addr,
        &body,
        stale,
        &sign(SECRET.as_bytes(), stale, &body),
        "al-1",
    )
    .await;
    assert_eq!(status, 401, "{err}");
    assert!(err["error"].as_str().unwrap().contains("timestamp"));

    let good = sign(SECRET.as_bytes(), now, &body);
    let (status, ok) = post(addr, &body, now, &good, "al-1").await;
    assert_eq!((status, ok["status"].as_str()), (200, Some("accepted")));

    // The same request again, byte for byte: a replay. And again with the header dressed
    // differently (another scheme listed first, upper-case hex): the same MAC, a replay.
    let (status, err) = post(addr, &body, now, &good, "al-1").await;
    assert_eq!(status, 409, "{err}");
    let dressed = format!("x=1,v1={}", good.trim_start_matches("v1=").to_uppercase());
    let (status, err) = post(addr, &body, now, &dressed, "al-1").await;
    assert_eq!(status, 409, "{err}");

    // An honest retry (new attempt, new signature) of the same alert: a duplicate.
    let retry = alert(2);
    let (status, dup) = post(
        addr,
        &retry,
        now,
        &sign(SECRET.as_bytes(), now, &retry),
        "al-1",
    )
    .await;
    assert_eq!((status, dup["status"].as_str()), (200, Some("duplicate")));

    // The idempotency key must name the body's alert.
    let third = alert(3);
    let (status, _) = post(
        addr,
        &third,
        now,
        &sign(SECRET.as_bytes(), now, &third),
        "al-2",
    )
    .await;
    assert_eq!(status, 400);

    let inbox = unit.inbox("V7");
    assert_eq!(inbox.len(), 1);
    assert_eq!(inbox[0].alert_id, "al-1");
    let stats = unit.stats();
    assert_eq!((stats.accepted, stats.duplicates, stats.replays), (1, 1, 2));
    assert_eq!(stats.rejected, 3);

    // The page and its data.
    let page = reqwest::get(format!("http://{addr}/vehicles/V7"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("Book service") && page.contains("Vehicle V7"));
    let listed: serde_json::Value = reqwest::get(format!("http://{addr}/vehicles/V7/alerts"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed[0]["battery_id"], "B7");
    // Everything accepted, once, with the counts.
    let received: serde_json::Value = reqwest::get(format!("http://{addr}/received"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(received["alerts"].as_array().unwrap().len(), 1);
    assert_eq!(received["alerts"][0]["alert_id"], "al-1");
    assert_eq!(received["alerts"][0]["vehicle_id"], "V7");
    assert_eq!(received["stats"]["duplicates"], 1);
}

#[tokio::test]
async fn booking_an_unknown_alert_is_a_clear_404() {
    let (_unit, addr) = start().await;
    let r = reqwest::Client::new()
        .post(format!("http://{addr}/vehicles/V1/alerts/al-x/book"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("al-x"));
}
