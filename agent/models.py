"""Models on disk: which folder of `model.dir` serves, which served before (for Rollback), and the
signed bundles delivered over the broker. Every model is verified before it may serve (its
artifact's SHA-256 against its card, one probe invocation; a bundle also its signature and canary)."""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from agent.config import MODEL_NAME, Config
from model.bundle import BundleError, VerifiedBundle, verify_bundle
from model.classifier import Classifier, ModelError, artifact_path

log = logging.getLogger("allds.models")
REMEMBERED_BUNDLES = 32


def _valid_state(state: object) -> bool:
    """The state file's shape: names or null, a list of bundle digests, and signing times by model name."""
    def is_time(value: object) -> bool:
        try:
            return isinstance(value, str) and datetime.fromisoformat(value).tzinfo is not None
        except ValueError:
            return False

    return (isinstance(state, dict) and all(isinstance(state.get(k), str | None) for k in ("active", "previous"))
            and isinstance(state.get("bundles", []), list) and all(isinstance(d, str) for d in state.get("bundles", []))
            and isinstance(state.get("newest", {}), dict)
            and all(isinstance(k, str) and is_time(v) for k, v in state.get("newest", {}).items()))


@dataclass
class Served:
    """What serves now and what served before."""

    active: str
    previous: str | None = None


class ModelStore:
    """`model.dir` and the agent's memory of it (`model.state_file`)."""

    def __init__(self, config: Config) -> None:
        self.model = config.model
        self.dir = config.model_dir
        self.state_file = Path(config.model.state_file) if config.model.state_file else None
        self.trusted_keys = [Path(k) for k in config.model.trusted_keys]
        state = self._read_state()
        self.served = Served(state.get("active") or config.model.name, state.get("previous"))
        self._bundles: list[str] = state.get("bundles", [])
        self._newest: dict[str, str] = state.get("newest", {})  # per model name, the latest `created` that went active

    def load(self, name: str) -> Classifier:
        """Model `name` of `model.dir`, verified; `ModelError` says why not."""
        if not MODEL_NAME.fullmatch(name):
            raise ModelError("the value is not a model name (letters, digits, '.', '_', '-', '@'; no path)")
        return Classifier.load(artifact_path(self.dir, name, self.model.variant), self.model.threads)

    def start(self) -> Classifier:
        """The model to serve at start: the last active one, else the one before it, else `model.name`."""
        for name in dict.fromkeys(n for n in (self.served.active, self.served.previous, self.model.name) if n):
            try:
                classifier = self.load(name)
            except (OSError, ModelError) as exc:
                log.error("model %s cannot serve: %s", name, exc)
                continue
            if name != self.served.active:
                self.activate(name)
            return classifier
        raise ModelError(f"no model of {self.dir} can serve (tried {self.served.active}, {self.served.previous}, "
                         f"{self.model.name})")

    def activate(self, name: str) -> None:
        """Remember `name` as serving and the one it replaces as the Rollback target."""
        if name != self.served.active:
            self.served = Served(name, self.served.active)
        self._write_state()

    def rollback_target(self) -> str:
        if not self.served.previous:
            raise ModelError("no earlier model to roll back to")
        return self.served.previous

    def seen(self, bundle_sha256: str) -> bool:
        """A bundle that went active before (a retained bundle comes again on every connect)."""
        return bundle_sha256 in self._bundles

    def verify(self, data: bytes) -> VerifiedBundle:
        """A delivered bundle, checked against the trusted keys, and not older than the newest of its model that
        went active here (`BundleError`): a signature proves who signed it, not that it is current. An older
        model still serves by `Rollback` or `Reload` of its folder."""
        bundle = verify_bundle(data, self.trusted_keys, self.model.max_bundle_bytes)
        if self.model.variant not in bundle.card["artifacts"]:
            raise BundleError(f"the bundle has no {self.model.variant} artifact")
        if not MODEL_NAME.fullmatch(bundle.folder_name):  # Reload and the state file name it by its folder
            raise BundleError(f"the bundle's folder name {bundle.folder_name[:40]}... is longer than a model name may "
                              "be (128 characters): shorten its model name or version")
        newest = self._newest.get(bundle.name)
        if newest and bundle.created < datetime.fromisoformat(newest):
            raise BundleError(f"the bundle of {bundle.name} {bundle.version} was signed {bundle.manifest['created']}, "
                              f"older than the one active here before ({newest}): Rollback or Reload serve older models")
        return bundle

    def install(self, bundle: VerifiedBundle) -> tuple[str, Classifier, float]:
        """Write the bundle's model folder into `model.dir` (its folder name is its model name from then
        on), load it and run its canary: (name, classifier, largest canary deviation). A folder this
        call wrote is removed again when the model fails."""
        fresh = not (self.dir / bundle.folder_name).exists()
        folder = bundle.install(self.dir)
        try:
            classifier = self.load(folder.name)
            return folder.name, classifier, bundle.check_canary(classifier)
        except (OSError, ValueError):
            if fresh:
                shutil.rmtree(folder, ignore_errors=True)
            raise

    def remember(self, bundle: VerifiedBundle) -> None:
        """A bundle went active: its retained copy is not installed again on every connect, and no bundle of
        its model signed before it is taken. Only these are remembered: junk cannot push them out, and a
        refusal the device's configuration or disk caused is retried when the bundle comes again."""
        self._bundles = [*self._bundles, bundle.sha256][-REMEMBERED_BUNDLES:]
        newest = self._newest.get(bundle.name)
        if not newest or bundle.created > datetime.fromisoformat(newest):
            self._newest = {**self._newest, bundle.name: bundle.manifest["created"]}
        self._write_state()

    def _read_state(self) -> dict:
        if not self.state_file or not self.state_file.exists():
            return {}
        try:
            state = json.loads(self.state_file.read_text())
            if not _valid_state(state):
                raise ValueError("not the agent's model state")
            return state
        except (OSError, ValueError) as exc:
            log.error("model state %s unreadable (%s); starting with model.name", self.state_file, exc)
            return {}

    def _write_state(self) -> None:
        """Atomically: a power cut leaves the old file or the new one."""
        if not self.state_file:
            return
        state = {"active": self.served.active, "previous": self.served.previous, "bundles": self._bundles,
                 "newest": self._newest}
        try:
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
            partial = self.state_file.with_suffix(".partial")
            with open(partial, "w") as f:
                json.dump(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, self.state_file)
        except OSError as exc:
            log.error("cannot remember the serving model in %s: %s", self.state_file, exc)
