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
  index_tansu_headers "$WORK/tansu.db"
}

# tansu 0.6's sqlite engine reads each fetched record's headers with header_fetch.sql,
# which finds them by scanning the whole header table (it has no index), so every fetch
# slows with every header ever produced: dead letters carry five, alert events one. In
# the crash test, each life of an instance replays from its checkpoint and produces its
# dead letters again; with ~3,600 header rows a record cost tansu 0.29 ms (3,400
# records/s for the whole broker, at 100% CPU in sqlite3VdbeExec), the instances sat
# idle waiting on fetches and the run stalled at 33,000 of 188,420 records. An index on
# the lookup's columns (added while the broker is idle, before any record) makes it
# 0.01 ms. A broker defect, like the memory engine's above; Kafka keeps headers inside
# the record batch.
index_tansu_headers() { # DB
  python3 - "$1" <<'PY'
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], timeout=30)
db.execute("create index if not exists header_topition_offset on header (topition, offset_id)")
db.commit()
PY
}
