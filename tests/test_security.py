"""TLS (CA verification, client certificates), passwords and the shipped ACL, on a real Mosquitto."""

from __future__ import annotations

import re
import subprocess
import time

import pytest

from tests.helpers import BASE, REPO, Broker, Client, free_port

PASSWORDS = {"allds-agent": "agent-secret-1", "allds-requester": "requester-secret-2", "stranger": "stranger-3"}


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    out = tmp_path_factory.mktemp("certs")
    subprocess.run(["bash", str(REPO / "certs/make-certs.sh"), "--out", str(out), "--client", "allds-agent"],
                   check=True, capture_output=True)
    other = tmp_path_factory.mktemp("other-ca")
    subprocess.run(["bash", str(REPO / "certs/make-certs.sh"), "--out", str(other)], check=True, capture_output=True)
    return out, other


@pytest.fixture
def secure_broker(tmp_path, certs):
    out, _ = certs
    passwd = tmp_path / "passwd"
    passwd.touch()
    for user, password in PASSWORDS.items():
        subprocess.run(["mosquitto_passwd", "-b", str(passwd), user, password], check=True)
    passwd.chmod(0o600)
    tls = (f"cafile {out / 'ca.crt'}\ncertfile {out / 'broker.crt'}\nkeyfile {out / 'broker.key'}\n"
           "tls_version tlsv1.2\n")
    password_port, cert_port, plain_port = free_port(), free_port(), free_port()
    listeners = "\n".join([
        "per_listener_settings true",
        f"listener {plain_port} 127.0.0.1", "allow_anonymous false", f"password_file {passwd}",
        f"acl_file {REPO / 'deploy/mosquitto/acl'}",
        f"listener {password_port} 127.0.0.1", tls + "allow_anonymous false", f"password_file {passwd}",
        f"acl_file {REPO / 'deploy/mosquitto/acl'}",
        f"listener {cert_port} 127.0.0.1", tls + "require_certificate true", "use_identity_as_username true",
        f"acl_file {REPO / 'deploy/mosquitto/acl'}",
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
