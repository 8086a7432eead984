#!/usr/bin/env bash
# voltcast forecast against statsforecast (AutoETS, AutoARIMA) and Prophet on one
# simulated fleet with seasons; prints a table (see forecast_peers.py). Installs the peers
# from PyPI once into a virtualenv outside the clone (VOLTCAST_TOOLS, default
# ~/.cache/voltcast-tools). Usage: bench/forecast_peers.sh [--batteries N] [--days D]
# [--seed S] [--skip-prophet]; VOLTCAST_BIN to use a binary built before (e.g. release).
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS=${VOLTCAST_TOOLS:-$HOME/.cache/voltcast-tools}
VENV=$TOOLS/peers
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import statsforecast, prophet" 2>/dev/null; then
  echo "forecast peers: installing statsforecast and prophet into $VENV (once)"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q statsforecast prophet pandas
fi
if [ -z "${VOLTCAST_BIN:-}" ]; then
  cargo build --bin voltcast
fi
BIN=${VOLTCAST_BIN:-${CARGO_TARGET_DIR:-$PWD/target}/debug/voltcast}
WORK=$(mktemp -d /tmp/voltcast-peers.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
"$VENV/bin/python" bench/forecast_peers.py --voltcast "$BIN" --work "$WORK" "$@"
