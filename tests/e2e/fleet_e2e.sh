#!/usr/bin/env bash
# One fleet-wide alert view, end to end: two `voltcast run` processes share a 4-partition
# telemetry topic on a tansu broker process (one consumer group), and their webhooks go
# to one head unit, H, whose "Book service" calls instance A's API only:
#  1. each instance raises its own batteries' alerts, and both APIs list them all (each
#     reads the whole alerts topic);
#  2. headless Chromium opens H's page of a vehicle whose alert instance B raised and
#     clicks "Book service": A takes the acknowledgement (it knows the alert only from
#     the topic), publishes it, and B, the battery's owner, lists it acknowledged.
# Installs what it needs (tansu once into a cache folder, like crash_e2e.sh; Chromium).
# Usage: tests/e2e/fleet_e2e.sh (from the repository root). FLEET_BATTERIES, FLEET_DAYS.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
BATTERIES=${FLEET_BATTERIES:-400}
DAYS=${FLEET_DAYS:-300}
BROKER=127.0.0.1:19292
HEAD=127.0.0.1:18581
A_API=127.0.0.1:18591
B_API=127.0.0.1:18592
SECRET=fleet-e2e-webhook-secret
WORK=$(mktemp -d /tmp/voltcast-fleet.XXXXXX)
say() { echo "fleet-e2e: $*"; }
# shellcheck source=tests/e2e/tansu_lib.sh
source tests/e2e/tansu_lib.sh
if ! command -v chromium >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi
if [ ! -d tests/e2e/node_modules/playwright-core ]; then
  (cd tests/e2e && npm install --silent --no-audit --no-fund >/dev/null)
fi
metric() { metric_at "$@"; } # HOST:PORT NAME

start_tansu "$BROKER" battery-telemetry:4 battery-alerts:4 battery-forecasts:4 battery-telemetry-dlq:1

"$BIN" head-unit --listen "$HEAD" --secret "$SECRET" --voltcast-url "http://$A_API" \
  >"$WORK/head-unit.log" 2>&1 &
pids+=($!)
wait_port "$HEAD"

"$BIN" simulate --batteries "$BATTERIES" --days "$DAYS" --seed 7 --kafka "$BROKER" \
  >"$WORK/simulate.log" 2>&1
say "$(tail -n 1 "$WORK/simulate.log")"
messages=$(grep -o '[0-9]* messages' "$WORK/simulate.log" | tail -n 1 | cut -d' ' -f1)

start() { # NAME API
  mkdir -p "$WORK/$1"
  env -u VOLTCAST_CONFIG \
    VOLTCAST_KAFKA__BROKERS="$BROKER" \
    VOLTCAST_KAFKA__GROUP_ID=fleet \
    VOLTCAST_KAFKA__PROPERTIES__SESSION_TIMEOUT_MS=6000 \
    VOLTCAST_KAFKA__PROPERTIES__HEARTBEAT_INTERVAL_MS=500 \
    VOLTCAST_KAFKA__PROPERTIES__PARTITION_ASSIGNMENT_STRATEGY=range \
    VOLTCAST_CHECKPOINT__PATH="$WORK/checkpoint" \
    VOLTCAST_ARCHIVE__PATH= \
    VOLTCAST_ALERTS__STORE_PATH="$WORK/$1/alerts" \
    VOLTCAST_WEBHOOK__OUTBOX_PATH="$WORK/$1/outbox" \
    VOLTCAST_WEBHOOK__URL_TEMPLATE="http://$HEAD/vehicles/{vehicle_id}/alerts" \
    VOLTCAST_WEBHOOK__SECRET="$SECRET" \
    VOLTCAST_API__LISTEN="$2" \
    "$BIN" run >"$WORK/$1/run.log" 2>&1 &
  pids+=($!)
}
start a "$A_API"
start b "$B_API"
wait_port "$A_API"
wait_port "$B_API"

done=0
for _ in $(seq 300); do
  consumed=$(($(metric "$A_API" voltcast_records_consumed_total) + $(metric "$B_API" voltcast_records_consumed_total)))
  depth=$(($(metric "$A_API" voltcast_outbox_depth) + $(metric "$B_API" voltcast_outbox_depth)))
  if [ "$consumed" -ge "$messages" ] && [ "$depth" -eq 0 ]; then done=1; break; fi
  sleep 1
done
[ $done -eq 1 ] || { say "the instances consumed $consumed of $messages in 300 s"; tail -n 20 "$WORK"/*/run.log; exit 1; }
sleep 3 # the last days close, their alerts are published and read back

# 1. Both APIs list every alert; each instance raised some.
python3 - "$WORK" "http://$A_API" "http://$B_API" >"$WORK/target" <<'PY'
import glob, json, sys, time, urllib.request
work, a, b = sys.argv[1:]
def own(name):
    latest = {}
    for line in open(f"{work}/{name}/alerts/alerts.jsonl"):
        if line.strip():
            x = json.loads(line)
            latest[x["alert_id"]] = x
    return latest
def listed(api):
    with urllib.request.urlopen(f"{api}/api/alerts?limit=1000000") as r:
        return {x["alert_id"] for x in json.load(r)["alerts"]}
own_a, own_b = own("a"), own("b")
if not own_a or not own_b:
    sys.exit(f"fleet-e2e: FAIL: each instance should raise alerts: A {len(own_a)}, B {len(own_b)}")
union = set(own_a) | set(own_b)
for _ in range(100):
    in_a, in_b = listed(a), listed(b)
    if in_a == union and in_b == union:
        break
    time.sleep(0.2)
else:
    sys.exit(f"fleet-e2e: FAIL: views differ after 20 s: A lists {len(in_a)}, B {len(in_b)}, raised {len(union)}")
print(f"fleet-e2e: A raised {len(own_a)}, B raised {len(own_b)}; both APIs list all {len(union)}", file=sys.stderr)
# B's open alerts with a vehicle, the newest first: one to book through A.
for x in sorted(own_b.values(), key=lambda x: x["as_of_day"], reverse=True):
    if x["status"] == "open" and x["vehicle_id"]:
        print(x["vehicle_id"], x["alert_id"])
        break
else:
    sys.exit("fleet-e2e: FAIL: B has no open alert to book")
PY
read -r vehicle alert <"$WORK/target"
say "booking $alert (vehicle $vehicle, raised by B) on the head unit, which calls A"

# 2. The browser flow through A, checked at B.
status=0
node tests/e2e/book_service.mjs "http://$HEAD" "http://$A_API" "$vehicle" "$alert" "http://$B_API" || status=1
if [ $status -ne 0 ]; then
  for n in a b; do echo "---- $n run log (tail)"; tail -n 20 "$WORK/$n/run.log"; done
  say "kept $WORK"
else
  rm -rf "$WORK"
fi
exit $status
