#!/usr/bin/env bash
# Install the AllDS agent as a systemd service (Raspberry Pi OS Bookworm / Debian 12; run as root).
#   deploy/install.sh [--prefix DIR] [--no-systemd]        install or update (idempotent)
#   deploy/install.sh --uninstall [--purge] [--prefix DIR] remove; --purge also removes config, secret, user
# Layout (under --prefix, default /): /opt/allds (code, models, split lists, venv with the LiteRT runtime),
# /etc/allds/agent.yaml (kept if present), /etc/allds/secret (root:allds 0640: the agent reads it, cannot
# change it), /etc/systemd/system/allds-agent.service.
# A first install enables and starts the service. Run again, it changes only what differs from this
# checkout and restarts a running service (try-restart) when code, models, venv or unit changed;
# when nothing differs it changes nothing. ALLDS_SYSTEMCTL names another systemctl (tests record calls).
set -euo pipefail
SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
prefix="" systemd=1 uninstall=0 purge=0
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) prefix="$(realpath -m "$2")"; shift 2 ;;
    --no-systemd) systemd=0; shift ;;
    --uninstall) uninstall=1; shift ;;
    --purge) purge=1; shift ;;
    *) echo "install: unknown option $1" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "install: run as root" >&2; exit 1; }
OPT="$prefix/opt/allds" ETC="$prefix/etc/allds" UNIT="$prefix/etc/systemd/system/allds-agent.service"
SYSTEMCTL="${ALLDS_SYSTEMCTL:-systemctl}"
have_systemd() { [ "$systemd" = 1 ] && { [ -n "${ALLDS_SYSTEMCTL:-}" ] || [ -d /run/systemd/system ]; }; }

if [ "$uninstall" = 1 ]; then
  if have_systemd; then "$SYSTEMCTL" disable --now allds-agent.service 2>/dev/null || true; fi
  rm -rf "$OPT" "$UNIT"
  if have_systemd; then "$SYSTEMCTL" daemon-reload; fi
  if [ "$purge" = 1 ]; then
    rm -rf "$ETC"
    if id allds >/dev/null 2>&1; then userdel allds; fi
  fi
  if [ "$purge" = 1 ]; then echo "install: removed $OPT, $UNIT, $ETC and user allds"
  else echo "install: removed $OPT and $UNIT; kept $ETC (--purge removes it)"; fi
  exit 0
fi

missing=()
python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null
fi
id allds >/dev/null 2>&1 || useradd --system --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin allds

install -d -m 755 "$OPT" "$prefix/etc/systemd/system"
install -d -m 750 -o root -g allds "$ETC"
changed=0  # code, models, venv: a running service must restart to use them
# Code, shipped models and docs: copied only when they differ, files the checkout no longer has removed,
# so a second run changes nothing.
for part in agent model config data docs console/www; do
  mkdir -p "$OPT/$part"
  while read -r f; do
    if ! cmp -s "$SRC/$f" "$OPT/$f"; then install -D -m 644 "$SRC/$f" "$OPT/$f"; changed=1; fi
  done < <(cd "$SRC" && find "$part" -type f ! -path '*/__pycache__/*' ! -name '*.pyc')
  while read -r f; do  # model folders the release does not ship (e.g. delivered ones) are kept
    if [ ! -e "$SRC/$f" ]; then rm -f "$OPT/$f"; changed=1; fi
  done < <(cd "$OPT" && find "$part" -type f ! -path '*/__pycache__/*' ! -name '*.pyc' ! -path 'model/artifacts/*')
done
for f in requirements-runtime.txt pyproject.toml; do
  cmp -s "$SRC/$f" "$OPT/$f" || { install -m 644 "$SRC/$f" "$OPT/$f"; changed=1; }
done
if [ ! -x "$OPT/venv/bin/python" ]; then python3 -m venv "$OPT/venv"; changed=1; fi
want="$(sha256sum "$OPT/requirements-runtime.txt" | cut -d' ' -f1)"
if [ "$(cat "$OPT/venv/.requirements.sha256" 2>/dev/null)" != "$want" ]; then
  "$OPT/venv/bin/pip" install -q --disable-pip-version-check --require-hashes --only-binary=:all: \
    -r "$OPT/requirements-runtime.txt"
  echo "$want" > "$OPT/venv/.requirements.sha256"
  changed=1
fi
# The agent's only writable place (the unit's StateDirectory): the shipped models are seeded into
# models/, where Reload finds them by name and signed deliveries are installed beside them.
STATE="$prefix/var/lib/allds"
install -d -m 700 -o allds -g allds "$STATE" "$STATE/models"
while read -r f; do
  target="$STATE/models/${f#model/artifacts/}"
  if ! cmp -s "$SRC/$f" "$target"; then
    install -d -m 755 -o allds -g allds "$(dirname "$target")"
    install -m 644 -o allds -g allds "$SRC/$f" "$target"; changed=1
  fi
done < <(cd "$SRC" && find model/artifacts -mindepth 2 -type f)
[ -f "$ETC/agent.yaml" ] || install -m 640 -o root -g allds "$SRC/config/agent.yaml" "$ETC/agent.yaml"
# The MQTT password: readable by the service (group allds), writable by root only.
[ -f "$ETC/secret" ] || install -m 640 -o root -g allds /dev/null "$ETC/secret"
chown root:allds "$ETC/secret" && chmod 640 "$ETC/secret"
fresh=0 unit_changed=0
[ -f "$UNIT" ] || fresh=1
cmp -s "$SRC/deploy/allds-agent.service" "$UNIT" || { install -m 644 "$SRC/deploy/allds-agent.service" "$UNIT"; unit_changed=1; }
if have_systemd; then
  if [ "$unit_changed" = 1 ]; then "$SYSTEMCTL" daemon-reload; fi
  if [ "$fresh" = 1 ]; then
    "$SYSTEMCTL" enable --now allds-agent.service
  elif [ "$changed" = 1 ] || [ "$unit_changed" = 1 ]; then
    "$SYSTEMCTL" try-restart allds-agent.service  # only if it runs: a stopped service stays stopped
  fi
fi
echo "install: AllDS agent in $OPT, config $ETC/agent.yaml, secret $ETC/secret, unit $UNIT"
