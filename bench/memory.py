"""Peak memory of the agent under a burst of maximum-size requests, against a real local Mosquitto.

    python bench/memory.py [--reps 3] [--burst 64] [--out bench/RESULTS.md]

For each case a fresh agent (`python -m agent`, the shipped defaults unless the case says otherwise)
is started, valid images are published at QoS 1, every answer is awaited, and the agent's peak RSS
(VmHWM in /proc/PID/status) is read. Images, all from the real data set:

* baseline: the held-out 224x224 Aria JPEGs (about 20 kB each);
* max JPEG: mosaics of real smear images, upscaled x2, at the pixel limit, encoded and padded (JPEG
  comment segments) to exactly `inference.max_payload_bytes` — the agent decodes them at 1/8 scale;
* max PNG: a real smear image upscaled (nearest neighbour) to the pixel limit, padded (an ancillary
  chunk) to exactly the payload limit — PNG has no reduced decode, so every pixel is decoded.

*burst* publishes all at once; *window* keeps at most `max_inflight` unanswered, which is what a
broker that honours the agent's Receive Maximum lets through (the broker check measures whether this
one does). Cases compare the shipped defaults with the previous ones (`max_inflight` 32, `max_pixels` 50M).
Medians over --reps runs; the bound is the unit's MemoryMax=400M. With --out the Markdown section
`memory` replaces its previous version in that file (bench/report.py; the rest is kept).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from tqdm import tqdm

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from agent.config import Inference  # noqa: E402
from bench.report import update_section  # noqa: E402
from tests.helpers import BASE, MOSQUITTO, Broker, write_config  # noqa: E402

MEMORY_MAX_MIB = 400  # deploy/allds-agent.service: MemoryMax=400M (systemd: M = MiB)
PACKET_LIMIT = "max_packet_size 10551296"  # as deploy/mosquitto/*.conf
SECTION = "## Memory under a burst of maximum-size requests"
DEFAULTS = Inference()


@dataclass
class Case:
    name: str
    images: str  # "small", "jpeg" or "png"
    inference: dict = field(default_factory=dict)  # overrides of the shipped defaults
    window: bool = False  # the requester keeps at most max_inflight requests unanswered

    def setting(self, key: str):
        return self.inference.get(key, getattr(DEFAULTS, key))


PREVIOUS = {"max_inflight": 32, "max_pixels": 50_000_000}  # the defaults before the busy bound
CASES = [
    # A burst: everything published at once. Mosquitto 2.0.11 (Debian 12) does not hold a client to its
    # Receive Maximum once acknowledgements flow (see receive_maximum_check), so more than max_inflight
    # requests reach the agent; it holds at most max_inflight x max_payload_bytes of them and answers
    # the rest `busy`.
    Case("baseline: 224x224 Aria JPEGs, burst", "small"),
    Case("max JPEG, burst", "jpeg"),
    Case("max PNG, burst", "png"),
    Case("max JPEG, burst, previous defaults", "jpeg", PREVIOUS),
    Case("max PNG, burst, previous defaults", "png", PREVIOUS),
    Case("max PNG, burst, decode_workers 1, max_pixels 25M", "png", {"decode_workers": 1, "max_pixels": 25_000_000}),
    # A window of max_inflight unanswered requests: what a broker that honours Receive Maximum lets reach
    # the agent.
    Case("baseline: 224x224 Aria JPEGs, window", "small", window=True),
    Case("max JPEG, window", "jpeg", window=True),
    Case("max PNG, window", "png", window=True),
]


# ---- images -------------------------------------------------------------------------------
def side_for(pixels: int) -> int:
    """The largest square side whose area is within the pixel limit."""
    return int(pixels ** 0.5)


def pad_jpeg(data: bytes, size: int) -> bytes:
    """Pad a JPEG to `size` bytes (at most 3 short) with comment (COM) segments after the SOI marker."""
    missing = size - len(data)
    if missing < 0:
        raise ValueError("already larger than the target")
    segments = []
    while missing >= 4:  # a segment is FF FE, a 2-byte length (itself included), then the comment
        take = min(missing, 65537)
        if 0 < missing - take < 4:
            take -= 4
        segments.append(b"\xff\xfe" + struct.pack(">H", take - 2) + b" " * (take - 4))
        missing -= take
    return data[:2] + b"".join(segments) + data[2:]


def pad_png(data: bytes, size: int) -> bytes:
    """Pad a PNG to exactly `size` bytes with one private ancillary chunk before IEND."""
    body = size - len(data) - 12
    if body < 0:
        raise ValueError("already larger than the target")
    chunk_type = b"alLd"  # lower-case first letter: ancillary, decoders skip it
    chunk = struct.pack(">I", body) + chunk_type + b"\0" * body
    chunk += struct.pack(">I", zlib.crc32(chunk_type + b"\0" * body) & 0xFFFFFFFF)
    end = data.rindex(b"IEND") - 4
    return data[:end] + chunk + data[end:]


def mosaic(sources: list[Path], side: int, seed: int) -> np.ndarray:
    """A side x side field of real smear images, each upscaled x2."""
    tile = 448
    n = -(-side // tile)
    rng = np.random.default_rng(seed)
    tiles = [cv2.resize(cv2.imread(str(sources[i])), (tile, tile), interpolation=cv2.INTER_CUBIC)
             for i in rng.choice(len(sources), n * n)]
    return np.vstack([np.hstack(tiles[r * n:(r + 1) * n]) for r in range(n)])[:side, :side]


def max_jpeg(sources: list[Path], pixels: int, size: int, seed: int) -> bytes:
    """A JPEG at the pixel limit, at the highest quality that fits, padded to exactly `size` bytes."""
    image = mosaic(sources, side_for(pixels), seed)
    low, high, best = 50, 100, None
    while low <= high:
        quality = (low + high) // 2
        data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes()
        if len(data) <= size:
            best, low = data, quality + 1
        else:
            high = quality - 1
    if best is None:
        raise SystemExit(f"a {pixels} px mosaic does not fit {size} bytes even at quality 50")
    return pad_jpeg(best, size)


def max_png(source: Path, pixels: int, size: int) -> bytes:
    side = side_for(pixels)
    image = cv2.resize(cv2.imread(str(source)), (side, side), interpolation=cv2.INTER_NEAREST)
    data = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 9])[1].tobytes()
    if len(data) > size:
        raise SystemExit(f"a {pixels} px PNG is {len(data)} bytes, over {size}")
    return pad_png(data, size)


def build_images(kind: str, pixels: int, sources: list[Path], distinct: int, cache: dict) -> list[bytes]:
    key = (kind, pixels)
    if key not in cache:
        size = DEFAULTS.max_payload_bytes
        if kind == "small":
            cache[key] = [p.read_bytes() for p in sources[:distinct]]
        elif kind == "jpeg":
            cache[key] = [max_jpeg(sources, pixels, size, seed) for seed in tqdm(range(distinct), desc=f"JPEG {pixels} px")]
        else:
            cache[key] = [max_png(sources[i * 7], pixels, size) for i in tqdm(range(distinct), desc=f"PNG {pixels} px")]
        for data in cache[key]:  # what the agent will see: decodable, within the limits
            assert len(data) <= size
            assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_REDUCED_COLOR_8) is not None
    return cache[key]


# ---- one run ------------------------------------------------------------------------------
def proc_status(pid: int, key: str) -> float:
    """A /proc/PID/status memory figure in MiB."""
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) / 1024 for line in fh if line.startswith(key + ":"))


class Requester:
    """Publishes a burst at QoS 1 and counts the answers by correlation id."""

    def __init__(self, port: int) -> None:
        self.answers: dict[str, dict] = {}
        self.lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.max_inflight_messages_set(1000)
        self.client.on_message = self._on_message
        self.online = threading.Event()
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(f"{BASE}/Diagnosis", qos=1)
        self.client.subscribe(f"{BASE}/Status", qos=1)
        self.client.loop_start()

    def _on_message(self, client, userdata, message) -> None:
        if message.topic.endswith("/Status"):
            if message.payload == b"ONLINE":
                self.online.set()
            return
        answer = json.loads(message.payload)
        with self.lock:
            self.answers[answer.get("id")] = answer

    def burst(self, images: list[bytes], n: int, window: int, timeout: float) -> tuple[float, int]:
        """Publish n requests (cycling through images) with at most `window` unanswered; return seconds
        until all were answered and how many were answered `busy`."""
        self.answers.clear()
        start = time.perf_counter()
        deadline = time.monotonic() + timeout
        for i in range(n):
            while i - len(self.answers) >= window and time.monotonic() < deadline:
                time.sleep(0.001)
            props = Properties(PacketTypes.PUBLISH)
            props.CorrelationData = f"m{i}".encode()
            self.client.publish(f"{BASE}/Inference", images[i % len(images)], qos=1, properties=props)
        while len(self.answers) < n and time.monotonic() < deadline:
            time.sleep(0.01)
        if len(self.answers) < n:
            raise SystemExit(f"{n - len(self.answers)} of {n} requests unanswered after {timeout} s")
        codes = [a["error"].get("code") for a in self.answers.values() if "error" in a]
        if set(codes) - {"busy"}:
            raise SystemExit(f"error answers other than busy: {sorted(set(codes))}")
        return time.perf_counter() - start, len(codes)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def run(case: Case, images: list[bytes], n: int, work: Path) -> dict:
    broker = Broker(work / "broker", extra=PACKET_LIMIT).start()
    agent = None
    try:
        config = write_config(work / "agent.yaml", broker.port, inference=case.inference)
        requester = Requester(broker.port)
        with (work / "agent.log").open("ab") as log:
            agent = subprocess.Popen([sys.executable, "-m", "agent", "--config", str(config)], cwd=REPO, stdout=log,
                                     stderr=subprocess.STDOUT, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
        if not requester.online.wait(120):
            raise SystemExit(f"agent not ONLINE; log: {work / 'agent.log'}")
        time.sleep(1)
        idle = proc_status(agent.pid, "VmRSS")
        seconds, busy = requester.burst(images, n, case.setting("max_inflight") if case.window else n, timeout=900)
        peak = proc_status(agent.pid, "VmHWM")
        requester.close()
        return {"idle": idle, "peak": peak, "seconds": seconds, "busy": busy}
    finally:
        if agent and agent.poll() is None:
            agent.terminate()
            agent.wait(30)
        broker.stop()


def receive_maximum_check(work: Path, receive_maximum: int = 8, n: int = 64, hold_s: float = 0.2) -> int:
    """The most unacknowledged QoS 1 messages the broker had out to a client whose Receive Maximum is
    `receive_maximum` and which acknowledges each message `hold_s` after receiving it (as the agent does
    after answering). A broker that honours MQTT 5 flow control gives at most `receive_maximum`."""
    broker = Broker(work / "broker", extra=PACKET_LIMIT).start()
    state = {"open": 0, "most": 0}
    lock = threading.Lock()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="receive-maximum-check", protocol=mqtt.MQTTv5,
                         manual_ack=True)

    def ack(message) -> None:
        with lock:
            state["open"] -= 1
        client.ack(message.mid, message.qos)

    def on_message(c, userdata, message) -> None:
        with lock:
            state["open"] += 1
            state["most"] = max(state["most"], state["open"])
        threading.Timer(hold_s, ack, (message,)).start()

    try:
        client.on_message = on_message
        props = Properties(PacketTypes.CONNECT)
        props.ReceiveMaximum, props.SessionExpiryInterval = receive_maximum, 60
        client.connect("127.0.0.1", broker.port, clean_start=True, properties=props)
        client.subscribe("check", qos=1)
        client.loop_start()
        time.sleep(0.5)
        publisher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        publisher.max_inflight_messages_set(n)
        publisher.connect("127.0.0.1", broker.port)
        publisher.loop_start()
        for info in [publisher.publish("check", bytes(65536), qos=1) for _ in range(n)]:
            info.wait_for_publish(30)
        time.sleep(n * hold_s / receive_maximum + 2)
        publisher.loop_stop()
        client.loop_stop()
        return state["most"]
    finally:
        broker.stop()


# ---- report -------------------------------------------------------------------------------
def render(rows: list[dict], args, most_unacked: int, broker_version: str) -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    baseline = {r["case"].window: r for r in rows if r["case"].images == "small" and not r["case"].inference}
    lines = [
        SECTION, "",
        f"Machine: {os.cpu_count()} cores ({cpu}), {platform.system()} {platform.release()}, Python "
        f"{platform.python_version()}, {broker_version} with `{PACKET_LIMIT}`. Command: `python bench/memory.py "
        f"--reps {args.reps} --burst {args.burst} --out bench/RESULTS.md`.", "",
        f"Each run: a fresh agent, {args.burst} valid requests published at QoS 1, all answered; peak RSS = VmHWM of "
        f"the agent process; medians of {args.reps} runs (min-max in brackets). Bound: the unit's `MemoryMax=400M` = "
        f"{MEMORY_MAX_MIB} MiB; margin = bound - peak. Max-size images are exactly `max_payload_bytes` = "
        f"{DEFAULTS.max_payload_bytes} bytes and at the case's `max_pixels`: JPEG mosaics of real smear images "
        "(decoded at 1/8 scale), PNG upscaled smear images (decoded whole). *burst*: all published at once; "
        "*window*: at most `max_inflight` unanswered at a time, what a broker that honours the agent's Receive "
        "Maximum lets through. *busy*: answers `busy` (median), requests beyond what the agent holds "
        "(`max_inflight` x `max_payload_bytes` of payloads), answered and acknowledged, to be sent again.", "",
        f"Broker flow control: a client with Receive Maximum 8 that acknowledges each message 0.2 s after receiving it "
        f"had up to **{most_unacked}** unacknowledged messages from this broker (a compliant broker: at most 8).", "",
        "| case | max_inflight | decode_workers | max_pixels | idle RSS MiB | peak RSS MiB | peak vs baseline | "
        "margin to 400 MiB | busy | s for all answers |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        c = r["case"]
        peaks = r["peaks"]
        margin = MEMORY_MAX_MIB - r["peak"]
        lines.append(f"| {c.name} | {c.setting('max_inflight')} | {c.setting('decode_workers')} | "
                     f"{c.setting('max_pixels'):,} | {r['idle']:.0f} | {r['peak']:.0f} ({min(peaks):.0f}-{max(peaks):.0f}) | "
                     f"{r['peak'] / baseline[c.window]['peak']:.2f}x | {margin:+.0f} MiB ({margin / MEMORY_MAX_MIB:+.0%}) | "
                     f"{r['busy']:.0f} | {r['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("ALLDS_DATA", str(REPO.parent / "shared/data/ALL_Aria2021")))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--burst", type=int, default=64, help="requests per burst")
    parser.add_argument("--distinct", type=int, default=16, help="distinct images per kind (the burst cycles them)")
    parser.add_argument("--out", type=Path, help="also write the Markdown section into this file")
    args = parser.parse_args()
    data = Path(args.data)
    sources = [data / p for p in (REPO / "data/aria2021/grouped/test.txt").read_text().split()]
    work = Path(tempfile.mkdtemp(prefix="allds-memory-"))
    os.chmod(work, 0o755)
    cache: dict = {}
    rows = []
    for case in CASES:
        images = build_images(case.images, case.setting("max_pixels"), sources, args.distinct, cache)
        results = [run(case, images, args.burst, work / f"{len(rows)}-{rep}") for rep in range(args.reps)]
        row = {"case": case, "peaks": [r["peak"] for r in results],
               **{k: statistics.median(r[k] for r in results) for k in ("idle", "peak", "seconds", "busy")}}
        rows.append(row)
        print(f"{case.name}: peak {row['peak']:.0f} MiB {row['peaks']}, idle {row['idle']:.0f} MiB, "
              f"burst {row['seconds']:.1f} s, busy {row['busy']}", flush=True)
    most_unacked = receive_maximum_check(work / "receive-maximum")
    print(f"broker check: up to {most_unacked} unacknowledged at Receive Maximum 8", flush=True)
    version = subprocess.run([MOSQUITTO, "-h"], capture_output=True, text=True).stdout.splitlines()[0]
    section = render(rows, args, most_unacked, version.replace("mosquitto version", "Mosquitto"))
    print(section)
    if args.out:
        update_section(args.out, "memory", section)


if __name__ == "__main__":
    main()
