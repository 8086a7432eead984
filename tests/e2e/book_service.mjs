// Headless Chromium on the head-unit page: the alert is shown, "Book service" is
// clicked, and voltcast's API then lists the alert as acknowledged.
import { chromium } from "playwright-core";

const [head, api] = process.argv.slice(2);
const fail = (m) => { console.error("FAIL book_service:", m); process.exit(1); };

const vehicles = await (await fetch(`${head}/`)).text();
const match = vehicles.match(/href="\/vehicles\/([^"]+)"/);
if (!match) fail("no vehicle has an alert on the head unit");
const vehicle = match[1];

const browser = await chromium.launch({
  executablePath: "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
try {
  const page = await browser.newPage();
  await page.goto(`${head}/vehicles/${vehicle}`);
  const card = page.locator(".card").first();
  await card.waitFor({ timeout: 15000 });
  const text = await card.innerText();
  if (!/Battery .* (rated|end of its rated life)/.test(text)) fail(`unexpected alert text: ${text}`);
  const alertId = await card.getAttribute("data-alert-id");
  await card.getByRole("button", { name: "Book service" }).click();
  await card.getByRole("button", { name: "Service booked" }).waitFor({ timeout: 15000 });
  const listed = await (await fetch(`${api}/api/alerts?status=acknowledged&vehicle=${vehicle}`)).json();
  const acked = listed.alerts.find((a) => a.alert_id === alertId);
  if (!acked) fail(`alert ${alertId} is not acknowledged in GET /api/alerts: ${JSON.stringify(listed)}`);
  await page.screenshot({ path: process.env.E2E_SCREENSHOT || "/tmp/voltcast-head-unit.png" });
  console.log(`book_service: vehicle ${vehicle}, alert ${alertId} shown, booked, acknowledged by ${acked.acknowledged_by}`);
} finally {
  await browser.close();
}
