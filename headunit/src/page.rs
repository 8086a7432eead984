//! The in-dash screen: plain HTML, CSS and a few lines of script, no build step.
//! The page polls the vehicle's inbox so an alert shows up while the driver looks at it;
//! every value from an alert goes in through `textContent`, never as markup.

/// Text for inclusion in HTML, and in a `<script>` as a JSON string.
fn escape_html(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn js_string(s: &str) -> String {
    serde_json::to_string(s)
        .unwrap_or_else(|_| "\"\"".into())
        .replace('<', "\\u003c")
}

const STYLE: &str = r#"
body { margin: 0; background: #0b0f14; color: #e6edf3; font: 18px/1.4 system-ui, sans-serif; }
header { display: flex; justify-content: space-between; padding: 14px 24px; background: #111821; border-bottom: 1px solid #223; }
header .clock { color: #8b98a5; }
main { padding: 20px 24px; max-width: 900px; }
.card { background: #141c26; border-radius: 14px; padding: 18px 20px; margin-bottom: 16px; border-left: 6px solid #d29922; }
.card.critical { border-left-color: #f85149; }
.card h2 { margin: 0 0 6px; font-size: 22px; }
.card .meta { color: #8b98a5; font-size: 15px; }
.card ul { margin: 8px 0; padding-left: 20px; }
button { background: #238636; color: white; border: 0; border-radius: 10px; padding: 12px 22px; font-size: 18px; cursor: pointer; }
button[disabled] { background: #30363d; cursor: default; }
.empty { color: #8b98a5; }
a { color: #58a6ff; }
"#;

pub fn index(vehicles: &[(String, usize)]) -> String {
    let mut rows = String::new();
    for (v, n) in vehicles {
        let e = escape_html(v);
        rows.push_str(&format!(
            "<li><a href=\"/vehicles/{e}\">{e}</a>: {n} alert(s)</li>"
        ));
    }
    if rows.is_empty() {
        rows.push_str("<li class=\"empty\">No alerts received yet.</li>");
    }
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Head units</title>\
         <style>{STYLE}</style></head><body><header><b>voltcast head-unit simulator</b></header>\
         <main><h1>Vehicles with alerts</h1><ul>{rows}</ul></main></body></html>"
    )
}

pub fn vehicle(vehicle_id: &str) -> String {
    let title = escape_html(vehicle_id);
    let id = js_string(vehicle_id);
    format!(
        r#"<!doctype html><html><head><meta charset="utf-8"><title>Vehicle {title}</title>
<style>{STYLE}</style></head><body>
<header><b>Vehicle {title}</b><span class="clock" id="clock"></span></header>
<main><h1>Battery service</h1><div id="alerts"><p class="empty">No battery alerts.</p></div></main>
<script>
const vehicle = {id};
const base = "/vehicles/" + encodeURIComponent(vehicle);
function el(tag, cls, text) {{
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}}
async function book(id, button) {{
  button.disabled = true;
  button.textContent = "Booking...";
  const r = await fetch(base + "/alerts/" + encodeURIComponent(id) + "/book", {{ method: "POST" }});
  if (!r.ok) {{
    const body = await r.json().catch(() => ({{ error: r.statusText }}));
    button.disabled = false;
    button.textContent = "Book service";
    alert("Booking failed: " + body.error);
    return;
  }}
  await refresh();
}}
async function refresh() {{
  document.getElementById("clock").textContent = new Date().toLocaleTimeString();
  const r = await fetch(base + "/alerts");
  if (!r.ok) return;
  const alerts = await r.json();
  const root = document.getElementById("alerts");
  root.replaceChildren();
  if (alerts.length === 0) root.appendChild(el("p", "empty", "No battery alerts."));
  for (const a of alerts) {{
    const card = el("div", "card " + a.severity);
    card.dataset.alertId = a.alert_id;
    card.appendChild(el("h2", null, a.message));
    const when = a.expected_eol_date ? "Expected end of life: " + a.expected_eol_date : "";
    card.appendChild(el("div", "meta", [a.severity.toUpperCase(), "battery " + a.battery_id, when].filter(Boolean).join(" · ")));
    const ul = el("ul");
    for (const reason of a.reasons || []) ul.appendChild(el("li", null, reason));
    card.appendChild(ul);
    const button = el("button", "book", a.booked ? "Service booked" : "Book service");
    button.disabled = a.booked;
    button.onclick = () => book(a.alert_id, button);
    card.appendChild(button);
    root.appendChild(card);
  }}
}}
refresh();
setInterval(refresh, 2000);
</script></body></html>"#
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn vehicle_ids_cannot_inject_markup_or_script() {
        let page = super::vehicle("</script><b>x");
        assert!(!page.contains("</script><b>"));
        assert!(page.contains("&lt;/script&gt;&lt;b&gt;x"));
        assert!(page.contains("\\u003c/script>\\u003cb>x"));
    }
}
