#!/usr/bin/env bash
# A million damaged messages (bit flips, truncation, huge and non-finite numbers, wrong
# types, deep nesting, invalid UTF-8, duplicate keys, oversize) through Kafka (librdkafka's
# mock cluster) and the whole pipeline: `voltcast bench fuzz` exits with an error unless
# every message became a row or a dead letter, every dead letter is on the dead-letter
# topic with a reason, and nothing panicked. `cargo test` runs 30,000 of them.
# Usage: tests/e2e/fuzz_e2e.sh (from the repository root). FUZZ_MESSAGES, FUZZ_SEED.
set -euo pipefail
cd "$(dirname "$0")/../.."
MESSAGES=${FUZZ_MESSAGES:-1000000}
SEED=${FUZZ_SEED:-$RANDOM}
if [ -z "${VOLTCAST_BIN:-}" ]; then
  cargo build --bin voltcast
fi
BIN=${VOLTCAST_BIN:-${CARGO_TARGET_DIR:-$PWD/target}/debug/voltcast}
echo "fuzz-e2e: $MESSAGES messages, seed $SEED"
VOLTCAST_LOG=warn "$BIN" bench fuzz --messages "$MESSAGES" --seed "$SEED"
