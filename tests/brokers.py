"""Brokers other than Mosquitto, each a real process on 127.0.0.1 and an ephemeral port with a generated
config in the test's directory, started and stopped by PID: ejabberd from Debian (MQTT 5 through its
mod_mqtt; no epmd, no network beyond loopback) and amqtt from PyPI (MQTT 3.1.1 only)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tests.helpers import free_port, wait_port

ERL = shutil.which("erl") or "/usr/bin/erl"
# A cold Erlang VM on a loaded 2-core host took over 30 s to listen (ejabberd, beside two trainings and the suite)
STARTUP_SECONDS = 90
USER, PASSWORD = "allds", "broker-test-password"  # ejabberd (anonymous login) takes any; amqtt checks its password file


def ejabberd_libs() -> str | None:
    """The folder holding Debian's ejabberd-<version> Erlang application, or None when ejabberd is not installed."""
    for root in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib/erlang/lib"):
        if any(Path(root).glob("ejabberd-*/ebin/ejabberd.app")):
            return root
    return None


def package_version(name: str) -> str | None:
    """The installed Debian package version, or None."""
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", name], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout or None


class _Process:
    """A broker process started from a generated config and stopped by PID."""

    port: int
    dir: Path
    log_path: Path
    proc: subprocess.Popen | None = None

    def _spawn(self, argv: list[str], env: dict[str, str] | None = None, ready: str | None = None) -> None:
        """Start the broker; wait for its port and, if given, for `ready` in its log. It never outlives a failure."""
        self._out = (self.dir / "stdout.log").open("ab")
        self.proc = subprocess.Popen(argv, cwd=self.dir, stdout=self._out, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})
        deadline = time.monotonic() + STARTUP_SECONDS
        try:
            wait_port(self.port, STARTUP_SECONDS)
            while ready and ready not in self.log():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"never logged {ready!r}")
                time.sleep(0.05)
        except TimeoutError as exc:
            self.stop()
            raise RuntimeError(f"{argv[0]} did not start on {self.port} ({exc}):\n{self.log()[-3000:]}") from None

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None

    def log(self) -> str:
        parts = [p.read_text(errors="replace") for p in (self.log_path, self.dir / "stdout.log") if p.exists()]
        return "\n".join(parts)


class _EjabberdYaml(yaml.SafeDumper):
    """ejabberd reads a plain YAML scalar as an Erlang atom and only a double-quoted one as a string:
    topic filters and paths are strings."""


_EjabberdYaml.add_representer(str, lambda dumper, value: dumper.represent_scalar(
    "tag:yaml.org,2002:str", value, style='"' if "/" in value else None))


class Ejabberd(_Process):
    """Debian's ejabberd with only its MQTT listener (mod_mqtt), anonymous login, as a foreground Erlang VM.

    Without a node name the VM starts no distribution and no epmd. For a cluster, each node is named
    `name@127.0.0.N` (one loopback address per node) and listens for the others on that address and the
    one `dist_port` they all share, without epmd; `join` makes it join another node's cluster.
    `mqtt` are mod_mqtt options (e.g. `access_subscribe`, `session_expiry`).
    """

    def __init__(self, workdir: Path, port: int | None = None, mqtt: dict | None = None, node: str | None = None,
                 dist_port: int | None = None, tls: tuple[Path, ...] | None = None) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.node, self.dist_port = node, dist_port
        self.log_path = self.dir / "ejabberd.log"
        listener = {"port": self.port, "ip": "127.0.0.1", "module": "mod_mqtt"}
        if tls:  # (certificate, key, CA): ejabberd finds each in `certfiles`
            listener["tls"] = True
        config = {"hosts": ["localhost"], "loglevel": "info", "log_rotate_count": 0, "listen": [listener],
                  "auth_method": "anonymous", "anonymous_protocol": "login_anon",
                  "modules": {"mod_mqtt": mqtt or {}}}
        if tls:
            config["certfiles"] = [str(p) for p in tls]
        self.conf = self.dir / "ejabberd.yml"
        self.conf.write_text(yaml.dump(config, Dumper=_EjabberdYaml, sort_keys=False))

    def argv(self) -> list[str]:
        argv = [ERL, "-noinput", "-mnesia", "dir", f'"{self.dir / "spool"}"']
        if self.node:
            argv += ["-name", self.node, "-setcookie", "allds-test", "-start_epmd", "false",
                     "-erl_epmd_port", str(self.dist_port), "-kernel", "inet_dist_use_interface",
                     "{" + self.node.split("@")[1].replace(".", ",") + "}"]
        return argv + ["-s", "ejabberd"]

    def join(self, master: Ejabberd) -> list[str]:
        """Join `master`'s cluster (`ejabberdctl join_cluster`, run from a short-lived hidden Erlang node on
        127.0.0.3 since ejabberdctl would need epmd); returns the cluster's nodes."""
        call = (f"J = rpc:call('{self.node}', ejabberd_admin, join_cluster, [<<\"{master.node}\">>]), "
                f"N = rpc:call('{self.node}', ejabberd_admin, list_cluster, []), "
                "io:format(\"~p~n~p~n\", [J, N]), halt().")
        out = subprocess.run([ERL, "-name", "ctl@127.0.0.3", "-setcookie", "allds-test", "-hidden", "-noinput",
                              "-start_epmd", "false", "-erl_epmd_port", str(self.dist_port),
                              "-kernel", "inet_dist_use_interface", "{127,0,0,3}", "-eval", call],
                             capture_output=True, text=True, timeout=60, env={**os.environ, "ERL_LIBS": ejabberd_libs() or ""})
        joined, nodes = (out.stdout.splitlines() + ["", ""])[:2]
        if joined != "ok":
            raise RuntimeError(f"join_cluster failed: {out.stdout} {out.stderr[-2000:]}")
        wait_port(self.port, 30)  # the joining node restarts ejabberd, listener included
        return re.findall(r"'([^']+)'", nodes)

    def start(self) -> Ejabberd:
        libs = ejabberd_libs()
        if libs is None:
            raise RuntimeError("ejabberd is not installed (apt-get install ejabberd)")
        # The port answers a little before ejabberd has finished starting (a join at that moment fails):
        # wait for "Start accepting TCP (or TLS) connections" too.
        self._spawn(self.argv(), {"ERL_LIBS": libs, "EJABBERD_CONFIG_PATH": str(self.conf),
                                  "EJABBERD_LOG_PATH": str(self.log_path), "ERL_CRASH_DUMP": str(self.dir / "erl_crash.dump"),
                                  "ERL_CRASH_DUMP_BYTES": "0"}, ready=f"connections at 127.0.0.1:{self.port} for mod_mqtt")
        return self


class Amqtt(_Process):
    """amqtt (PyPI), an MQTT 3.1.1 broker in Python, from its own command-line script, with one user
    (USER, PASSWORD) in a password file: amqtt keeps no session of an anonymous client."""

    def __init__(self, workdir: Path, port: int | None = None, tls: tuple[Path, Path] | None = None) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.log_path = self.dir / "stdout.log"
        from pwdlib.hashers.argon2 import Argon2Hasher  # amqtt's own dependency

        passwords = self.dir / "passwords"
        passwords.write_text(f"{USER}:{Argon2Hasher().hash(PASSWORD)}\n")
        listener = {"type": "tcp", "bind": f"127.0.0.1:{self.port}"}
        if tls:  # (certificate, key)
            listener.update(ssl=True, certfile=str(tls[0]), keyfile=str(tls[1]))
        config = {"listeners": {"default": listener},
                  "plugins": {"amqtt.plugins.authentication.FileAuthPlugin": {"password_file": str(passwords)}}}
        self.conf = self.dir / "amqtt.yaml"
        self.conf.write_text(yaml.safe_dump(config))

    def start(self) -> Amqtt:
        self._spawn([sys.executable, "-m", "amqtt.scripts.broker_script", "-c", str(self.conf)])
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
