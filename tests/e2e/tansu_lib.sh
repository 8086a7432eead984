# Shared by the end-to-end scripts that run separate `voltcast run` processes against a
# tansu broker process. Source it after setting WORK and defining `say`; it sets TANSU
# and BIN and keeps the background processes in `pids` (killed on exit).

ROOT=${ROOT:-$PWD}
TOOLS=${VOLTCAST_TOOLS:-$HOME/.cache/voltcast-tools}
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

if [ ! -x "$TOOLS/bin/tansu" ]; then
  say "installing tansu into $TOOLS (once, ~15-20 minutes)"
  cargo install tansu --locked --features dynostore,libsql --root "$TOOLS" --quiet
fi
TANSU=$TOOLS/bin/tansu
# VOLTCAST_BIN: a binary built before (so a build in the clone meanwhile does not swap
# it under the running test).
if [ -z "${VOLTCAST_BIN:-}" ]; then
  cargo build --bin voltcast
fi
BIN=${VOLTCAST_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/debug/voltcast}

wait_port() { # host:port
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/${1%:*}/${1#*:}") 2>/dev/null && return 0
    sleep 0.2
  done
  say "nothing listens on $1"; return 1
}

metric_at() { # HOST:PORT NAME: the sum of a metric's samples (0 when absent)
  { curl -fsS "http://$1/metrics" 2>/dev/null || true; } |
    awk -v m="$2" '$1 == m || index($1, m "{") == 1 { s += $2 } END { printf "%d\n", s }'
}

# start_tansu BROKER TOPIC:PARTITIONS...: a broker process in $WORK, and its topics.
# tansu 0.6's memory engine (memory://) answers a fetch from an offset inside a record
# batch with the batches after it: a consumer resuming from a checkpoint mid-batch would
# silently skip the rest of that batch (a broker defect; Kafka returns the whole batch
# and the client drops what precedes the offset). Its sqlite engine fetches by record.
start_tansu() {
  local broker=$1; shift
  (cd "$WORK" && exec "$TANSU" broker --listener-url "tcp://$broker" \
    --advertised-listener-url "tcp://$broker" --storage-engine sqlite://tansu.db) \
    >"$WORK/tansu.log" 2>&1 &
  pids+=($!)
  wait_port "$broker"
  for t in "$@"; do
    "$TANSU" topic create --broker "tcp://$broker" --partitions "${t#*:}" "${t%:*}" >/dev/null
  done
}
