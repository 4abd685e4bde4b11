#!/usr/bin/env bash
# The Pi's software stack, proven without a Pi (Debian 12 x86_64, as root): an arm64 Debian bookworm
# userland (debootstrap + qemu-user-static, Python 3.11) with requirements-runtime.txt in a venv, then
#  (a) every shipped .tflite artifact on the served model's held-out list data/aria2021/grouped/test.txt, there and here:
#      decision agreement and max |ΔP| per artifact (rule: deploy/pi_check.py);
#  (b) the agent started inside the userland against a Mosquitto here (127.0.0.1, ephemeral port),
#      20 test images replayed from here: its answers must equal those of the agent run here.
# Exits 1 on any mismatch, 2 on a missing prerequisite. Emulation is slow: no timing comes from it.
#   deploy/pi-check.sh [--rebuild] [--list FILE]
# --rebuild builds the userland afresh; --list replaces the held-out list (paths relative to ALLDS_DATA),
# for a quicker look.
# Environment: ALLDS_DATA (images), ALLDS_PI_ROOTFS (cached userland, default ~/.cache/allds/pi-rootfs),
# ALLDS_PI_MIRROR (Debian mirror, default http://deb.debian.org/debian), ALLDS_PI_CPU (the emulated CPU,
# default cortex-a72, the Pi 4's).
set -euo pipefail
die() { echo "pi-check: $*" >&2; exit 2; }
rebuild=0 LIST=data/aria2021/grouped/test.txt
while [ $# -gt 0 ]; do
  case "$1" in
    --rebuild) rebuild=1; shift ;;
    --list) [ -f "${2:-}" ] || die "--list needs a file list"; LIST="$(realpath "$2")"; shift 2 ;;
    *) die "unknown option $1 (usage: deploy/pi-check.sh [--rebuild] [--list FILE])" ;;
  esac
done
[ "$(id -u)" = 0 ] || die "run as root (debootstrap, chroot and binfmt_misc need it)"
source "$(dirname "$0")/bootstrap.sh"
cd "$REPO"
for tool in debootstrap:debootstrap qemu-aarch64-static:qemu-user-static update-binfmts:binfmt-support \
            unshare:util-linux flock:util-linux; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || die "${tool%%:*} not found: apt-get install ${tool#*:}"
done
[ -f "$ALLDS_DATA/$(head -n 1 "$LIST")" ] || die "no ALL_Aria2021 images at $ALLDS_DATA (set ALLDS_DATA)"
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
  mount binfmt_misc -t binfmt_misc /proc/sys/fs/binfmt_misc 2>/dev/null || die "cannot mount binfmt_misc (kernel support missing?)"
fi
[ "$(head -n 1 /proc/sys/fs/binfmt_misc/qemu-aarch64 2>/dev/null)" = enabled ] || update-binfmts --enable qemu-aarch64 \
  || die "cannot enable the qemu-aarch64 binfmt handler (update-binfmts --enable qemu-aarch64)"

ROOTFS="${ALLDS_PI_ROOTFS:-${XDG_CACHE_HOME:-$HOME/.cache}/allds/pi-rootfs}"
MIRROR="${ALLDS_PI_MIRROR:-http://deb.debian.org/debian}"
PACKAGES=python3,python3-venv
KEY="bookworm arm64 minbase $PACKAGES"
VENV=/opt/allds-venv
mkdir -p "$(dirname "$ROOTFS")"
exec 9>"$ROOTFS.lock"
flock -n 9 || { echo "pi-check: waiting for another pi-check using $ROOTFS" >&2; flock 9; }
work="" agent_pid="" broker_pid=""
cleanup() {
  [ -n "$agent_pid" ] && kill -TERM "$agent_pid" 2>/dev/null && wait "$agent_pid" 2>/dev/null
  [ -n "$broker_pid" ] && kill -TERM "$broker_pid" 2>/dev/null && wait "$broker_pid" 2>/dev/null
  [ -n "$work" ] && rm -rf "$work"
  return 0
}
trap cleanup EXIT
log() { echo "pi-check: [$(date +%T), ${SECONDS} s] $*" >&2; }
fail() { echo "pi-check: $*" >&2; exit 1; }
# PI=(...) command...: run a command inside the userland, emulating the Pi 4's Cortex-A72 (so LiteRT's
# XNNPACK picks the kernels a Pi 4 runs). Its mounts (/proc, /sys, the images read-only) live in a private
# mount namespace that ends with the command, so nothing stays mounted in the cached tree.
PI=(nice -n 10 unshare --mount --propagation private -- /bin/bash -c '
  root=$1 data=$2; shift 2
  mount -t proc proc "$root/proc" && mount -t sysfs sysfs "$root/sys" && mount --bind -o ro "$data" "$root/mnt/allds-data" || exit 2
  exec chroot "$root" /usr/bin/env -i QEMU_CPU="${ALLDS_PI_CPU:-cortex-a72}" PATH='"$VENV"'/bin:/usr/bin:/bin HOME=/root LANG=C.UTF-8 \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt PYTHONDONTWRITEBYTECODE=1 "$@"' _ "$ROOTFS" "$ALLDS_DATA")

if [ "$rebuild" = 1 ] || [ "$(cat "$ROOTFS/.allds-rootfs" 2>/dev/null)" != "$KEY" ]; then
  awk -v d="$ROOTFS" 'index($2, d) == 1 { exit 1 }' /proc/self/mounts || die "something is mounted under $ROOTFS"
  rm -rf "$ROOTFS" "$ROOTFS.partial"
  log "building the arm64 bookworm userland in $ROOTFS (debootstrap under qemu, a few minutes)"
  nice -n 10 debootstrap --arch=arm64 --variant=minbase --include="$PACKAGES" bookworm "$ROOTFS.partial" "$MIRROR" \
    > "$ROOTFS.debootstrap.log" 2>&1 || { tail -n 20 "$ROOTFS.debootstrap.log" >&2; die "debootstrap failed (log: $ROOTFS.debootstrap.log)"; }
  mkdir -p "$ROOTFS.partial/mnt/allds-data"
  echo "$KEY" > "$ROOTFS.partial/.allds-rootfs"
  mv "$ROOTFS.partial" "$ROOTFS"
fi
mkdir -p "$ROOTFS/etc/ssl/certs"
cp /etc/resolv.conf "$ROOTFS/etc/resolv.conf"  # pip inside reaches PyPI through this machine's resolver
cp /etc/ssl/certs/ca-certificates.crt "$ROOTFS/etc/ssl/certs/ca-certificates.crt"

want="$(sha256sum requirements-runtime.txt | cut -d' ' -f1)"
if [ "$(cat "$ROOTFS$VENV/.requirements.sha256" 2>/dev/null)" != "$want" ]; then
  log "installing requirements-runtime.txt into $VENV of the userland (aarch64 wheels)"
  rm -rf "${ROOTFS:?}$VENV"
  cp requirements-runtime.txt "$ROOTFS/opt/allds-requirements.txt"
  "${PI[@]}" /usr/bin/python3 -m venv "$VENV"
  # -r alone: pip turns on --require-hashes by itself when the file carries hashes.
  "${PI[@]}" pip install -q --disable-pip-version-check --no-cache-dir --only-binary=:all: -r /opt/allds-requirements.txt \
    || die "pip install -r requirements-runtime.txt failed inside the arm64 userland"
  echo "$want" > "$ROOTFS$VENV/.requirements.sha256"
fi

# This run's copy of the code, shipped models and split lists, inside the userland's /tmp.
work="$(mktemp -d "$ROOTFS/tmp/allds-check.XXXXXX")"
inner="/tmp/$(basename "$work")"
mkdir "$work/app"
tar -C "$REPO" --exclude=__pycache__ -cf - agent model data deploy/pi_check.py | tar -C "$work/app" -xf -
grep -v '^#' "$LIST" | grep . > "$work/list.txt"
userland="$("${PI[@]}" python -c 'import platform; print(platform.machine(), "Python", platform.python_version())')"
[ "${userland%% *}" = aarch64 ] || die "the userland runs as ${userland%% *}, not aarch64"
log "userland: $userland, $("${PI[@]}" python -c 'import importlib.metadata as m; print("ai-edge-litert", m.version("ai-edge-litert"))')"

# (a) every shipped .tflite on the held-out list, here and there.
log "(a) shipped artifacts on $(wc -l < "$work/list.txt") images of $LIST: x86_64"
PYTHONPATH="$REPO" nice -n 10 "$PY" deploy/pi_check.py predict "$work/list.txt" --data "$ALLDS_DATA" --out "$work/x86_64.json" \
  || fail "the artifacts did not run on x86_64"
log "(a) the same under arm64 emulation"
"${PI[@]}" env PYTHONPATH="$inner/app" python "$inner/app/deploy/pi_check.py" predict "$inner/list.txt" \
  --data /mnt/allds-data --out "$inner/aarch64.json" || fail "the artifacts did not run inside the arm64 userland"
status=0
PYTHONPATH="$REPO" "$PY" deploy/pi_check.py compare "$work/x86_64.json" "$work/aarch64.json" || status=1

# (b) the agent inside the userland and the agent here, each answering the same 20 replayed images.
port="$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
printf 'listener %s 127.0.0.1\nallow_anonymous true\nuser root\n' "$port" > "$work/mosquitto.conf"
mosquitto -c "$work/mosquitto.conf" > "$work/mosquitto.log" 2>&1 &
broker_pid=$!
# 10 benign and 10 ALL images spread over the list.
awk '/^Benign\// { if (b++ % 7 == 0 && nb < 10) { print; nb++ } next } { if (m++ % 41 == 0 && nm < 10) { print; nm++ } }' \
  "$work/list.txt" > "$work/replay.txt"
for arch in aarch64 x86_64; do
  printf 'hias: {device: pi-check-%s, name: pi-check-%s}\nbroker: {host: 127.0.0.1, port: %s}\nlogging: {level: INFO}\n' \
    "$arch" "$arch" "$port" > "$work/agent-$arch.yaml"
  log "(b) agent on $arch"
  if [ "$arch" = aarch64 ]; then
    "${PI[@]}" env PYTHONPATH="$inner/app" python -m agent --config "$inner/agent-$arch.yaml" > "$work/agent-$arch.log" 2>&1 &
  else
    PYTHONPATH="$REPO" "$PY" -m agent --config "$work/agent-$arch.yaml" > "$work/agent-$arch.log" 2>&1 &
  fi
  agent_pid=$!
  state=""
  for _ in $(seq 120); do  # up to 10 minutes: interpreters, NumPy, OpenCV and LiteRT start slowly under emulation
    state="$(mosquitto_sub -h 127.0.0.1 -p "$port" -t "allds-location/Devices/allds-zone/pi-check-$arch/Status" -C 1 -W 5 2>/dev/null || true)"
    [ "$state" = ONLINE ] && break
    kill -0 "$agent_pid" 2>/dev/null || break
  done
  [ "$state" = ONLINE ] || { tail -n 20 "$work/agent-$arch.log" >&2; fail "the $arch agent did not come ONLINE"; }
  PYTHONPATH="$REPO" "$PY" -m agent.replay "$work/replay.txt" --data "$ALLDS_DATA" --config "$work/agent-$arch.yaml" \
    --timeout 600 --concurrency 4 --quiet --json "$work/replay-$arch.json" > "$work/replay-$arch.out" \
    || { cat "$work/replay-$arch.out" >&2; status=1; }
  kill -TERM "$agent_pid" && wait "$agent_pid" || { tail -n 20 "$work/agent-$arch.log" >&2; status=1; }
  agent_pid=""
done
PYTHONPATH="$REPO" "$PY" deploy/pi_check.py answers "$work/replay-x86_64.json" "$work/replay-aarch64.json" || status=1
if [ "$status" = 0 ]; then echo "pi-check: PASS (Debian bookworm userland on $userland under qemu)"
else echo "pi-check: FAIL (see above)"; fi
exit "$status"
