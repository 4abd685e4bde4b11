"""TLS (CA verification, client certificates), passwords and the shipped ACL, on a real Mosquitto."""

from __future__ import annotations

import re
import subprocess
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from agent.config import Inference
from tests.helpers import BASE, REPO, Broker, Client, free_port

PASSWORDS = {"allds-agent": "agent-secret-1", "allds-requester": "requester-secret-2", "stranger": "stranger-3",
             "allds-requester-2": "requester-secret-4", "allds-operator": "operator-secret-5"}
LIFE_COMMAND = b'{"From": "test", "Type": "Life", "Value": "", "Message": ""}'


def site_acl(path: Path, *more_requesters: str) -> Path:
    """The shipped ACL with further requester accounts, each a copy of the `allds-requester` block
    (as docs/operations.md tells a site to add one)."""
    text = (REPO / "deploy/mosquitto/acl").read_text()
    block = re.search(r"^user allds-requester\n(?:topic .*\n)+", text, re.M).group(0)
    path.write_text(text + "".join("\n" + block.replace("user allds-requester", f"user {name}") for name in more_requesters))
    return path


def user(port: int, name: str, v5: bool = True) -> Client:
    return Client(port, v5=v5, username=name, password=PASSWORDS[name])


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    out = tmp_path_factory.mktemp("certs")
    subprocess.run(["bash", str(REPO / "certs/make-certs.sh"), "--out", str(out), "--client", "allds-agent"],
                   check=True, capture_output=True)
    other = tmp_path_factory.mktemp("other-ca")
    subprocess.run(["bash", str(REPO / "certs/make-certs.sh"), "--out", str(other)], check=True, capture_output=True)
    return out, other


def write_passwd(path: Path) -> Path:
    """A Mosquitto password file with every login of PASSWORDS."""
    path.touch()
    for login, password in PASSWORDS.items():
        subprocess.run(["mosquitto_passwd", "-b", str(path), login, password], check=True)
    path.chmod(0o600)
    return path


@pytest.fixture
def secure_broker(tmp_path, certs):
    out, _ = certs
    passwd = write_passwd(tmp_path / "passwd")
    acl = site_acl(tmp_path / "acl", "allds-requester-2")
    tls = (f"cafile {out / 'ca.crt'}\ncertfile {out / 'broker.crt'}\nkeyfile {out / 'broker.key'}\n"
           "tls_version tlsv1.2\n")
    password_port, cert_port, plain_port = free_port(), free_port(), free_port()
    listeners = "\n".join([
        "per_listener_settings true",
        f"listener {plain_port} 127.0.0.1", "allow_anonymous false", f"password_file {passwd}",
        f"acl_file {acl}",
        f"listener {password_port} 127.0.0.1", tls + "allow_anonymous false", f"password_file {passwd}",
        f"acl_file {acl}",
        f"listener {cert_port} 127.0.0.1", tls + "require_certificate true", "use_identity_as_username true",
        f"acl_file {acl}",
    ])
    broker = Broker(tmp_path / "broker", port=plain_port, listeners=listeners).start()
    broker.tls_port, broker.cert_port = password_port, cert_port
    yield broker
    broker.stop()


def _wait_log(agent, pattern: str, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.search(pattern, agent.log())
        if match:
            return match.group(0)
        time.sleep(0.1)
    raise AssertionError(f"{pattern!r} not in log:\n{agent.log()[-2000:]}")


def test_tls_with_password_from_env(secure_broker, certs, start_agent, data_root):
    out, _ = certs
    requester = Client(secure_broker.port, username="allds-requester", password=PASSWORDS["allds-requester"])
    requester.subscribe(f"{BASE}/#")
    agent = start_agent(secure_broker.tls_port, env={"ALLDS_MQTT_PASSWORD": PASSWORDS["allds-agent"]},
                        broker={"username": "allds-agent", "password_env": "ALLDS_MQTT_PASSWORD",
                                "tls": {"enabled": True, "ca_certs": str(out / "ca.crt")}})
    requester.expect(f"{BASE}/Status", 20, lambda m: m.payload == b"ONLINE")
    requester.publish(f"{BASE}/Inference", (data_root / "Pre/WBC-Malignant-Pre-010.jpg").read_bytes(),
                      correlation=b"tls-1")
    assert "diagnosis" in requester.expect_json(f"{BASE}/Diagnosis", id="tls-1")
    assert PASSWORDS["allds-agent"] not in agent.log()
    requester.close()


def test_client_certificate(secure_broker, certs, start_agent):
    out, _ = certs
    watcher = Client(secure_broker.port, username="allds-requester", password=PASSWORDS["allds-requester"])
    watcher.subscribe(f"{BASE}/Status")
    start_agent(secure_broker.cert_port, broker={"tls": {"enabled": True, "ca_certs": str(out / "ca.crt"),
                                                         "certfile": str(out / "allds-agent.crt"),
                                                         "keyfile": str(out / "allds-agent.key")}})
    watcher.expect(f"{BASE}/Status", 20, lambda m: m.payload == b"ONLINE")
    watcher.close()


def test_wrong_ca_is_reported_and_retried(secure_broker, certs, start_agent):
    _, other = certs
    agent = start_agent(secure_broker.tls_port, env={"P": PASSWORDS["allds-agent"]},
                        broker={"username": "allds-agent", "password_env": "P",
                                "tls": {"enabled": True, "ca_certs": str(other / "ca.crt")}})
    _wait_log(agent, r"TLS handshake failed \(CERTIFICATE_VERIFY_FAILED\).*retry 2 in")
    assert agent.proc.poll() is None


def test_wrong_password_is_reported_and_backed_off(secure_broker, start_agent):
    agent = start_agent(secure_broker.port, env={"P": "wrong"},
                        broker={"username": "allds-agent", "password_env": "P", "reconnect_min_s": 0.2,
                                "reconnect_max_s": 2.0})
    _wait_log(agent, r"broker refused the connection: (Not authorized|Bad user name or password).*retry 3 in")
    time.sleep(3)
    attempts = len(re.findall(r"broker refused the connection", agent.log()))
    assert attempts <= 12, f"{attempts} attempts in a few seconds: no backoff"
    assert "wrong" not in agent.log().replace("wrong password", "")


def test_acl_keeps_other_users_out(secure_broker, start_agent, data_root):
    requester = Client(secure_broker.port, username="allds-requester", password=PASSWORDS["allds-requester"])
    requester.subscribe(f"{BASE}/#")
    start_agent(secure_broker.port, env={"P": PASSWORDS["allds-agent"]},
                broker={"username": "allds-agent", "password_env": "P"})
    requester.expect(f"{BASE}/Status", 20, lambda m: m.payload == b"ONLINE")
    stranger = Client(secure_broker.port, username="stranger", password=PASSWORDS["stranger"])
    stranger.subscribe(f"{BASE}/Diagnosis")
    image = (data_root / "Benign/WBC-Benign-010.jpg").read_bytes()
    stranger.publish(f"{BASE}/Inference", image, correlation=b"from-stranger")
    requester.publish(f"{BASE}/Inference", image, correlation=b"from-requester")
    assert "diagnosis" in requester.expect_json(f"{BASE}/Diagnosis", id="from-requester")
    with pytest.raises(AssertionError):
        requester.expect_json(f"{BASE}/Diagnosis", 3, id="from-stranger")  # never reached the agent
    with pytest.raises(AssertionError):
        stranger.expect(f"{BASE}/Diagnosis", 1)  # cannot read the answers
    stranger.close()
    requester.close()


@pytest.fixture
def secure_agent(secure_broker, start_agent):
    """An agent logged in as allds-agent, ONLINE, its connect-time Life already published."""
    watcher = user(secure_broker.port, "allds-operator").subscribe(f"{BASE}/#")
    agent = start_agent(secure_broker.port, env={"P": PASSWORDS["allds-agent"]},
                        broker={"username": "allds-agent", "password_env": "P"})
    watcher.expect(f"{BASE}/Status", 20, lambda m: m.payload == b"ONLINE")
    watcher.expect(f"{BASE}/Life", 10)
    watcher.close()
    return agent


def test_requester_cannot_command_the_device_operator_can(secure_broker, secure_agent):
    requester, operator = user(secure_broker.port, "allds-requester"), user(secure_broker.port, "allds-operator")
    requester.subscribe(f"{BASE}/Life")
    refused = requester.publish(f"{BASE}/Commands", LIFE_COMMAND)
    assert refused.is_failure and "authorized" in str(refused), refused
    with pytest.raises(AssertionError):
        requester.expect(f"{BASE}/Life", 3)  # the command never reached the agent
    assert "command Type=Life" not in secure_agent.log()
    assert not operator.publish(f"{BASE}/Commands", LIFE_COMMAND).is_failure
    assert "CPU" in requester.expect_json(f"{BASE}/Life", 10)
    _wait_log(secure_agent, "command Type=Life")
    requester.close()
    operator.close()


def test_requesters_read_public_answers_and_only_their_own_private_ones(secure_broker, secure_agent, data_root):
    a, b = user(secure_broker.port, "allds-requester"), user(secure_broker.port, "allds-requester-2")
    a.subscribe(f"{BASE}/Diagnosis/#")
    b.subscribe(f"{BASE}/Diagnosis/allds-requester-2/#")
    image = (data_root / "Benign/WBC-Benign-010.jpg").read_bytes()
    b.publish(f"{BASE}/Inference", image, response_topic=f"{BASE}/Diagnosis/allds-requester-2/x", correlation=b"b-private")
    assert "diagnosis" in b.expect_json(f"{BASE}/Diagnosis/allds-requester-2/x", id="b-private")
    a.publish(f"{BASE}/Inference", image, response_topic=f"{BASE}/Diagnosis/allds-requester/y", correlation=b"a-private")
    a.publish(f"{BASE}/Inference", image, correlation=b"a-public")
    seen = []  # everything A's Diagnosis/# subscription delivers until its own two answers arrived

    def own_answer(message) -> bool:
        seen.append(message)
        return b"a-p" in message.payload

    for _ in range(2):
        a.expect(f"{BASE}/Diagnosis/#", 15, own_answer)
    time.sleep(1)
    while not a.messages.empty():
        seen.append(a.messages.get())
    assert {m.topic for m in seen} >= {f"{BASE}/Diagnosis", f"{BASE}/Diagnosis/allds-requester/y"}
    assert not [m for m in seen if "allds-requester-2" in m.topic or b"b-private" in m.payload]
    a.close()
    b.close()


def shipped_broker(tmp_path: Path, name: str, certs) -> Broker:
    """A broker config of deploy/mosquitto/ as shipped, with its files and ports pointed at tmp_path."""
    out, _ = certs
    passwd = write_passwd(tmp_path / "passwd")
    plain, tls, websockets = free_port(), free_port(), free_port()
    (tmp_path / "www").mkdir()
    text = (REPO / "deploy/mosquitto" / name).read_text()
    text = re.sub(r"^http_dir .*$", f"http_dir {tmp_path / 'www'}", text, flags=re.M)
    files = {"passwd": passwd, "acl": site_acl(tmp_path / "acl"), "ca.crt": out / "ca.crt",
             "broker.crt": out / "broker.crt", "broker.key": out / "broker.key"}
    moves = [(f"/etc/mosquitto/allds/{name}", path) for name, path in files.items()]
    moves += [("/var/lib/mosquitto/", f"{tmp_path}/"), ("listener 1883 127.0.0.1", f"listener {plain} 127.0.0.1"),
              ("listener 8883", f"listener {tls} 127.0.0.1"), ("listener 1884 127.0.0.1", f"listener {plain} 127.0.0.1"),
              ("listener 9001 127.0.0.1", f"listener {websockets} 127.0.0.1"),
              ("listener 9001\n", f"listener {websockets} 127.0.0.1\n")]
    for shipped, here in moves:
        text = text.replace(shipped, str(here))
    settings = [line for line in text.splitlines() if not line.startswith("#")]
    assert not [line for line in settings if re.search(r"/etc/|/var/|/opt/|listener (1883|1884|8883|9001)\b", line)], text
    return Broker(tmp_path / "broker", port=plain, listeners=text).start(wait_for=plain)


def publish_once(port: int, payload: bytes, v5: bool, login: str | None) -> bool:
    """Publish a request at QoS 1 on a fresh connection; True if the broker acknowledged it."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311)
    if login:
        client.username_pw_set(login, PASSWORDS[login])
    client.connect("127.0.0.1", port)
    client.loop_start()
    properties = None
    if v5:  # a request with the properties a requester sends
        properties = mqtt.Properties(mqtt.PacketTypes.PUBLISH)
        properties.ResponseTopic = f"{BASE}/Diagnosis/{login or 'anonymous'}/reply"
        properties.CorrelationData = b"r" * 64
    dropped = threading.Event()
    client.on_disconnect = lambda *args: dropped.set()
    info = client.publish(f"{BASE}/Inference", payload, qos=1, properties=properties)
    deadline = time.monotonic() + 10
    while not (info.is_published() or dropped.is_set()) and time.monotonic() < deadline:
        time.sleep(0.02)
    client.loop_stop()
    client.disconnect()
    return info.is_published()


@pytest.mark.parametrize("conf", ["allds.conf", "demo.conf"])
def test_shipped_broker_configs_carry_the_largest_request_and_refuse_bigger_packets(tmp_path, certs, conf):
    """max_packet_size: room for a request of `inference.max_payload_bytes` plus its properties; a
    bigger packet is refused by the broker, from MQTT 5 and 3.1.1 clients alike."""
    broker = shipped_broker(tmp_path, conf, certs)
    requester, device = ("allds-requester", "allds-agent") if conf == "allds.conf" else (None, None)
    agent = user(broker.port, device) if device else Client(broker.port)
    agent.subscribe(f"{BASE}/Inference")
    limit = Inference().max_payload_bytes
    for v5 in (True, False):
        assert publish_once(broker.port, bytes(limit), v5, requester)
        assert len(agent.expect(f"{BASE}/Inference", 10).payload) == limit
        assert not publish_once(broker.port, bytes(limit + 65 * 1024), v5, requester)
        with pytest.raises(AssertionError):
            agent.expect(f"{BASE}/Inference", 2)
    assert broker.log().count("disconnected due to oversize packet") == 2
    agent.close()
    broker.stop()


def test_the_fleet_topic_carries_the_operators_deliveries_to_the_device_and_nobody_elses(secure_broker):
    """`model.fleet_topic` (config/agent.yaml: `allds-location/Devices/allds-zone/Fleet/Models`) under the shipped
    ACL: the operator's publish was refused and the device could not read it, so a fleet delivery failed silently."""
    fleet = "allds-location/Devices/allds-zone/Fleet/Models"
    device = user(secure_broker.port, "allds-agent").subscribe(fleet)
    operator, requester = user(secure_broker.port, "allds-operator"), user(secure_broker.port, "allds-requester")
    refused = requester.publish(fleet, b"not the operator's")
    assert refused.is_failure and "authorized" in str(refused), refused
    assert not operator.publish(fleet, b"operator's delivery").is_failure
    assert device.expect(fleet, 10).payload == b"operator's delivery"
    for client in (device, operator, requester):
        client.close()
