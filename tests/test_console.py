"""The lab console (console/www) end to end: Debian's headless Chromium, driven by Selenium through
chromedriver, loads the page from a real Mosquitto (its WebSockets listener serves console/www through
http_dir) and talks MQTT over WebSockets to it, with a real agent behind it, under the shipped ACL.

Screenshots go to $ALLDS_SCREENSHOTS or, by default, to the pytest temporary folder `console-screenshots*`."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from PIL import Image

from model.classifier import CARD_NAME, DEFAULT_ARTIFACT
from tests.helpers import BASE, REPO, Agent, Broker, Client, free_port, wait_port, write_config

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
WWW = REPO / "console/www"
PASSWORDS = {"allds-agent": "agent-secret-1", "allds-requester": "requester-secret-2"}
DEVICE_KEY = "allds-zone/allds-device"
ROOT = BASE.rsplit("/", 2)[0]  # allds-location/Devices


def _require(ok: bool, message: str) -> None:
    if not ok:
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def screens(tmp_path_factory) -> Path:
    path = Path(os.environ["ALLDS_SCREENSHOTS"]) if os.environ.get("ALLDS_SCREENSHOTS") else tmp_path_factory.mktemp(
        "console-screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium, headless, with a fresh profile and no background traffic."""
    _require(CHROMIUM.exists() and CHROMEDRIVER.exists(), "chromium / chromium-driver missing (run deploy/bootstrap.sh)")
    _require((WWW / "vendor/mqtt.min.js").exists(), "console/www/vendor/mqtt.min.js missing (run deploy/bootstrap.sh)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="allds-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--no-first-run", "--disable-sync", "--window-size=1280,900",
                f"--user-data-dir={profile}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    driver.set_page_load_timeout(20)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def site_broker(workdir: Path) -> tuple[Broker, int]:
    """Passwords and the shipped ACL (deploy/mosquitto/acl, unchanged); MQTT on one port, WebSockets plus
    the console's files on another."""
    workdir.mkdir(parents=True, exist_ok=True)
    passwd = workdir / "passwd"
    passwd.touch()
    for login, password in PASSWORDS.items():
        subprocess.run(["mosquitto_passwd", "-b", str(passwd), login, password], check=True)
    tcp, ws = free_port(), free_port()
    listeners = "\n".join([
        "per_listener_settings false", "allow_anonymous false", f"password_file {passwd}",
        f"acl_file {REPO / 'deploy/mosquitto/acl'}",
        f"listener {tcp} 127.0.0.1", f"listener {ws} 127.0.0.1", "protocol websockets", f"http_dir {WWW}"])
    broker = Broker(workdir / "broker", port=tcp, listeners=listeners).start()
    wait_port(ws)
    return broker, ws


class Site:
    """Broker, agent and a watcher that reads what the agent answers to the console's requests."""

    def __init__(self, workdir: Path) -> None:
        self.broker, self.ws_port = site_broker(workdir)
        config = write_config(workdir / "agent.yaml", self.broker.port, telemetry={"life_interval_s": 1},
                              broker={"username": "allds-agent", "password_env": "ALLDS_MQTT_PASSWORD"})
        self.agent = Agent(config, workdir / "agent.log", {"ALLDS_MQTT_PASSWORD": PASSWORDS["allds-agent"]}).start()
        # The console logs in as allds-requester; the same user may read its own private answers.
        self.watcher = Client(self.broker.port, username="allds-requester", password=PASSWORDS["allds-requester"])
        self.watcher.subscribe(f"{BASE}/Diagnosis/allds-requester/#")
        self.url = f"http://127.0.0.1:{self.ws_port}/"
        self.answers: dict[str, dict] = {}

    def answer_for(self, name: str, timeout: float = 30) -> dict:
        """The agent's answer (as published) to the console's request for image `name`."""
        deadline = time.monotonic() + timeout
        while name not in self.answers:
            message = self.watcher.expect(f"{BASE}/Diagnosis/allds-requester/#", max(0.1, deadline - time.monotonic()))
            doc = json.loads(message.payload)
            self.answers.setdefault(doc.get("name"), doc)
        return self.answers[name]

    def close(self) -> None:
        self.watcher.close()
        self.agent.stop()
        self.broker.stop()


@pytest.fixture(scope="module")
def site(tmp_path_factory, data_root):
    s = Site(tmp_path_factory.mktemp("console-site"))
    yield s
    s.close()


def wait(driver, condition, timeout: float = 20, what: str = "condition"):
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: condition(d))
    except Exception as exc:
        raise AssertionError(f"page: {what} not met within {timeout} s; status: {text(driver, '#conn-status')!r}") from exc


def text(driver, selector: str) -> str:
    """An element's text, read in one script call (the page re-renders: a found element can go stale)."""
    return driver.execute_script("const e = document.querySelector(arguments[0]); return e ? e.innerText : '';",
                                 selector)


def attr(driver, selector: str, name: str) -> str | None:
    return driver.execute_script("const e = document.querySelector(arguments[0]);"
                                 "return e ? e.getAttribute(arguments[1]) : null;", selector, name)


def shoot(driver, screens: Path, name: str) -> Path:
    path = screens / f"{name}.png"
    driver.save_screenshot(str(path))
    print(f"screenshot: {path}")
    return path


def login(driver, url: str, user: str | None, password: str | None) -> None:
    from selenium.webdriver.common.by import By

    driver.get(url)
    for field, value in (("username", user), ("password", password)):
        element = driver.find_element(By.ID, field)
        element.clear()
        if value:
            element.send_keys(value)
    driver.find_element(By.ID, "connect").click()


def open_tab(driver, name: str) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, f"tab-{name}").click()
    wait(driver, lambda d: attr(d, f"#tab-{name}", "aria-selected") == "true", 5, f"tab {name} selected")


def drop_files(driver, paths: list[Path]) -> None:
    """A real drag and drop of files onto the drop zone through Chromium's input pipeline (DevTools)."""
    from selenium.webdriver.common.by import By

    zone = driver.find_element(By.ID, "drop")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", zone)
    box = driver.execute_script("const r = arguments[0].getBoundingClientRect();"
                                "return [r.x + r.width / 2, r.y + r.height / 2];", zone)
    data = {"items": [], "files": [str(p) for p in paths], "dragOperationsMask": 1}
    for kind in ("dragEnter", "dragOver", "drop"):
        driver.execute_cdp_cmd("Input.dispatchDragEvent", {"type": kind, "x": box[0], "y": box[1], "data": data})


def result_card(driver, name: str, states=("answered",), timeout: float = 30) -> dict:
    """The Classify card of image `name` once in one of `states`: its state and displayed fields."""
    script = """
      const card = [...document.querySelectorAll('#results .result')].find(c => c.dataset.name === arguments[0]);
      if (!card) return null;
      const field = f => { const e = card.querySelector(`[data-field="${f}"]`); return e ? e.textContent : null; };
      const reason = card.querySelector('.reason'), heat = card.querySelector('.heat');
      return {state: card.dataset.state, result: field('result'), confidence: field('confidence'), device: field('device'),
              p_all: field('p-all'),
              model: field('model'), explanation: field('explanation'), stateText: card.querySelector('.state').textContent,
              reason: reason.hidden ? null : reason.dataset.reason, reasonText: reason.hidden ? null : reason.textContent,
              heatShown: !heat.hidden && heat.complete && heat.naturalWidth > 0, heatWidth: heat.naturalWidth,
              heatHeight: heat.naturalHeight};"""
    return wait(driver, lambda d: (c := d.execute_script(script, name)) and c["state"] in states and c,
                timeout, f"card of {name} in {states}")


def percent(value: float | None) -> str:
    return "—" if value is None else f"{value * 100:.1f} %"


def blank_png(path: Path, size=(320, 240), value=255) -> Path:
    Image.new("RGB", size, (value, value, value)).save(path)
    return path


# ------------------------------------------------------------------------------------------ tests


def test_page_served_by_the_broker_shows_the_device_online(site, browser, screens):
    login(browser, site.url, "allds-requester", PASSWORDS["allds-requester"])
    wait(browser, lambda d: attr(d, "#conn-status", "data-state") == "connected", 15, "connected")
    card = f'#devices [data-key="{DEVICE_KEY}"]'
    wait(browser, lambda d: attr(d, card, "data-status") == "ONLINE", 30, "device ONLINE")
    assert text(browser, f"{card} [data-field=status]") == "ONLINE"
    # Life: CPU, memory, disk as numbers, a trend line once two have come, and the serving model.
    wait(browser, lambda d: text(d, f'{card} [data-metric="CPU"]').endswith("%"), 15, "Life shown")
    wait(browser, lambda d: d.execute_script(
        "return document.querySelectorAll(arguments[0] + ' polyline').length", card) >= 3, 15, "trend lines")
    model = json.loads((DEFAULT_ARTIFACT.parent / CARD_NAME).read_text())
    assert text(browser, f"{card} [data-field=model]") == model["name"]
    assert model["version"] in text(browser, card)
    assert attr(browser, "#conn-warning", "hidden") is not None  # no subscription refused by the shipped ACL
    assert text(browser, "#count-devices") == "(1/1 online)"
    if f"{BASE}/ModelState" in (REPO / "deploy/mosquitto/acl").read_text():  # the retained ModelState, where readable
        wait(browser, lambda d: text(d, f"{card} [data-field=model-state]") == "active", 10, "ModelState active")
    # Keyboard: the tabs follow the arrow keys.
    from selenium.webdriver.common.keys import Keys

    browser.find_element("id", "tab-devices").send_keys(Keys.ARROW_RIGHT)
    assert attr(browser, "#tab-diagnoses", "aria-selected") == "true"
    assert browser.switch_to.active_element.get_attribute("id") == "tab-diagnoses"
    open_tab(browser, "devices")
    # Everything the page loaded came from the broker's own listener: nothing from elsewhere.
    origins = browser.execute_script("return performance.getEntriesByType('resource').map(e => new URL(e.name).origin)")
    assert set(origins) <= {site.url.rstrip("/")}, origins
    shoot(browser, screens, "devices")


def test_dropped_images_show_the_agents_answers(site, browser, screens):
    held_out = (REPO / "data/aria2021/grouped/test.txt").read_text().split()
    images = [Path(os.environ.get("ALLDS_DATA", "")) / line for line in held_out]
    picked = [next(p for p in images if p.parent.name == "Benign"), next(p for p in images if p.parent.name != "Benign")]
    open_tab(browser, "classify")
    assert "ONLINE" in text(browser, "#target-state")
    from selenium.webdriver.common.keys import Keys

    browser.find_element("id", "clear-results").send_keys(Keys.TAB)  # the file chooser is reachable by keyboard
    assert browser.switch_to.active_element.get_attribute("id") == "files"
    drop_files(browser, picked)
    for path in picked:
        answer = site.answer_for(path.name)
        assert answer["diagnosis"] in ("Positive", "Negative", "Indeterminate"), answer
        card = result_card(browser, path.name)
        assert card["result"] == answer["diagnosis"]
        assert card["confidence"] == percent(answer["confidence"])
        assert card["p_all"] == percent(1 - answer["probabilities"]["Benign"])
        assert card["device"] == answer["device"]
        assert card["model"] == f"{answer['model']['name']} {answer['model']['version']}"
    assert [c["name"] for c in browser.execute_script(
        "return [...document.querySelectorAll('#results .result')].map(c => ({name: c.dataset.name}))")] == \
        [p.name for p in picked]
    open_tab(browser, "diagnoses")
    rows = browser.execute_script("""return [...document.querySelectorAll('#diagnoses tbody tr')].map(r => ({
        name: r.querySelector('.image').textContent, result: r.querySelector('[data-field=result]').textContent,
        confidence: r.querySelector('[data-field=confidence]').textContent, mine: r.classList.contains('mine')}))""")
    for path in picked:
        assert any(r["name"] == path.name and r["mine"] for r in rows), rows
    assert text(browser, '#diagnosis-counts [data-count="total"]') == str(len(rows))
    # The filter narrows the table and the counts.
    browser.find_element("id", "filter-text").send_keys(picked[0].name)
    wait(browser, lambda d: text(d, '#diagnosis-counts [data-count="total"]') == "1", 5, "filtered to one row")
    shoot(browser, screens, "diagnoses")
    browser.find_element("id", "filter-text").clear()
    browser.execute_script("document.getElementById('filter-text').dispatchEvent(new Event('input'))")
    open_tab(browser, "classify")
    shoot(browser, screens, "classify")


def test_blank_image_shows_what_the_agent_answered_and_its_reason(site, browser, screens, tmp_path):
    """A blank white frame picked with the file input: the agent answers Indeterminate (reason
    overexposed; a gate refusal carries no heat map), and the page shows what the agent answered, reason
    included."""
    blank = blank_png(tmp_path / "blank-white.png")
    open_tab(browser, "classify")
    browser.find_element("id", "files").send_keys(str(blank))
    answer = site.answer_for(blank.name)
    card = result_card(browser, blank.name)
    assert card["result"] == answer.get("diagnosis", "Error" if "error" in answer else None)
    assert answer.get("diagnosis") == "Indeterminate"
    if answer.get("diagnosis") == "Indeterminate":
        assert card["reason"] == answer["reason"] and card["reason"]
        assert answer["reason"].replace("_", " ") in card["reasonText"]
    if answer.get("explanation"):
        assert card["heatShown"] and (card["heatWidth"], card["heatHeight"]) == (320, 240)
    else:
        assert card["explanation"] == "not provided by this agent"
    print(f"blank white image: the agent answered {answer.get('diagnosis')} {answer.get('reason', '')}")


def test_narrow_tablet_width_has_no_horizontal_scrolling(site, browser, screens):
    browser.set_window_size(820, 1180)
    try:
        for tab in ("devices", "diagnoses", "classify"):
            open_tab(browser, tab)
            assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth"), tab
        shoot(browser, screens, "classify-tablet")
    finally:
        browser.set_window_size(1280, 900)


def test_stopping_the_agent_turns_the_device_offline(site, browser, screens, data_root):
    site.agent.terminate()
    card = f'#devices [data-key="{DEVICE_KEY}"]'
    wait(browser, lambda d: attr(d, card, "data-status") == "OFFLINE", 15, "device OFFLINE")
    assert text(browser, "#count-devices") == "(0/1 online)"
    open_tab(browser, "classify")
    assert "OFFLINE" in text(browser, "#target-state") and attr(browser, "#target-state", "data-level") == "warn"
    image = data_root / "Benign/WBC-Benign-005.jpg"
    browser.find_element("id", "files").send_keys(str(image))
    card = result_card(browser, image.name, states=("offline",), timeout=10)
    assert "OFFLINE" in card["stateText"]
    shoot(browser, screens, "offline")
    open_tab(browser, "devices")
    assert text(browser, f'#devices [data-key="{DEVICE_KEY}"] [data-field=status]') == "OFFLINE"


def test_broker_gone_shows_disconnected_and_nothing_can_be_sent(site, browser, screens, tmp_path):
    site.broker.stop()
    wait(browser, lambda d: attr(d, "#conn-status", "data-state") == "failed", 15, "disconnected state")
    assert "Disconnected" in text(browser, "#conn-status")
    open_tab(browser, "classify")
    assert attr(browser, "#target-state", "data-level") == "bad" and "Not connected" in text(browser, "#target-state")
    blank = blank_png(tmp_path / "while-disconnected.png", value=128)
    browser.find_element("id", "files").send_keys(str(blank))
    card = result_card(browser, blank.name, states=("failed",), timeout=5)
    assert card["stateText"].startswith("Not sent")


def test_wrong_password_shows_a_clear_error(tmp_path, browser, screens):
    broker, ws = site_broker(tmp_path)
    try:
        login(browser, f"http://127.0.0.1:{ws}/", "allds-requester", "not-the-password")
        wait(browser, lambda d: d.find_element("id", "conn-error").is_displayed(), 15, "error shown")
        assert "refused this user name and password" in text(browser, "#conn-error")
        assert attr(browser, "#conn-status", "data-state") == "failed"
        assert "credentials refused" in text(browser, "#conn-status")
        shoot(browser, screens, "wrong-password")
        # The broker logs the refused MQTT connection's close, and sometimes that of an HTTP connection of
        # the page load (same "Client <unknown>" line) a moment later: count only after they settled.
        time.sleep(1.5)
        closed = broker.log().count("closed its connection")
        assert closed >= 1
        time.sleep(3.5)  # longer than the console's reconnect period: it must not try again with the same password
        assert "credentials refused" in text(browser, "#conn-status")
        assert broker.log().count("closed its connection") == closed
    finally:
        broker.stop()


# -------------------------------------------------------------- answer formats the agent may not send yet


class StandIn:
    """A pool member that answers like the agent but with a fixed Indeterminate answer and a heat map,
    to check the page renders those fields. It is not the agent: the real agent's answers are checked above.
    Before each answer it publishes a forged Positive under the same id about other bytes, as another
    requester can make the agent do (docs/protocol.md, "Check sha256"): the page must ignore it."""

    def __init__(self, port: int, device: str, pool_topic: str) -> None:
        self.device, self.base = device, f"{ROOT}/allds-zone/{device}"
        self.client = Client(port, client_id=device)
        self.client.client.publish(f"{self.base}/Status", b"ONLINE", qos=1, retain=True)
        self.client.client.on_message = self.answer
        self.client.subscribe(f"$share/pool/{pool_topic}")

    def answer(self, _client, _userdata, message) -> None:
        image = Image.open(io.BytesIO(message.payload))
        heat = np.zeros((image.height, image.width, 4), np.uint8)
        heat[..., 0], heat[..., 3] = 255, np.linspace(0, 200, image.width, dtype=np.uint8)[None, :]
        png = io.BytesIO()
        Image.fromarray(heat, "RGBA").save(png, format="PNG")
        props = message.properties
        doc = {"id": props.CorrelationData.decode(), "name": dict(props.UserProperty).get("name"),
               "diagnosis": "Indeterminate", "reason": "overexposed", "confidence": None,
               "probabilities": {"Benign": 0.5, "ALL": 0.5}, "model": {"name": "cellnet", "version": "x", "sha256": "0"},
               "timing_ms": {"decode": 1.0, "inference": 1.0, "total": 2.0}, "device": self.device,
               "explanation": {"method": "occlusion", "png": base64.b64encode(png.getvalue()).decode(), "ms": 5.0},
               "explain_requested": dict(props.UserProperty).get("explain"), "ts": "2026-12-01T00:00:00Z"}
        reply = Properties(PacketTypes.PUBLISH)
        reply.CorrelationData = props.CorrelationData
        forged = {**doc, "sha256": "0" * 64, "diagnosis": "Positive", "reason": None, "confidence": 0.999}
        forged_error = {"id": doc["id"], "error": {"code": "busy", "message": "forged"}, "payload_sha256": "0" * 64}
        for body in (forged_error, forged):
            self.client.client.publish(props.ResponseTopic, json.dumps(body), qos=1, properties=reply)
        doc["sha256"] = hashlib.sha256(message.payload).hexdigest()
        self.client.client.publish(props.ResponseTopic, json.dumps(doc), qos=1, properties=reply)


def test_indeterminate_reason_heat_map_and_pool_rendering(tmp_path, browser, screens, data_root):
    """Indeterminate with its reason, the explanation heat map over the image, and a pool of two, from
    stand-in pool members on an anonymous broker (see StandIn); their forged Positives are never shown."""
    ws = free_port()
    broker = Broker(tmp_path / "broker", extra=f"listener {ws} 127.0.0.1\nprotocol websockets\nhttp_dir {WWW}").start()
    wait_port(ws)
    pool = f"{ROOT}/allds-zone/allds-pool/Inference"
    members = [StandIn(broker.port, f"stand-in-{n}", pool) for n in (1, 2)]
    try:
        browser.get(f"http://127.0.0.1:{ws}/?connect=1&pools=allds-zone/allds-pool")
        wait(browser, lambda d: attr(d, "#conn-status", "data-state") == "connected", 15, "connected")
        open_tab(browser, "classify")
        from selenium.webdriver.support.ui import Select

        wait(browser, lambda d: "ONLINE" in text(d, "#target"), 10, "pool members seen")
        Select(browser.find_element("id", "target")).select_by_value("pool:allds-zone/allds-pool")
        picked = [data_root / "Benign/WBC-Benign-001.jpg", data_root / "Benign/WBC-Benign-005.jpg"]
        drop_files(browser, picked)
        for path in picked:
            card = result_card(browser, path.name)
            assert card["result"] == "Indeterminate"
            assert card["reason"] == "overexposed" and "overexposed" in card["reasonText"]
            assert card["confidence"] == "—"
            with Image.open(path) as image:
                assert card["heatShown"] and (card["heatWidth"], card["heatHeight"]) == image.size
            assert card["explanation"].startswith("occlusion")
        shoot(browser, screens, "indeterminate-heat-map")
        open_tab(browser, "devices")
        pool_card = '#pools [data-key="allds-zone/allds-pool"]'
        wait(browser, lambda d: "2 of 2 ONLINE" in text(d, pool_card), 10, "pool with both members ONLINE")
        shoot(browser, screens, "pool")
    finally:
        for member in members:
            member.client.close()
        broker.stop()


# -------------------------------------------------------------- the shipped broker configs serve the console


def shipped_config(tmp_path: Path, name: str, certs: Path | None = None) -> tuple[Broker, int, int]:
    """deploy/mosquitto/<name> with its ports moved to free ones and its files pointed at tmp_path; the
    console's listener block is used as shipped otherwise."""
    text = (REPO / "deploy/mosquitto" / name).read_text()
    tcp, ws = free_port(), free_port()
    moves = [("listener 1884 127.0.0.1", f"listener {tcp} 127.0.0.1"), ("listener 1883 127.0.0.1", f"listener {tcp} 127.0.0.1"),
             ("listener 9001 127.0.0.1", f"listener {ws} 127.0.0.1"), ("listener 9001\n", f"listener {ws} 127.0.0.1\n"),
             ("http_dir console/www", f"http_dir {WWW}"), ("http_dir /opt/allds/console/www", f"http_dir {WWW}"),
             ("/var/lib/mosquitto/", f"{tmp_path}/")]
    if certs:
        passwd = tmp_path / "passwd"
        passwd.touch()
        subprocess.run(["mosquitto_passwd", "-b", str(passwd), "allds-requester", PASSWORDS["allds-requester"]], check=True)
        moves += [("/etc/mosquitto/allds/passwd", str(passwd)), ("/etc/mosquitto/allds/acl", str(REPO / "deploy/mosquitto/acl"))]
        moves += [(f"/etc/mosquitto/allds/{f}", str(certs / f)) for f in ("ca.crt", "broker.crt", "broker.key")]
    for shipped, here in moves:
        text = text.replace(shipped, here)
    assert f"listener {ws} 127.0.0.1\nprotocol websockets\nhttp_dir {WWW}" in text, text
    text = text.replace("listener 8883\n", f"listener {free_port()} 127.0.0.1\n")
    broker = Broker(tmp_path / "broker", port=tcp, listeners=text).start()
    wait_port(ws)
    return broker, tcp, ws


def mqtt_over_websockets(port: int, tls_ca: Path | None = None, user: str | None = None) -> bool:
    """A paho MQTT 5 client over (secure) WebSockets; True once the broker accepted it."""
    import paho.mqtt.client as mqtt

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, transport="websockets", protocol=mqtt.MQTTv5)
    if tls_ca:
        client.tls_set(ca_certs=str(tls_ca))
    if user:
        client.username_pw_set(user, PASSWORDS[user])
    accepted = []
    client.on_connect = lambda c, u, f, rc, p: accepted.append(not rc.is_failure)
    client.connect("127.0.0.1", port)
    client.loop_start()
    deadline = time.monotonic() + 10
    while not accepted and time.monotonic() < deadline:
        time.sleep(0.02)
    client.loop_stop()
    client.disconnect()
    return accepted == [True]


def test_demo_config_serves_the_console_and_mqtt_over_websockets(tmp_path):
    import urllib.request

    broker, _, ws = shipped_config(tmp_path, "demo.conf")
    try:
        page = urllib.request.urlopen(f"http://127.0.0.1:{ws}/", timeout=5).read()
        assert page == (WWW / "index.html").read_bytes()
        assert urllib.request.urlopen(f"http://127.0.0.1:{ws}/vendor/mqtt.min.js", timeout=5).read()[:40]
        assert mqtt_over_websockets(ws)
    finally:
        broker.stop()


def test_site_config_serves_the_console_over_tls_to_users_with_a_password(tmp_path):
    import ssl
    import urllib.request

    certs = tmp_path / "certs"
    subprocess.run(["bash", str(REPO / "certs/make-certs.sh"), "--out", str(certs)], check=True, capture_output=True)
    broker, _, ws = shipped_config(tmp_path, "allds.conf", certs)
    try:
        context = ssl.create_default_context(cafile=str(certs / "ca.crt"))
        page = urllib.request.urlopen(f"https://127.0.0.1:{ws}/", timeout=5, context=context).read()
        assert page == (WWW / "index.html").read_bytes()
        with pytest.raises(OSError):  # no plain HTTP on the site's console port
            urllib.request.urlopen(f"http://127.0.0.1:{ws}/", timeout=5).read()
        assert mqtt_over_websockets(ws, certs / "ca.crt", "allds-requester")
        assert not mqtt_over_websockets(ws, certs / "ca.crt")  # anonymous: refused
    finally:
        broker.stop()


def test_the_console_words_every_reason_the_agent_gives():
    """Each reason an Indeterminate answer can carry has its own words on the page, not a fallback."""
    from model.policy import REASONS

    script = (Path(__file__).resolve().parents[1] / "console" / "www" / "console.js").read_text()
    table = script[script.index("const REASONS = {"):script.index("};", script.index("const REASONS = {"))]
    assert not [r for r in REASONS if not re.search(rf"\b{r}: \"", table)], table
