#!/usr/bin/env bash
# The test suite: set-up (idempotent), lint, then pytest against real Mosquitto brokers.
set -euo pipefail
source "$(dirname "$0")/../deploy/bootstrap.sh"
cd "$REPO"
ruff check .
exec "$PY" -m pytest "$@"
