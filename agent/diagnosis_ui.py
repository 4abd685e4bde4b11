"""HIAS's Diagnosis page over HTTP (`http.port`, off by default): `POST /Inference` with the image in
the multipart field `file` (what HIAS sends through its NGINX) or as the raw body, answered
`{"Response": "OK", "Message", "Diagnosis", "Confidence"}` by the same pipeline as MQTT requests
(gate, batching, metrics). Every answer is JSON, errors included (`"Response": "FAILED"`), because
HIAS's page script fails on anything else. Standard library server: one thread per connection,
at most `http.max_concurrent` requests at once, bodies over `http.max_body_bytes` refused unread.
"""

from __future__ import annotations

import email.parser
import email.policy
import ipaddress
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from agent.config import Http
from agent.service import ClassificationService

log = logging.getLogger("allds.http")


def hias_answer(reply: dict) -> dict:
    """Our answer JSON in the shape HIAS's Diagnosis page reads."""
    if "error" in reply:
        return {"Response": "FAILED", "Message": f"{reply['error']['code']}: {reply['error']['message']}"}
    answer = {"Response": "OK", "Message": f"{reply['diagnosis']} ({reply['model']['name']} {reply['model']['version']})",
              "Diagnosis": reply["diagnosis"]}
    if reply.get("confidence") is not None:
        answer["Confidence"] = reply["confidence"]
    if reply.get("reason"):
        answer["Reason"] = reply["reason"]
    return answer


def image_from(content_type: str, body: bytes) -> tuple[bytes, str | None]:
    """The image and its file name: the multipart field `file`, or the whole body."""
    if not content_type.lower().startswith("multipart/form-data"):
        return body, None
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode("latin-1") + body)
    for part in message.iter_parts() if message.is_multipart() else ():
        if part.get_param("name", header="content-disposition") == "file":
            return part.get_payload(decode=True) or b"", part.get_filename()
    raise ValueError("no form field named file")


class DiagnosisServer:
    """The listener, on a daemon thread."""

    def __init__(self, settings: Http, service: ClassificationService) -> None:
        self.settings = settings
        self.service = service
        self.allowed = [ipaddress.ip_network(n, strict=False) for n in settings.allowed_clients]
        self.slots = threading.BoundedSemaphore(settings.max_concurrent)
        self.server = ThreadingHTTPServer((settings.bind, settings.port), self._handler())
        self.server.daemon_threads = True

    def start(self) -> None:
        threading.Thread(target=self.server.serve_forever, name="http", daemon=True).start()
        log.info("HIAS Diagnosis listener on %s:%s", self.settings.bind, self.server.server_port)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "AllDS"

            def log_message(self, format: str, *args) -> None:  # noqa: A002 - the standard library's name
                log.debug("%s %s", self.client_address[0], format % args)

            def send_json(self, status: int, doc: dict) -> None:
                data = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802 - the standard library's name
                self.send_json(405, {"Response": "FAILED", "Message": "POST an image to /Inference"})

            def do_POST(self) -> None:  # noqa: N802 - the standard library's name
                address = ipaddress.ip_address(self.client_address[0])
                if not any(address in network for network in outer.allowed):
                    self.send_json(403, {"Response": "FAILED", "Message": "this address may not use the agent"})
                    return
                if self.path.rstrip("/") != "/Inference":
                    self.send_json(404, {"Response": "FAILED", "Message": "POST an image to /Inference"})
                    return
                try:
                    length = int(self.headers.get("Content-Length", ""))
                except ValueError:
                    self.send_json(411, {"Response": "FAILED", "Message": "Content-Length is required"})
                    return
                if not 0 < length <= outer.settings.max_body_bytes:
                    self.close_connection = True  # the body is never read
                    self.send_json(413, {"Response": "FAILED", "Message": f"the body must be 1 to "
                                                                          f"{outer.settings.max_body_bytes} bytes"})
                    return
                if not outer.slots.acquire(blocking=False):
                    self.close_connection = True
                    self.send_json(503, {"Response": "FAILED", "Message": "busy: too many requests at once"})
                    return
                try:
                    self.serve(self.rfile.read(length))
                finally:
                    outer.slots.release()

            def serve(self, body: bytes) -> None:
                try:
                    image, name = image_from(self.headers.get("Content-Type", ""), body)
                except ValueError as exc:
                    self.send_json(400, {"Response": "FAILED", "Message": f"bad_request: {exc}"})
                    return
                done = threading.Event()
                answer: dict = {}

                def respond(reply: dict) -> None:
                    answer.update(reply)
                    done.set()

                if not outer.service.submit_local(image, name, respond):
                    self.send_json(503, {"Response": "FAILED", "Message": "the agent is stopping"})
                elif not done.wait(outer.settings.timeout_s):
                    self.send_json(504, {"Response": "FAILED", "Message": "no answer in time"})
                else:
                    self.send_json(200, hias_answer(answer))

        return Handler
