// Headless Chromium on the head-unit page: the alert is shown, "Book service" is
// clicked, and voltcast's API then lists the alert as acknowledged.
// Usage: node book_service.mjs HEAD_UNIT_URL API_URL [VEHICLE ALERT_ID OWNER_API_URL]
// With the optional three: that vehicle's card of that alert is booked, and the instance
// owning the battery (OWNER_API_URL, not the one the head unit calls) must list the
// acknowledgement too, within 20 s (it travels through the alerts topic).
import { chromium } from "playwright-core";

const [head, api, wantVehicle, wantAlert, ownerApi] = process.argv.slice(2);
const fail = (m) => { console.error("FAIL book_service:", m); process.exit(1); };
const acknowledged = async (base, vehicle, alertId) => {
  const listed = await (await fetch(`${base}/api/alerts?status=acknowledged&vehicle=${vehicle}`)).json();
  return listed.alerts.find((a) => a.alert_id === alertId);
};

let vehicle = wantVehicle;
if (!vehicle) {
  const vehicles = await (await fetch(`${head}/`)).text();
  const match = vehicles.match(/href="\/vehicles\/([^"]+)"/);
  if (!match) fail("no vehicle has an alert on the head unit");
  vehicle = match[1];
}

const browser = await chromium.launch({
  executablePath: "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
try {
  const page = await browser.newPage();
  await page.goto(`${head}/vehicles/${vehicle}`);
  const card = wantAlert
    ? page.locator(`.card[data-alert-id="${wantAlert}"]`)
    : page.locator(".card").first();
  await card.waitFor({ timeout: 15000 });
  const text = await card.innerText();
  if (!/Battery .* (rated|end of its rated life)/.test(text)) fail(`unexpected alert text: ${text}`);
  const alertId = await card.getAttribute("data-alert-id");
  await card.getByRole("button", { name: "Book service" }).click();
  await card.getByRole("button", { name: "Service booked" }).waitFor({ timeout: 15000 });
  const acked = await acknowledged(api, vehicle, alertId);
  if (!acked) fail(`alert ${alertId} is not acknowledged in ${api}/api/alerts`);
  if (ownerApi) {
    let owned;
    for (let i = 0; i < 100 && !owned; i++) {
      owned = await acknowledged(ownerApi, vehicle, alertId);
      if (!owned) await new Promise((r) => setTimeout(r, 200));
    }
    if (!owned) fail(`the owner (${ownerApi}) does not list alert ${alertId} as acknowledged within 20 s`);
  }
  await page.screenshot({ path: process.env.E2E_SCREENSHOT || "/tmp/voltcast-head-unit.png" });
  console.log(`book_service: vehicle ${vehicle}, alert ${alertId} shown, booked through ${api}, acknowledged by ${acked.acknowledged_by}${ownerApi ? `, and at the owner ${ownerApi}` : ""}`);
} finally {
  await browser.close();
}
