#!/usr/bin/env bash
# End to end on the real binary, with real Prometheus and real headless Chromium:
#  1. `voltcast demo --duration` runs the embedded stack (mock Kafka, simulator, pipeline,
#     head unit, API, metrics);
#  2. Prometheus (Debian package) scrapes it; every PromQL expression in dashboards/
#     must evaluate without error and return data, and every metric the dashboards name
#     must be one voltcast exports;
#  3. Chromium (Debian package, driven by playwright-core) opens a vehicle's head-unit
#     page, sees the alert, clicks "Book service", and the alert must then show as
#     acknowledged in voltcast's GET /api/alerts.
# Installs what it needs. Usage: tests/e2e/demo_e2e.sh (from the repository root).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
WORK=$(mktemp -d /tmp/voltcast-e2e.XXXXXX)
API=127.0.0.1:18088
HEAD=127.0.0.1:18080
PROM=127.0.0.1:19090
DURATION=${E2E_DEMO_SECONDS:-100}
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

need_apt=()
command -v prometheus >/dev/null || need_apt+=(prometheus)
command -v chromium >/dev/null || need_apt+=(chromium)
if ((${#need_apt[@]})); then
  echo "e2e: installing ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
if [ ! -d tests/e2e/node_modules/playwright-core ]; then
  (cd tests/e2e && npm install --silent --no-audit --no-fund >/dev/null)
fi

cargo build --bin voltcast
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/debug/voltcast

echo "e2e: voltcast demo for ${DURATION}s"
(cd "$WORK" && env -u VOLTCAST_CONFIG "$BIN" demo --duration "$DURATION" --batteries 1000 \
  --api-listen "$API" --head-unit-listen "$HEAD" >"$WORK/demo.log" 2>&1) &
pids+=($!)

cat >"$WORK/prometheus.yml" <<YML
global:
  scrape_interval: 2s
  evaluation_interval: 2s
scrape_configs:
  - job_name: voltcast
    static_configs:
      - targets: ["$API"]
YML
prometheus --config.file="$WORK/prometheus.yml" --storage.tsdb.path="$WORK/tsdb" \
  --web.listen-address="$PROM" >"$WORK/prometheus.log" 2>&1 &
pids+=($!)

# Wait for the API, then give the demo time to raise and deliver alerts and Prometheus
# time for rate() windows to fill.
for _ in $(seq 60); do curl -fsS "http://$API/healthz" >/dev/null 2>&1 && break; sleep 1; done
for _ in $(seq 50); do
  kill -0 "${pids[0]}" 2>/dev/null || { echo "e2e: voltcast demo died"; cat "$WORK/demo.log"; exit 1; }
  sleep 1
done

status=0
python3 tests/e2e/check_dashboards.py "http://$PROM" "http://$API" dashboards/grafana/dashboards || status=1
node tests/e2e/book_service.mjs "http://$HEAD" "http://$API" || status=1

if [ $status -ne 0 ]; then
  echo "---- demo log (tail)"; tail -n 40 "$WORK/demo.log"
  echo "---- prometheus log (tail)"; tail -n 20 "$WORK/prometheus.log"
fi
wait "${pids[0]}" || { echo "e2e: voltcast demo exited with an error"; tail -n 40 "$WORK/demo.log"; status=1; }
grep -E "voltcast demo finished" "$WORK/demo.log" || status=1
rm -rf "$WORK"
exit $status
