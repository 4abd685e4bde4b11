"""`python -m agent.publish_model BUNDLE --config agent.yaml [--fleet]`: deliver a signed model bundle
(`python -m model bundle`) to one device, or to every agent of the zone through `model.fleet_topic`,
then wait for each device's `ModelState` and print what each did with it.

Devices of the zone are those whose retained `Status` is ONLINE (or the ones named with --devices).
Exit 0 when every device made the bundle active, 1 when any refused it or did not answer, 2 on bad input.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import queue
import sys
import time
import uuid
from pathlib import Path

from tqdm import tqdm

from agent.config import ConfigError, load
from agent.session import Inbound, MqttSession
from agent.topics import Topics

DISCOVERY_S = 1.5
DONE = ("active", "failed")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent.publish_model", description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path, help="a file made by `python -m model bundle`")
    parser.add_argument("--config", default="config/agent.yaml", help="agent config: broker, device and fleet topic")
    parser.add_argument("--fleet", action="store_true", help="publish on model.fleet_topic (every agent of the zone)")
    parser.add_argument("--devices", nargs="+", help="device ids to wait for (default: the ONLINE ones)")
    parser.add_argument("--retain", action="store_true", help="retain the bundle (agents that start later get it)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the devices")
    args = parser.parse_args(argv)
    try:
        config = load(args.config)
        data = args.bundle.read_bytes()
        password = config.password()
        if args.fleet and not config.model.fleet_topic:
            raise ConfigError("model.fleet_topic: not set, so there is no fleet topic to publish on")
    except (ConfigError, OSError) as exc:
        print(f"publish_model: {exc}", file=sys.stderr)
        return 2
    digest = hashlib.sha256(data).hexdigest()
    topics = Topics.from_config(config)
    h = config.hias
    zone = f"{h.location}/{h.topic_root}/{h.zone}"
    states: queue.Queue[tuple[str, dict]] = queue.Queue()
    online: set[str] = set()
    session = MqttSession(config.broker, f"allds-publish-{uuid.uuid4().hex[:8]}", password, persistent=False)

    def on_state(message: Inbound) -> None:
        try:
            states.put((message.topic.split("/")[-2], json.loads(message.payload)))
        except (ValueError, IndexError):
            pass

    def on_status(message: Inbound) -> None:
        if message.payload == b"ONLINE":
            online.add(message.topic.split("/")[-2])

    session.subscribe(f"{zone}/+/ModelState", on_state)
    session.subscribe(f"{zone}/+/Status", on_status)
    session.start()
    try:
        if not session.connected.wait(args.timeout):
            print(f"publish_model: no connection to {config.broker.host}:{config.broker.port}", file=sys.stderr)
            return 1
        time.sleep(DISCOVERY_S)  # retained Status and ModelState arrive
        devices = set(args.devices or (online if args.fleet else {h.device}))
        if not devices:
            print("publish_model: no ONLINE device in the zone (name them with --devices)", file=sys.stderr)
            return 1
        topic = config.model.fleet_topic if args.fleet else f"{topics.base}/Model"
        session.publish(topic, data, retain=args.retain)
        results: dict[str, dict] = {}
        deadline = time.monotonic() + args.timeout
        with tqdm(total=len(devices), desc=f"{args.bundle.name} -> {len(devices)} device(s)", unit="device") as bar:
            while len(results) < len(devices) and time.monotonic() < deadline:
                try:
                    device, state = states.get(timeout=0.2)
                except queue.Empty:
                    continue
                if device in devices and state.get("bundle") == digest and state.get("state") in DONE:
                    if device not in results:
                        bar.update()
                    results[device] = state
    finally:
        session.stop()
    print(f"bundle {args.bundle.name} sha256 {digest[:12]} on {topic}")
    print(f"{'device':<28} {'state':<8} {'model':<42} reason")
    for device in sorted(devices):
        state = results.get(device, {"state": "no answer"})
        model = f"{state.get('name') or ''} {state.get('version') or ''}".strip()
        print(f"{device:<28} {state['state']:<8} {model:<42} {state.get('reason') or ''}")
    return 0 if all(results.get(d, {}).get("state") == "active" for d in devices) else 1


if __name__ == "__main__":
    sys.exit(main())
