"""Signed model delivery over a real broker: a good bundle becomes active on one device and, by one
publish on the fleet topic, on a pool of two; every bad bundle fails and the old model serves on;
Rollback; a restart serves the last active model."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time

import pytest

from model import bundle as b
from model.classifier import DEFAULT_ARTIFACT
from tests.helpers import BASE, REPO, Client, write_config

MODEL, MODEL_STATE, COMMANDS = f"{BASE}/Model", f"{BASE}/ModelState", f"{BASE}/Commands"
INFERENCE, DIAGNOSIS = f"{BASE}/Inference", f"{BASE}/Diagnosis"
FLEET = "allds-location/Devices/allds-zone/Fleet/Models"
SHIPPED = DEFAULT_ARTIFACT.parent.parent


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, data_root) -> dict:
    """A good bundle of allds2020 and the bad ones, signed with the trusted key unless said otherwise."""
    keys = tmp_path_factory.mktemp("keys")
    b.keygen(keys / "trusted")
    b.keygen(keys / "stranger")
    trusted = b.load_private_key(keys / "trusted/signing.key")
    canary = b.make_canary(SHIPPED / "allds2020", data_root, 4)
    older = b.build_bundle(SHIPPED / "allds2020", trusted, canary)
    time.sleep(1.1)  # `created` counts seconds
    good = b.build_bundle(SHIPPED / "allds2020", trusted, canary)
    tampered = bytearray(good)
    tampered[len(good) // 2] ^= 0x01
    signature_end = len(b.MAGIC) + 4 + int.from_bytes(good[len(b.MAGIC):len(b.MAGIC) + 4], "big")
    wrong_canary = b.Canary(canary.inputs, {v: e[:, ::-1].copy() for v, e in canary.expected.items()}, canary.images)
    return {"pub": keys / "trusted/signing.pub", "stranger_pub": keys / "stranger/signing.pub", "good": good, "older": older,
            "bad": {"tampered": (bytes(tampered), "bad signature"),
                    "stranger": (b.build_bundle(SHIPPED / "allds2020", b.load_private_key(keys / "stranger/signing.key"),
                                                canary), "unknown key"),
                    "unsigned": (b.MAGIC + (0).to_bytes(4, "big") + good[signature_end:], "unsigned"),
                    "wrong-canary": (b.build_bundle(SHIPPED / "allds2020", trusted, wrong_canary), "canary"),
                    "junk": (b"\x00" * 1000, "not an AllDS model bundle")}}


@pytest.fixture
def models(tmp_path):
    root = tmp_path / "models"
    for name in ("cellnet", "allds2020"):
        shutil.copytree(SHIPPED / name, root / name)
    return root


def delivery_config(models, bundles, tmp_path, **extra) -> dict:
    return {"model": {"dir": str(models), "name": "cellnet", "trusted_keys": [str(bundles["pub"])],
                      "state_file": str(tmp_path / "active.json"), "fleet_topic": FLEET, **extra}}


def states(client: Client, until: str, timeout: float = 60) -> list[dict]:
    """ModelState records up to the first whose state is `until`."""
    seen = []
    while not seen or seen[-1]["state"] != until:
        seen.append(json.loads(client.expect(MODEL_STATE, timeout).payload))
    return seen


def diagnose(client: Client, image: bytes, request_id: str) -> dict:
    client.publish(INFERENCE, image, correlation=request_id.encode())
    return client.expect_json(DIAGNOSIS, 20, id=request_id)


def test_a_good_bundle_becomes_active_survives_a_restart_and_rolls_back(broker, start_agent, bundles, models,
                                                                        tmp_path, data_root):
    image = (data_root / "Benign/WBC-Benign-004.jpg").read_bytes()
    client = Client(broker.port).subscribe(f"{BASE}/#")
    agent = start_agent(broker.port, **delivery_config(models, bundles, tmp_path))
    assert states(client, "active")[-1]["name"] == "cellnet"
    client.publish(MODEL, bundles["good"])
    sequence = states(client, "active")
    print("\nModelState sequence of an update: " + " -> ".join(f"{s['state']}" for s in sequence))
    assert [s["state"] for s in sequence] == ["received", "verified", "active"]
    assert sequence[-1]["name"] == "allds2020" and sequence[-1]["serving"]["name"] == "allds2020"
    assert diagnose(client, image, "after-update")["model"]["name"] == "allds2020"
    assert agent.terminate() == 0
    agent.start()
    assert states(client, "active")[-1]["name"] == "allds2020"  # the last active model serves after a restart
    assert diagnose(client, image, "after-restart")["model"]["name"] == "allds2020"
    client.publish(COMMANDS, json.dumps({"From": "operator", "Type": "Rollback"}))
    rolled = states(client, "rolled_back")[-1]
    assert rolled["name"] == "cellnet" and rolled["serving"]["name"] == "cellnet"
    assert diagnose(client, image, "after-rollback")["model"]["name"] == "cellnet"
    client.close()


@pytest.mark.parametrize("kind", ["tampered", "stranger", "unsigned", "wrong-canary", "junk", "oversized"])
def test_a_bad_bundle_fails_and_the_old_model_serves_on(broker, start_agent, bundles, models, tmp_path, data_root, kind):
    image = (data_root / "Pro/WBC-Malignant-Pro-004.jpg").read_bytes()
    client = Client(broker.port).subscribe(f"{BASE}/#")
    extra = {"max_bundle_bytes": 1_000_000} if kind == "oversized" else {}
    start_agent(broker.port, **delivery_config(models, bundles, tmp_path, **extra))
    serving = states(client, "active")[-1]["sha256"]
    payload, words = (bundles["good"], "too large") if kind == "oversized" else bundles["bad"][kind]
    client.publish(MODEL, payload)
    failed = states(client, "failed")[-1]
    print(f"\n{kind}: ModelState failed, reason: {failed['reason']}")
    assert words in failed["reason"] and failed["serving"]["sha256"] == serving
    assert diagnose(client, image, f"after-{kind}")["model"]["sha256"] == serving
    assert not [p for p in models.iterdir() if p.name.startswith("allds2020@")]  # nothing bad was kept
    client.close()


def test_a_bundle_delivered_again_is_answered_not_ignored_in_silence(broker, start_agent, bundles, models, tmp_path):
    """`publish_model` sent a bundle the device had taken already and waited in vain ("no answer", exit 1): the
    agent ignored it without a word. A live delivery is answered: `active` while that bundle serves, `failed` with
    how to serve it again once another model replaced it (a retained copy on every connect is still ignored)."""
    client = Client(broker.port).subscribe(f"{BASE}/#")
    start_agent(broker.port, **delivery_config(models, bundles, tmp_path))
    states(client, "active")
    digest = hashlib.sha256(bundles["good"]).hexdigest()
    client.publish(MODEL, bundles["good"])
    states(client, "active")
    client.publish(MODEL, bundles["good"])
    again = states(client, "active")[-1]
    assert again["bundle"] == digest and "already" in again["reason"] and again["serving"]["name"] == "allds2020"
    client.publish(COMMANDS, json.dumps({"From": "operator", "Type": "Rollback"}))
    states(client, "rolled_back")
    client.publish(MODEL, bundles["good"])
    refused = states(client, "failed")[-1]
    assert refused["bundle"] == digest and "Reload" in refused["reason"] and refused["serving"]["name"] == "cellnet"
    client.close()


def test_an_older_bundle_of_a_model_is_refused_whatever_came_between(broker, start_agent, bundles, models, tmp_path,
                                                                     data_root):
    """One operator message could roll a device back: a bundle of allds2020 signed before the one it runs went
    active, and so did it after 32 junk payloads had pushed the newer one out of the agent's memory of
    bundles handled (junk was remembered before it was checked)."""
    image = (data_root / "Benign/WBC-Benign-004.jpg").read_bytes()
    client = Client(broker.port).subscribe(f"{BASE}/#")
    start_agent(broker.port, **delivery_config(models, bundles, tmp_path))
    states(client, "active")
    client.publish(MODEL, bundles["good"])
    newer = states(client, "active")[-1]
    for attempt, junk in (("first", []), ("after junk", [b"junk %d" % n for n in range(33)])):
        for payload in junk:
            client.publish(MODEL, payload)
            assert "not an AllDS model bundle" in states(client, "failed")[-1]["reason"]
        client.publish(MODEL, bundles["older"])
        failed = states(client, "failed")[-1]
        print(f"\nolder bundle, {attempt}: {failed['reason']}")
        assert "older" in failed["reason"] and failed["serving"]["sha256"] == newer["sha256"], failed
    assert diagnose(client, image, "after-older")["model"]["sha256"] == newer["sha256"]
    client.close()


def test_a_bundle_refused_for_want_of_its_key_is_taken_once_the_key_is_trusted(broker, start_agent, bundles, models,
                                                                              tmp_path):
    """A refusal the device's configuration caused is not remembered: the same bundle, delivered again after the
    operator added its key, was "handled before; ignored" with no answer."""
    client = Client(broker.port).subscribe(f"{BASE}/#")
    agent = start_agent(broker.port, **delivery_config(models, bundles, tmp_path))
    states(client, "active")
    stranger = bundles["bad"]["stranger"][0]
    client.publish(MODEL, stranger)
    assert "unknown key" in states(client, "failed")[-1]["reason"]
    assert agent.terminate() == 0
    config = delivery_config(models, bundles, tmp_path)
    config["model"]["trusted_keys"].append(str(bundles["stranger_pub"]))
    start_agent(broker.port, name="trusting", **config)
    states(client, "active")
    client.publish(MODEL, stranger)
    assert states(client, "active")[-1]["bundle"] == hashlib.sha256(stranger).hexdigest()
    client.close()


def test_the_fleet_topic_updates_a_pool_of_two_with_one_publish(broker, start_agent, bundles, models, tmp_path):
    zone = "allds-location/Devices/allds-zone"
    watcher = Client(broker.port).subscribe(f"{zone}/+/ModelState")
    for n in (1, 2):
        start_agent(broker.port, name=f"pool{n}", hias={"device": f"allds-device-{n}", "name": f"allds-agent-{n}"},
                    inference={"request_topic": f"{zone}/allds-pool/Inference", "shared_group": "pool"},
                    **delivery_config(models, bundles, tmp_path / f"p{n}"))
    active = {}
    while len(active) < 2:
        message = watcher.expect(f"{zone}/+/ModelState", 30)
        active[message.topic] = json.loads(message.payload)
    bundle = tmp_path / "allds2020.bundle"
    bundle.write_bytes(bundles["good"])
    tool = subprocess.run([sys.executable, "-m", "agent.publish_model", str(bundle), "--fleet", "--config",
                           str(write_config(tmp_path / "operator.yaml", broker.port, model={"fleet_topic": FLEET}))],
                          cwd=REPO, capture_output=True, text=True, timeout=180)
    print("\n" + tool.stdout)
    assert tool.returncode == 0, tool.stdout + tool.stderr[-2000:]
    assert tool.stdout.count(" active ") == 2 and "allds-device-1" in tool.stdout and "allds-device-2" in tool.stdout
    updated = set()
    while len(updated) < 2:
        message = watcher.expect(f"{zone}/+/ModelState", 60)
        doc = json.loads(message.payload)
        if doc["state"] == "active" and doc["name"] == "allds2020":
            updated.add(message.topic)
    assert len(updated) == 2
    watcher.close()


@pytest.mark.parametrize("state", [{"active": 5}, {"active": ["cellnet"]}, {"previous": {"x": 1}},
                                   {"active": "cellnet", "bundles": None}, {"bundles": [1]},
                                   {"newest": {"allds2020": "yesterday"}}, {"newest": []}])
def test_a_model_state_file_of_the_wrong_shape_is_unreadable_not_fatal(tmp_path, models, state):
    """A corrupt or hand-edited state file stopped the agent at start (a traceback, exit 1: systemd gives up
    after ten) or broke every later delivery (`bundles: null`). It is read as unreadable: `model.name` serves."""
    from agent.config import parse
    from agent.models import ModelStore

    state_file = tmp_path / "active.json"
    state_file.write_text(json.dumps(state))
    config = parse({"model": {"dir": str(models), "name": "allds2020", "state_file": str(state_file)}})
    store = ModelStore(config)
    assert store.start().name == "allds2020" and not store.seen("0" * 64)
    store.activate("cellnet")  # and the next model change writes a good one
    assert json.loads(state_file.read_text())["active"] == "cellnet" and ModelStore(config).served.previous == "allds2020"


def test_a_bundle_whose_folder_name_no_reload_could_name_is_refused_before_it_installs(tmp_path, data_root):
    """A signed bundle of a 120-character model name verified and installed as `<name>@<version>-<sha12>`, a
    folder `Reload` and the state file then refused as "not a model name"."""
    from agent.config import parse
    from agent.models import ModelStore

    folder = tmp_path / "long" / "allds2020"
    shutil.copytree(SHIPPED / "allds2020", folder)
    card = json.loads((folder / "model_card.json").read_text())
    (folder / "model_card.json").write_text(json.dumps({**card, "name": "a" * 120}, indent=2))
    b.keygen(tmp_path / "keys")
    data = b.build_bundle(folder, b.load_private_key(tmp_path / "keys/signing.key"), b.make_canary(folder, data_root, 2))
    config = parse({"model": {"dir": str(tmp_path / "models"), "trusted_keys": [str(tmp_path / "keys/signing.pub")],
                              "state_file": str(tmp_path / "active.json")}})
    with pytest.raises(b.BundleError, match="longer than a model name"):
        ModelStore(config).verify(data)
