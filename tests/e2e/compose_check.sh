#!/usr/bin/env bash
# Static checks of docker-compose.yml (see check_compose.py). Installs Debian's
# docker-compose when missing. Usage: tests/e2e/compose_check.sh (from the repo root).
set -euo pipefail
cd "$(dirname "$0")/../.."
if ! command -v docker-compose >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends docker-compose python3-yaml >/dev/null
fi
python3 -c 'import yaml' 2>/dev/null || pip install -q pyyaml
cargo build --bin voltcast
python3 tests/e2e/check_compose.py "${CARGO_TARGET_DIR:-$PWD/target}/debug/voltcast"
