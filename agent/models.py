"""Models on disk: which folder of `model.dir` serves, which served before (for Rollback), and the
signed bundles delivered over the broker. Every model is verified before it may serve (its
artifact's SHA-256 against its card, one probe invocation; a bundle also its signature and canary)."""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from agent.config import MODEL_NAME, Config
from model.bundle import BundleError, VerifiedBundle, verify_bundle
from model.classifier import Classifier, ModelError, artifact_path

log = logging.getLogger("allds.models")
REMEMBERED_BUNDLES = 32


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
        """A bundle handled before (a retained bundle comes again on every connect)."""
        return bundle_sha256 in self._bundles

    def verify(self, data: bytes) -> VerifiedBundle:
        """A delivered bundle, checked against the trusted keys (`BundleError`)."""
        bundle = verify_bundle(data, self.trusted_keys, self.model.max_bundle_bytes)
        if self.model.variant not in bundle.card["artifacts"]:
            raise BundleError(f"the bundle has no {self.model.variant} artifact")
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

    def remember(self, bundle_sha256: str) -> None:
        """A bundle was handled (accepted or not): its retained copy is not tried again on every connect."""
        self._bundles = [*self._bundles, bundle_sha256][-REMEMBERED_BUNDLES:]
        self._write_state()

    def _read_state(self) -> dict:
        if not self.state_file or not self.state_file.exists():
            return {}
        try:
            state = json.loads(self.state_file.read_text())
            return state if isinstance(state, dict) else {}
        except (OSError, ValueError) as exc:
            log.error("model state %s unreadable (%s); starting with model.name", self.state_file, exc)
            return {}

    def _write_state(self) -> None:
        """Atomically: a power cut leaves the old file or the new one."""
        if not self.state_file:
            return
        state = {"active": self.served.active, "previous": self.served.previous, "bundles": self._bundles}
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
