"""The original project's serving style, for comparison only: full decode, one `model.predict`
per request on the `.keras` model, paho with default sockets (no TCP_NODELAY), one thread."""

from __future__ import annotations

import hashlib
import json
import sys

import cv2
import keras
import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


def main(port: int, model_path: str, request_topic: str, status_topic: str, reply_topic: str, size: int) -> None:
    model = keras.models.load_model(model_path, compile=False)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="baseline", protocol=mqtt.MQTTv5)

    def on_message(c, u, message):
        image = cv2.imdecode(np.frombuffer(message.payload, np.uint8), cv2.IMREAD_COLOR)
        x = cv2.resize(image, (size, size))[..., ::-1].astype(np.float32)[None] / 255.0
        p = model.predict(x, verbose=0)[0]
        correlation = getattr(message.properties, "CorrelationData", b"")
        props = Properties(PacketTypes.PUBLISH)
        props.CorrelationData = correlation
        body = {"id": correlation.decode(), "sha256": hashlib.sha256(message.payload).hexdigest(),  # replay checks it
                "diagnosis": "Positive" if p[1] >= 0.5 else "Negative",
                "probabilities": {"Benign": float(p[0]), "ALL": float(p[1])}}
        c.publish(getattr(message.properties, "ResponseTopic", None) or reply_topic, json.dumps(body), qos=1,
                  properties=props)

    client.on_message = on_message
    client.on_connect = lambda c, u, f, rc, p: (c.subscribe(request_topic, qos=1),
                                                c.publish(status_topic, "ONLINE", qos=1, retain=True))
    client.connect("127.0.0.1", port)
    client.loop_forever()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], int(sys.argv[6]))
