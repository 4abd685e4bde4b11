#!/usr/bin/env bash
# Idempotent set-up on Debian / Raspberry Pi OS: Mosquitto (and ejabberd, a second test broker) from Debian,
# a venv with requirements.txt, the lab console's MQTT.js (console/package-lock.json) and Chromium +
# ChromeDriver for its browser tests.
# Usage: source deploy/bootstrap.sh   (sets REPO, PY and ALLDS_DATA)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
missing=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
command -v mosquitto_sub >/dev/null 2>&1 || missing+=(mosquitto-clients)
python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)  # certs/make-certs.sh
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)  # the unit file test
command -v npm >/dev/null 2>&1 || missing+=(npm)  # the console's pinned MQTT.js
[ -x /usr/bin/chromium ] || missing+=(chromium)  # the console's end-to-end tests (headless)
[ -x /usr/bin/chromedriver ] || missing+=(chromium-driver)
compgen -G "/usr/lib/*/ejabberd-*/ebin/ejabberd.app" >/dev/null || missing+=(ejabberd)  # tests/test_brokers.py (~20 s)
if [ ${#missing[@]} -gt 0 ]; then
  echo "bootstrap: installing ${missing[*]} (apt-get)" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null
  # The tests start their own ejabberd on loopback; the package's system service (XMPP and MQTT on all
  # interfaces) is not wanted on a test machine.
  if [[ " ${missing[*]} " == *" ejabberd "* ]] && [ -d /run/systemd/system ]; then
    systemctl disable --now ejabberd >/dev/null 2>&1 || true
  fi
fi
export PATH="$PATH:/usr/sbin"
VENV="$REPO/.venv"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
stamp="$VENV/.requirements.sha256"
want="$(cat "$REPO/requirements.txt" "$REPO/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "bootstrap: installing Python requirements into $VENV" >&2
  "$VENV/bin/pip" install -q --disable-pip-version-check --upgrade pip
  "$VENV/bin/pip" install -q --disable-pip-version-check -r "$REPO/requirements.txt"
  "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps -e "$REPO"
  echo "$want" > "$stamp"
fi
PY="$VENV/bin/python"
# The console's one run-time dependency, MQTT.js, exactly as pinned in console/package-lock.json (integrity
# checked by npm), copied into console/www/vendor/ so the broker serves it: nothing comes from a CDN at run time.
console_stamp="$REPO/console/node_modules/.lock.sha256"
want="$(sha256sum "$REPO/console/package-lock.json" | cut -d' ' -f1)"
if [ "$(cat "$console_stamp" 2>/dev/null)" != "$want" ] || [ ! -f "$REPO/console/www/vendor/mqtt.min.js" ]; then
  echo "bootstrap: installing the console's MQTT.js (npm ci)" >&2
  (cd "$REPO/console" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error >/dev/null)
  install -D -m 644 "$REPO/console/node_modules/mqtt/dist/mqtt.min.js" "$REPO/console/www/vendor/mqtt.min.js"
  echo "$want" > "$console_stamp"
fi
export PATH="$VENV/bin:$PATH"
ALLDS_DATA="${ALLDS_DATA:-$REPO/../shared/data/ALL_Aria2021}"
ALLDS_DATA="$(cd "$ALLDS_DATA" 2>/dev/null && pwd || echo "$ALLDS_DATA")"
export ALLDS_DATA TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
