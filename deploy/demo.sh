#!/usr/bin/env bash
# The main job: set up, start a local Mosquitto (127.0.0.1:1884, lab console on http://127.0.0.1:9001/)
# and the agent with the shipped model, replay the held-out test set from $ALLDS_DATA, print the scores,
# stop both (from a terminal: when Enter is pressed, so the console can be used as long as wanted).
set -euo pipefail
source "$(dirname "$0")/bootstrap.sh"
cd "$REPO"
[ -d "$ALLDS_DATA/Benign" ] || { echo "demo: no ALL_Aria2021 images at $ALLDS_DATA (set ALLDS_DATA)" >&2; exit 2; }
work="$(mktemp -d)"
chmod 755 "$work"
cleanup() {
  [ -n "${agent_pid:-}" ] && kill -TERM "$agent_pid" 2>/dev/null && wait "$agent_pid" 2>/dev/null || true
  [ -n "${broker_pid:-}" ] && kill -TERM "$broker_pid" 2>/dev/null && wait "$broker_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
# The broker serves the console from its working directory (http_dir console/www): a copy in $work, which
# the mosquitto user that a root-started broker drops to can read wherever the repository lives.
mkdir -p "$work/console" && cp -r console/www "$work/console/www" && chmod -R a+rX "$work/console"
(cd "$work" && exec mosquitto -c "$REPO/deploy/mosquitto/demo.conf") > "$work/mosquitto.log" 2>&1 &
broker_pid=$!
sleep 0.5
kill -0 "$broker_pid" 2>/dev/null || { cat "$work/mosquitto.log" >&2; echo "demo: mosquitto did not start (port 1884 or 9001 in use?)" >&2; exit 1; }
"$PY" -m agent --config config/demo.yaml > "$work/agent.log" 2>&1 &
agent_pid=$!
base="allds-location/Devices/allds-zone/allds-device"
status="$(timeout 30 mosquitto_sub -h 127.0.0.1 -p 1884 -t "$base/Status" -C 1 || true)"
[ "$status" = "ONLINE" ] || { cat "$work/agent.log" >&2; echo "demo: agent did not come ONLINE" >&2; exit 1; }
echo "agent ONLINE; watch with: mosquitto_sub -h 127.0.0.1 -p 1884 -v -t '$base/#'" >&2
echo "lab console: http://127.0.0.1:9001/ (open it in a browser on this machine and press Connect)" >&2
"$PY" -m agent.replay data/aria2021/grouped/test.txt --data "$ALLDS_DATA" --config config/demo.yaml \
  --report-dir reports/demo "$@"
echo "report: reports/demo/report.json, confusion_matrix.png, latency_histogram.png" >&2
if [ -t 0 ]; then
  read -r -p "demo: broker, agent and console still running at http://127.0.0.1:9001/ - press Enter to stop " _ || true
fi
