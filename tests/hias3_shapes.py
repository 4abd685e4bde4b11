"""HIAS 3 as its own code reads our traffic: one function per rule set, written from the source (no code
copied) of HIAS 3's MQTT IoT agent, `leukaemiamedtech/hias-mqtt-iot-agent` at 4f2dd56 (release 4.0.0),
and of HIAS core, `leukaemiamedtech/hias-core` at 9ff7ea2. docs/hias.md ("HIAS 3 dialect and the
Diagnosis UI") cites the lines each rule comes from.

Each parser takes what the IoT agent takes (the topic, the payload bytes, and the HIASCDI data it looks
up over HTTP, passed in here) and returns what it stores or forwards, None where it logs and drops the
message, or raises the exception it raises. An exception matters: the IoT agent does not catch it,
paho re-raises exceptions from `on_message` (`suppress_exceptions` is off), and the network thread of
`loop_start` ends, so HIAS stops processing every device's traffic.
"""

from __future__ import annotations

import base64
import json

# mqtt.py on_message (lines 206-228): the channel is topic level 4, or level 3 for these three roots;
# any other root leaves `topic` unassigned (UnboundLocalError at line 234).
CHANNEL_LEVEL = {"Agents": 4, "AiModels": 4, "AiAgents": 4, "Devices": 4, "HIASBCH": 4, "HIASCDI": 4, "HIASHDI": 4,
                 "Applications": 3, "Robotics": 3, "Staff": 3}
# Channels whose callback agent.py main() sets (lines 699-707); AiAgent, AiModel, Integrity and Zone
# only log "callback required". Actuators calls a method that does not exist (mqtt.py line 239).
HANDLED = {"BCI", "Classification", "Commands", "Life", "Notifications", "Sensors", "State", "Status"}
APP_TYPES = {"Robotics", "Application", "Staff"}  # AbstractAgent.py lines 67-70
KEEP_PLURAL = {"Robotics", "HIASCDI", "HIASHDI", "HIASBCH", "Staff"}  # AbstractAgent.py lines 72-77
LIFE_FIELDS = ("CPU", "Memory", "Diskspace", "Temperature", "Latitude", "Longitude")

# What an AllDS agent in the hias3 dialect publishes on {base}/Classification: a diagnosis is the
# model's `Diagnosis` property; a model-delivery step is the model's state.
CLASSIFICATION_DIAGNOSIS = {"Model": "cellnet_standardised", "Type": "Diagnosis", "Value": "Positive",
                            "Message": "Acute Lymphoblastic Leukemia detected"}
CLASSIFICATION_STATE = {"Model": "cellnet_standardised", "State": "active",
                        "Message": "cellnet_standardised 2026-12-01.6 active"}
# The `models` attribute the IoT agent reads from the agent's HIASCDI entity (agent.py lines 472-498).
HIASCDI_MODELS = [{"model": "cellnet_standardised", "context": {"states": {"value": ["received", "verified", "active", "failed",
                                                                         "rolled_back"]},
                                                    "state": {"value": ""},
                                                    "properties": {"value": {"Diagnosis": {"value": ""}}}}}]
LIFE = {"CPU": 12.5, "Memory": 41.0, "Diskspace": 23.4, "Temperature": 48.7, "Latitude": 41.39, "Longitude": 2.17}
# A command as HIAS (a rule's output_device_command, agent.py lines 661-673) sends it to the IoT agent,
# and as the IoT agent forwards it to the device (lines 205-213).
COMMAND_FROM_HIAS = {"Use": "Device", "To": "allds-device", "Zone": "allds-zone", "Property": "model",
                     "Type": "Reload", "Value": "cellnet", "Message": "Reload cellnet"}
COMMAND_TO_DEVICE = {"Type": "Reload", "Property": "model", "Value": "cellnet", "Message": "Reload cellnet"}
# The device's HIASCDI attribute a command addresses, with what entity_actuator_data reads of it
# (hiascdi.py lines 182-210).
HIASCDI_DEVICE = {"model": {"type": "Text", "value": "cellnet", "metadata": {
    "property": {"value": "model"}, "propertyId": {"value": "1"}, "propertyType": {"value": "Text"},
    "propertyName": {"value": "Model"}, "description": {"value": "Served model"},
    "commands": {"value": {"Reload": ["cellnet_standardised", "cellnet", "allds2020"], "Rollback": ["previous"],
                           "Life": ["now"]}}}}}


def dispatch(topic: str) -> str | None:
    """The channel whose callback the IoT agent runs for a message on `topic`, None if it only logs it."""
    levels = topic.split("/")
    root = levels[1]
    if root not in CHANNEL_LEVEL:
        raise UnboundLocalError(f"mqtt.py line 234: no channel for topic root {root!r}")
    channel = levels[CHANNEL_LEVEL[root]]  # IndexError for a topic that is too short
    if channel == "Actuators":
        raise AttributeError("mqtt.py line 239: 'mqtt' object has no attribute 'actuator_state_callback'")
    return channel if channel in HANDLED else None


def entity(topic: str) -> tuple[str, str]:
    """(HIASCDI entity type, entity id) of the publisher, as get_entity_details derives them."""
    levels = topic.split("/")
    kind = levels[1] if levels[1] in KEEP_PLURAL else levels[1][:-1]
    return kind, levels[2] if kind in APP_TYPES else levels[3]


def parse_status(payload: bytes) -> str:
    """The network status HIAS stores: the payload as text (agent.py line 67)."""
    return payload.decode()


def parse_life(payload: bytes) -> dict:
    """The HIASCDI attributes a Life payload sets (hiascdi.py lines 155-180)."""
    data = json.loads(payload.decode("utf-8"))
    values = [float(data[field]) for field in LIFE_FIELDS]
    cpu, memory, disk, temperature, latitude, longitude = values
    return {"cpuUsage": cpu, "memoryUsage": memory, "hddUsage": disk, "temperature": temperature,
            "location": [latitude, longitude]}


def parse_sensors(payload: bytes, entity_attributes: dict) -> dict | None:
    """The HIASHDI Sensors record (hiashdi.py lines 162-182); None when `Type` names no attribute of the
    publisher's entity (agent.py lines 351-354: "sensors not found")."""
    data = json.loads(payload.decode("utf-8"))
    if data["Type"] not in entity_attributes:
        return None
    value = data["Value"]  # hiascdi.py line 215
    return {"Sensor": data["Sensor"], "Type": data["Type"], "Value": value, "Message": data["Message"]}


def parse_classification(payload: bytes, models: list | None) -> dict | None:
    """What a Classification payload does (agent.py lines 447-530, hiashdi.py lines 205-216):
    `models` is the publisher's HIASCDI `models` value. Returns the models list HIAS writes back (only
    the entries named `Model`: an unknown name empties it) and the HIASHDI record; None when the
    entity has no models."""
    data = json.loads(payload.decode("utf-8"))
    if models is None:
        return None
    if not models:
        data["Model"]  # noqa: B018 - the log line names it (line 502): KeyError without it
        return None
    kept = []
    for model in models:
        if model["model"] == data["Model"]:
            context = model["context"]
            if "State" in data and data["State"] in context["states"]["value"]:
                context["state"] = {"value": data["State"]}
            if "Type" in data and data["Type"] in context["properties"]["value"]:
                context["properties"]["value"][data["Type"]] = {"value": data["Value"]}
            kept.append(model)
    record = {"AiAgent": "<publisher>", "Type": data["Type"] if "Type" in data else "State",
              "Value": data["Value"] if "Value" in data else data["State"], "Message": data["Message"]}
    return {"models": kept, "record": record}


def parse_command(payload: bytes, device: dict | None = None, location: str = "allds-location") -> tuple[str, dict] | None:
    """Where the IoT agent forwards a command published on an entity's Commands topic, and what
    (agent.py lines 151-229): None when it drops it. `device` is the target's HIASCDI entity (its
    attributes); None skips the checks against it."""
    data = json.loads(payload.decode("utf-8"))
    if "Use" not in data or data["Use"] != "Device":
        return None  # "Command not supported yet" (lines 168-176)
    target = data["To"]
    prop = data["Property"]
    if device is not None:
        if prop not in device:
            return None  # "Property not found"
        commands = device[prop]["metadata"]["commands"]["value"]
        if data["Type"] not in commands or data["Value"] not in commands[data["Type"]]:
            return None  # "Command not found"
        metadata = device[prop]["metadata"]
        for key in ("property", "propertyId", "propertyType", "propertyName", "description"):
            metadata[key]["value"]  # noqa: B018 - entity_actuator_data reads each (KeyError without it)
    forwarded = {"Type": data["Type"], "Property": prop, "Value": data["Value"], "Message": data["Message"]}
    return f"{location}/Devices/{data['Zone']}/{target}/Commands", forwarded


def diagnosis_ui_request(image: bytes, file_name: str, user: str, password: str,
                         mime: str = "image/jpeg") -> tuple[dict[str, str], bytes]:
    """Headers and body of the request HIAS's Diagnosis page makes (AiAgents.php infer, lines 2244-2270):
    POST, multipart/form-data with the image in the field `file` (a PHP CURLFile), HTTP Basic
    credentials of the logged-in HIAS user, 30 s timeout."""
    boundary = "------------------------hias3shapes0123456789"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{file_name}"\r\n'
            f"Content-Type: {mime}\r\n\r\n").encode() + image + f"\r\n--{boundary}--\r\n".encode()
    credentials = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {credentials}", "Accept": "*/*",
            "Content-Type": f"multipart/form-data; boundary={boundary}", "Content-Length": str(len(body))}, body


def diagnosis_ui_result(answer: bytes, image_path: str) -> str | None:
    """The Result the Diagnosis page shows for an answer (AiAgents.js classify, lines 373-414, after
    AiAgents.php re-encodes it with json_decode/json_encode): True/False Positive/Negative by the
    file name, "" when the Diagnosis or the name carries no label, None when the page keeps
    "WAITING FOR RESPONSE". TypeError where the page's script fails (an answer that is not JSON)."""
    try:
        resp = json.loads(answer)
    except ValueError:
        resp = None  # PHP json_decode gives null, json_encode prints "null"
    if resp is None:
        raise TypeError("AiAgents.js line 383: Cannot read properties of null (reading 'Response')")
    if not isinstance(resp, dict) or resp.get("Response") != "OK":
        return None
    diagnosis, result = resp.get("Diagnosis"), ""
    if "_0" in image_path and diagnosis == "Negative":
        result = "True Negative"
    elif "_0" in image_path and diagnosis == "Positive":
        result = "False Positive"
    elif "_1" in image_path and diagnosis == "Positive":
        result = "True Positive"
    elif "_1" in image_path and diagnosis == "Negative":
        result = "False Negative"
    if "Non-Covid" in image_path and diagnosis == "Negative":
        result = "True Negative"
    elif "Non-Covid" in image_path and diagnosis == "Positive":
        result = "False Positive"
    elif "Covid" in image_path and diagnosis == "Positive":
        result = "True Positive"
    elif "Covid" in image_path and diagnosis == "Negative":
        result = "False Negative"
    return result
