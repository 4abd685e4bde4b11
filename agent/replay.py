"""`replay-testset`: publish a test set to the agent, collect the diagnoses by id, score them.

Images come from a directory, a folder-per-class tree or a file list (such as the committed
held-out split); labels from folder names (Benign/Early/Pre/Pro) or ALL-IDB `_0`/`_1` names.
Requests go out as raw bytes with MQTT 5 Response Topic + Correlation Data (or, with
`--protocol 3.1.1`, as JSON envelopes), at most `--concurrency` in flight.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import logging
import os
import queue
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
from tqdm import tqdm

from agent.config import TOPIC_LEVEL, ConfigError, load
from agent.session import MqttSession, publish_properties
from agent.topics import Topics
from model.data import IMAGE_SUFFIXES, label_from_path, read_list
from model.metrics import binary_metrics, outcome, summary_line

REPLAY_SESSION_EXPIRY_S = 60


@dataclass
class Item:
    """One image of the test set and what came back for it."""

    id: str
    path: Path
    label: int | None
    sent: float = 0.0
    sent_at: float | None = None  # wall clock, for lining answers up with events outside the replay
    latency_ms: float | None = None
    reply: dict | None = None
    duplicates: int = 0
    sha256: str = ""  # of the image sent: a diagnosis names the image it is about
    payload_sha256: str = ""  # of the payload sent (the image, or its JSON envelope): an error names it
    foreign: int = 0  # answers under this id about other bytes (another requester can publish on a reply topic)

    def about_this_image(self, reply: dict) -> bool:
        """A diagnosis of the image sent, or an error about the payload sent (not one about other bytes)."""
        if "diagnosis" in reply:
            return bool(self.sha256) and reply.get("sha256") == self.sha256
        return bool(self.payload_sha256) and reply.get("payload_sha256") == self.payload_sha256


@dataclass
class Report:
    """What a replay produced."""

    items: list[Item]
    metrics: dict = field(default_factory=dict)
    latency_ms: dict = field(default_factory=dict)
    errors: dict = field(default_factory=dict)
    indeterminate: dict = field(default_factory=dict)  # reason -> count: refused, so not scored

    @property
    def missing(self) -> list[Item]:
        return [i for i in self.items if i.reply is None]

    @property
    def duplicates(self) -> int:
        return sum(i.duplicates for i in self.items)

    @property
    def foreign_answers(self) -> int:
        return sum(i.foreign for i in self.items)

    def as_dict(self) -> dict:
        return {"images": len(self.items), "answered": len(self.items) - len(self.missing),
                "missing": [i.id for i in self.missing], "duplicates": self.duplicates,
                "foreign_answers": self.foreign_answers,
                "errors": self.errors, "indeterminate": self.indeterminate, "metrics": self.metrics,
                "latency_ms": self.latency_ms,
                "results": [{"id": i.id, "path": str(i.path), "label": i.label, "sent_at": i.sent_at,
                             "latency_ms": i.latency_ms, "reply": i.reply} for i in self.items]}


def collect_images(source: Path, data_root: Path | None) -> list[Path]:
    """Image paths from a file list (relative to data_root), a directory or a class tree."""
    if source.is_file():
        base = data_root or source.parent
        return [base / p for p in read_list(source)]
    if source.is_dir():
        return sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    raise FileNotFoundError(f"{source}: no such file list or directory")


def private_reply_topic(session: MqttSession, topics: Topics, run: str) -> str:
    """`{base}/Diagnosis/{user name}/{run}`: the answers only this requester may read under the shipped ACL."""
    who = session.broker.username or session.client_id
    if not TOPIC_LEVEL.fullmatch(who):
        who = session.client_id
    return f"{topics.diagnosis}/{who}/replay-{run}"


def replay(session: MqttSession, topics: Topics, paths: list[Path], concurrency: int, timeout: float,
           response_topic: str | None, rate: float | None = None, progress: bool = True) -> Report:
    """Publish every image (at most `rate` per second), wait for each id's answer (or the timeout), score."""
    run = uuid.uuid4().hex[:8]
    items = [Item(f"{run}-{n:05d}", p, label_from_path(p)) for n, p in enumerate(paths)]
    by_id = {i.id: i for i in items}
    replies: queue.Queue[tuple[float, dict]] = queue.Queue()
    reply_topic = response_topic or (private_reply_topic(session, topics, run) if session.v5 else topics.diagnosis)

    def on_reply(message: mqtt.MQTTMessage) -> None:
        try:
            replies.put((time.perf_counter(), json.loads(message.payload)))
        except (ValueError, UnicodeDecodeError):
            pass
        session.ack(message)

    session.subscribe(reply_topic, on_reply)
    session.start()
    if not session.connected.wait(timeout):
        raise ConnectionError(f"no connection to {session.broker.host}:{session.broker.port} within {timeout:.0f} s")
    window = threading.Semaphore(concurrency)
    pending: set[str] = set()
    bar = tqdm(total=len(items), desc="replay", unit="img", disable=not progress)

    def drain(block_s: float) -> None:
        try:
            now, doc = replies.get(timeout=block_s)
        except queue.Empty:
            return
        while True:
            item = by_id.get(str(doc.get("id")))
            if item is not None and not item.about_this_image(doc):
                item.foreign += 1
            elif item is not None:
                if item.reply is None:
                    item.reply, item.latency_ms = doc, (now - item.sent) * 1000
                    pending.discard(item.id)
                    window.release()
                    bar.update()
                else:
                    item.duplicates += 1
            try:
                now, doc = replies.get_nowait()
            except queue.Empty:
                return

    started = time.perf_counter()
    for n, item in enumerate(items):
        while not window.acquire(blocking=False):
            drain(0.05)
        while rate and time.perf_counter() - started < n / rate:
            drain(min(0.05, max(0.0, started + n / rate - time.perf_counter())))
        data = item.path.read_bytes()
        item.sha256 = hashlib.sha256(data).hexdigest()
        item.sent, item.sent_at = time.perf_counter(), time.time()
        pending.add(item.id)
        if session.v5:
            item.payload_sha256 = item.sha256
            props = publish_properties(reply_topic, item.id.encode(), [("name", item.path.name)])
            session.publish(topics.request, data, properties=props)
        else:
            envelope = json.dumps({"id": item.id, "name": item.path.name, "image": base64.b64encode(data).decode()})
            item.payload_sha256 = hashlib.sha256(envelope.encode()).hexdigest()
            session.publish(topics.request, envelope)
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        drain(0.1)
    drain(0.2)  # late duplicates
    bar.close()
    return score(items)


def decided(items: list[Item]) -> list[Item]:
    """Labelled images answered Positive or Negative (Indeterminate answers are refusals, not decisions)."""
    return [i for i in items if i.reply and i.reply.get("diagnosis") in ("Positive", "Negative") and i.label is not None]


def score(items: list[Item]) -> Report:
    """Metrics over the decided, labelled images; refusals by reason; latency percentiles; error counts."""
    report = Report(items)
    labelled = decided(items)
    if labelled:
        report.metrics = binary_metrics([i.label for i in labelled],
                                        [i.reply["diagnosis"] == "Positive" for i in labelled])
    latencies = [i.latency_ms for i in items if i.latency_ms is not None]
    if latencies:
        report.latency_ms = {"p50": float(np.percentile(latencies, 50)), "p95": float(np.percentile(latencies, 95)),
                             "max": float(np.max(latencies))}
    for i in items:
        if i.reply and "error" in i.reply:
            code = i.reply["error"].get("code", "unknown")
            report.errors[code] = report.errors.get(code, 0) + 1
        elif i.reply and i.reply.get("diagnosis") == "Indeterminate":
            reason = str(i.reply.get("reason"))
            report.indeterminate[reason] = report.indeterminate.get(reason, 0) + 1
    return report


def print_report(report: Report, per_image: bool = True) -> None:
    """The original project's per-image lines, then the totals."""
    for i in report.items if per_image else []:
        if i.reply is None:
            print(f"{i.path.name}: no answer")
        elif "error" in i.reply:
            print(f"{i.path.name}: error {i.reply['error'].get('code')}: {i.reply['error'].get('message')}")
        elif i.reply["diagnosis"] == "Indeterminate":
            print(f"{i.path.name}: Indeterminate ({i.reply.get('reason')})")
        elif i.label is None:
            print(f"{i.path.name}: {i.reply['diagnosis']} (no label)")
        else:
            print(f"{i.path.name}: {outcome(i.label, i.reply['diagnosis'] == 'Positive')}")
    answered = len(report.items) - len(report.missing)
    refused = sum(report.indeterminate.values())
    print(f"images {len(report.items)} answered {answered} missing {len(report.missing)} "
          f"duplicates {report.duplicates} errors {sum(report.errors.values())} indeterminate {refused}"
          + (f" ({', '.join(f'{r} {n}' for r, n in sorted(report.indeterminate.items()))})" if refused else ""))
    if report.foreign_answers:
        print(f"{report.foreign_answers} answers about other images ignored (published under replayed ids by another "
              "client: check who may publish on the reply topic)")
    if report.metrics:
        print(summary_line(report.metrics))
    if report.latency_ms:
        lat = report.latency_ms
        print(f"latency ms: p50 {lat['p50']:.2f} p95 {lat['p95']:.2f} max {lat['max']:.2f}")


def write_report_dir(report: Report, out: Path) -> None:
    """`report.json`, a confusion-matrix PNG and a latency histogram PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    labelled = decided(report.items)
    fig, ax = plt.subplots(figsize=(5, 4))
    if labelled:
        ConfusionMatrixDisplay.from_predictions(
            [i.label for i in labelled], [int(i.reply["diagnosis"] == "Positive") for i in labelled],
            labels=[0, 1], display_labels=["Benign", "ALL"], ax=ax, colorbar=False)
    ax.set_title(f"Replay: {len(labelled)} labelled decisions ({sum(report.indeterminate.values())} indeterminate)")
    fig.savefig(out / "confusion_matrix.png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist([i.latency_ms for i in report.items if i.latency_ms is not None], bins=40)
    ax.set_xlabel("end-to-end latency (ms)")
    ax.set_ylabel("images")
    ax.set_title("Replay latency")
    fig.savefig(out / "latency_histogram.png", dpi=100, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="replay-testset", description=__doc__.splitlines()[0])
    parser.add_argument("source", help="file list (e.g. data/aria2021/test.txt), directory or class tree")
    parser.add_argument("--data", help="data root for a file list (default: $ALLDS_DATA)")
    parser.add_argument("--config", default="config/agent.yaml", help="agent config: broker and topics")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight (default: %(default)s)")
    parser.add_argument("--rate", type=float, help="at most this many requests per second")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for answers")
    parser.add_argument("--response-topic", help="MQTT 5 response topic (default: {base}/Diagnosis/{user}/replay-{run}; "
                                                 "the agent accepts only topics its inference.reply_topics allow)")
    parser.add_argument("--protocol", choices=["5", "3.1.1"], help="override broker.protocol")
    parser.add_argument("--json", type=Path, help="write the full report as JSON")
    parser.add_argument("--report-dir", type=Path, help="write report.json and PNG plots here")
    parser.add_argument("--quiet", action="store_true", help="no per-image lines")
    args = parser.parse_args(argv)
    try:
        config = load(args.config)
        if args.protocol:
            config.broker.protocol = args.protocol
        root = args.data or os.environ.get("ALLDS_DATA")
        data_root = Path(root) if root else None
        paths = collect_images(Path(args.source), data_root)
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} listed images do not exist, e.g. {missing[0]}")
        if not paths:
            raise FileNotFoundError(f"{args.source}: no images")
        password = config.password()
    except (ConfigError, FileNotFoundError) as exc:
        print(f"replay-testset: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # MQTT 5: a persistent session of its own, so answers sent while the broker restarts are kept.
    session = MqttSession(config.broker, f"allds-replay-{uuid.uuid4().hex[:8]}", password,
                          persistent=config.broker.protocol == "5", session_expiry_s=REPLAY_SESSION_EXPIRY_S)
    try:
        report = replay(session, Topics.from_config(config), paths, args.concurrency, args.timeout,
                        args.response_topic, args.rate, progress=sys.stderr.isatty())
    except ConnectionError as exc:
        print(f"replay-testset: {exc}", file=sys.stderr)
        return 3
    finally:
        session.stop()
    print_report(report, per_image=not args.quiet)
    if args.json:
        args.json.write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    if args.report_dir:
        write_report_dir(report, args.report_dir)
    if report.missing:
        print("missing ids: " + " ".join(i.id for i in report.missing), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
