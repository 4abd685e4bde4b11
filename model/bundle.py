"""Signed model bundles: one file that carries a model folder (its card and every file the card lists)
and a canary set, signed with Ed25519, so that a device can check who made a model and that no byte of
it changed before it serves it. See docs/bundle.md for the layout and the checks.

    keygen(out_dir)                                   -> signing.key (PEM, 0600), signing.pub
    build_bundle(folder, private_key, canary)         -> bytes        (canary = make_canary(folder, data_root))
    verify_bundle(data, trusted_keys, max_bytes)      -> VerifiedBundle, or BundleError with a short reason
    VerifiedBundle.install(model_dir)                 -> <model_dir>/<name>@<version>-<sha12>/, written atomically
    VerifiedBundle.check_canary(classifier)           -> max |Δp|, or BundleError

Verification needs only the standard library, NumPy and `cryptography` (no TensorFlow, no pickle):
the signature covers every byte after the signature block, so nothing unsigned is parsed beyond
two lengths and a small JSON object.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import shutil
import struct
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from model.classifier import CARD_NAME, Classifier, ModelError, check_card, read_card

MAGIC = b"ALLDS-BUNDLE/1\n"
FORMAT = 1
MAX_SIGNATURE_BLOCK = 4096
MAX_MANIFEST = 1 << 20
MAX_MEMBERS = 64
MAX_CANARY_IMAGES = 64
# A canary output may differ from the signer's by one int8 step of the artifact's output
# (`Classifier.output_step`: 1/256 for an int8 softmax, at least that for any artifact): LiteRT's int8
# kernels may round one step differently on another CPU; a different model or a broken runtime differs by far more.
CANARY_TOLERANCE = 1 / 256 + 1e-6
CANARY_INPUTS = "canary_inputs.npy"
SIGNING_KEY, SIGNING_PUB = "signing.key", "signing.pub"
# Member, model and version names: a plain file name (no separators, no leading dot, no "..").
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_U32 = struct.Struct(">I")


class BundleError(ValueError):
    """A bundle that must not be installed or served; the message is a short reason."""


@dataclass(frozen=True)
class Canary:
    """Preprocessed held-out inputs and the probabilities each .tflite artifact of the model gives for them."""

    inputs: np.ndarray  # (N, size, size, 3) float32, the output of model.preprocess.preprocess
    expected: dict[str, np.ndarray]  # artifact variant (int8, float32) -> (N, classes) float32
    images: list[str]  # the images' paths relative to the data root


def keygen(out_dir: Path) -> tuple[Path, Path]:
    """Write a new Ed25519 key pair `signing.key` (PKCS#8 PEM, mode 0600) and `signing.pub` into
    `out_dir`; existing files are never overwritten."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    key_path, pub_path = out_dir / SIGNING_KEY, out_dir / SIGNING_PUB
    for path in (key_path, pub_path):
        if path.exists():
            raise FileExistsError(f"{path} exists; not overwriting a key")
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub_path.write_bytes(private.public_key().public_bytes(serialization.Encoding.PEM,
                                                           serialization.PublicFormat.SubjectPublicKeyInfo))
    return key_path, pub_path


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """An unencrypted Ed25519 private key from a PEM file (as `keygen` writes it)."""
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file; `BundleError` if it is unreadable or another kind of key."""
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise BundleError(f"trusted key {path} is unreadable: {type(exc).__name__}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise BundleError(f"trusted key {path} is not an Ed25519 public key")
    return key


def key_id(key: Ed25519PublicKey) -> str:
    """Hex SHA-256 of the 32 raw public-key bytes: names the signer in a bundle."""
    return hashlib.sha256(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)).hexdigest()


def listed_files(card: dict) -> dict[str, str]:
    """The files of a model folder its card lists, name -> sha256: every {"file", "sha256"} object in the
    card whose file is a plain name (entries with a path, such as the split lists under `data`, point
    into the repository, not into the model folder)."""
    found: dict[str, str] = {}

    def walk(node: object) -> None:
        if isinstance(node, dict):
            name, digest = node.get("file"), node.get("sha256")
            if isinstance(name, str) and isinstance(digest, str) and "/" not in name:
                if not _SAFE_NAME.fullmatch(name) or name == CARD_NAME:
                    raise BundleError(f"card lists an unsafe file name {name[:40]!r}")
                if found.setdefault(name, digest) != digest:
                    raise BundleError(f"card lists {name} with two different sha256")
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(card)
    for variant, entry in card["artifacts"].items():
        if not isinstance(entry, dict) or entry.get("file") not in found:
            raise BundleError(f"card artifact {variant} is not a plain file name with a sha256")
    return found


def make_canary(folder: Path, data_root: Path, count: int = 8) -> Canary:
    """`count` held-out images of the card's own test list, preprocessed, with the probabilities each
    .tflite artifact of the folder gives for them. They are spread over the int8 artifact's P(ALL)
    ranking of a pool of 8 x `count` test images, so uncertain images (whose outputs move first when a
    runtime computes differently) are in the set as well as confident ones of both classes."""
    from model.data import REPO, read_list
    from model.preprocess import preprocess_file

    if not 1 <= count <= MAX_CANARY_IMAGES:
        raise ValueError(f"canary size must be 1..{MAX_CANARY_IMAGES}")
    folder = Path(folder)
    card = read_card(folder)
    test_list = REPO / card.get("data", {}).get("splits", {}).get("test", {}).get("file", "")
    if not test_list.is_file():
        raise FileNotFoundError(f"the card of {folder.name} names no test split list in this repository")
    paths = read_list(test_list)
    if len(paths) < count:
        raise ValueError(f"{test_list} has {len(paths)} images, fewer than the canary's {count}")
    pool = [paths[i] for i in np.unique(np.linspace(0, len(paths) - 1, min(len(paths), 8 * count)).round().astype(int))]
    pool_inputs = np.stack([preprocess_file(Path(data_root) / p, card["input_size"]) for p in pool])
    classifiers = {variant: Classifier.load(folder / entry["file"]) for variant, entry in card["artifacts"].items()
                   if isinstance(entry, dict) and str(entry.get("file", "")).endswith(".tflite")}
    if not classifiers:
        raise ModelError(f"{folder.name} has no .tflite artifact to make a canary with")
    reference = classifiers.get("int8") or next(iter(classifiers.values()))
    ranking = np.argsort(reference.p_all(np.concatenate([reference.classify(x[None]) for x in pool_inputs])), kind="stable")
    chosen = ranking[np.linspace(0, len(ranking) - 1, count).round().astype(int)]
    inputs = pool_inputs[chosen].astype(np.float32)
    expected = {variant: np.concatenate([c.classify(x[None]) for x in inputs]).astype(np.float32)
                for variant, c in classifiers.items()}
    return Canary(inputs, expected, [pool[i] for i in chosen])


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)
    return buffer.getvalue()


def _canary_name(variant: str) -> str:
    return f"canary_expected_{variant}.npy"


SERVED_VARIANTS = ("int8", "float32")  # what a Pi serves; the .keras file stays with the trainer


def build_bundle(folder: Path, private_key: Ed25519PrivateKey, canary: Canary,
                 variants: tuple[str, ...] = SERVED_VARIANTS) -> bytes:
    """A signed bundle of the model folder: its card (listing only the artifacts of `variants`), every
    file that card lists, and the canary."""
    folder = Path(folder)
    card = check_card(json.loads((folder / CARD_NAME).read_bytes()))
    missing = [v for v in variants if v not in card["artifacts"]]
    if missing or not variants:
        raise BundleError(f"{folder.name} has no {', '.join(missing) or 'chosen'} artifact")
    card = check_card({**card, "artifacts": {v: e for v, e in card["artifacts"].items() if v in variants}})
    card_bytes = (json.dumps(card, indent=2) + "\n").encode()
    for label in (card["name"], card["version"]):
        if not _SAFE_NAME.fullmatch(label):
            raise BundleError(f"model name/version {label[:40]!r} is not a plain name")
    members = [(CARD_NAME, card_bytes)]
    for name, digest in sorted(listed_files(card).items()):
        content = (folder / name).read_bytes()
        if hashlib.sha256(content).hexdigest() != digest:
            raise BundleError(f"{folder / name} differs from the sha256 its card lists")
        members.append((name, content))
    expected_names = {variant: _canary_name(variant) for variant in canary.expected}
    members.append((CANARY_INPUTS, _npy(canary.inputs)))
    members += [(expected_names[v], _npy(a)) for v, a in canary.expected.items()]
    names = [name for name, _ in members]
    if len(set(names)) != len(names):
        raise BundleError("the card lists a file named like a canary member")
    manifest = {
        "format": FORMAT, "name": card["name"], "version": card["version"], "card": CARD_NAME,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "members": [{"name": n, "size": len(c), "sha256": hashlib.sha256(c).hexdigest()} for n, c in members],
        "canary": {"inputs": CANARY_INPUTS, "expected": expected_names, "images": canary.images},
    }
    manifest_bytes = json.dumps(manifest, indent=1).encode()
    body = _U32.pack(len(manifest_bytes)) + manifest_bytes + b"".join(c for _, c in members)
    signature = json.dumps({"algorithm": "Ed25519", "key": key_id(private_key.public_key()),
                            "signature": base64.b64encode(private_key.sign(MAGIC + body)).decode()}).encode()
    return MAGIC + _U32.pack(len(signature)) + signature + body


@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle whose signature, members, card and canary passed `verify_bundle`."""

    name: str
    version: str
    sha256: str  # of the whole bundle file (what `sha256sum` prints for it)
    key: Path  # the trusted public key that verified it
    manifest: dict
    card: dict
    members: dict[str, bytes]  # every member, card and canary included, by file name
    canary: Canary

    @property
    def created(self) -> datetime:
        """When the bundle was signed (the manifest's `created`, checked by `verify_bundle`)."""
        return datetime.fromisoformat(self.manifest["created"])

    @property
    def folder_name(self) -> str:
        """`<name>@<version>-<first 12 hex digits of the bundle's sha256>`."""
        return f"{self.name}@{self.version}-{self.sha256[:12]}"

    def install(self, model_dir: Path) -> Path:
        """Write every member into `<model_dir>/<folder_name>/` and return that folder.

        Atomic: the files are written and fsynced in a hidden temporary folder inside `model_dir`, which
        is then renamed. An existing folder of that name is never touched: if it holds exactly this
        bundle's files (a retained bundle delivered again) it is returned, otherwise `BundleError`.
        """
        model_dir = Path(model_dir)
        final = model_dir / self.folder_name
        if final.exists():
            return self._existing(final)
        try:
            model_dir.mkdir(parents=True, exist_ok=True)
            partial = Path(tempfile.mkdtemp(prefix=f".{self.folder_name}.", suffix=".partial", dir=model_dir))
        except OSError as exc:
            raise BundleError(f"cannot write into {model_dir}: {exc.strerror or exc}") from None
        try:
            for name, content in self.members.items():
                with open(partial / name, "xb") as f:
                    f.write(content)
                    f.flush()
                    os.fsync(f.fileno())
                os.chmod(partial / name, 0o644)
            os.chmod(partial, 0o755)
            _fsync_dir(partial)
            os.rename(partial, final)
            _fsync_dir(model_dir)
        except OSError as exc:
            shutil.rmtree(partial, ignore_errors=True)
            if final.exists():  # another process installed the same bundle meanwhile
                return self._existing(final)
            raise BundleError(f"cannot install {self.folder_name}: {exc.strerror or exc}") from None
        return final

    def _existing(self, folder: Path) -> Path:
        for name, content in self.members.items():
            path = folder / name
            if not path.is_file() or path.read_bytes() != content:
                raise BundleError(f"{folder.name} exists with other content; not overwritten")
        return folder

    def check_canary(self, classifier: Classifier) -> float:
        """Run the canary inputs through `classifier` (loaded from this bundle's installed folder) one
        by one and return the largest deviation from the signer's probabilities; `BundleError` if any
        output differs by more than `canary_tolerance(classifier)`, or the classifier is not this bundle's model."""
        tolerance = canary_tolerance(classifier)
        artifacts = self.card["artifacts"]
        variant = next((v for v, e in artifacts.items() if isinstance(e, dict) and e.get("file") == classifier.path.name),
                       None)
        if variant is None or classifier.sha256 != artifacts[variant]["sha256"]:
            raise BundleError(f"canary: {classifier.path.name} is not an artifact of {self.folder_name}")
        if variant not in self.canary.expected:
            raise BundleError(f"canary: the bundle has no expected outputs for the {variant} artifact")
        expected = self.canary.expected[variant]
        worst, outputs = 0.0, []
        for i, x in enumerate(self.canary.inputs):
            out = np.asarray(classifier.classify(x[None]))
            if out.shape != expected[i : i + 1].shape or not np.all(np.isfinite(out)):
                raise BundleError(f"canary: image {i} gave outputs of shape {out.shape}, expected {expected[i:i + 1].shape}")
            deviation = float(np.max(np.abs(out - expected[i])))
            if deviation > tolerance:
                raise BundleError(f"canary mismatch on image {i} ({self.canary.images[i]}): "
                                  f"max |Δp| {deviation:.4f} > {tolerance:.4f}")
            worst = max(worst, deviation)
            outputs.append(out[0])
        self._check_classes(classifier, np.array(outputs))
        return worst

    def _check_classes(self, classifier: Classifier, outputs: np.ndarray) -> None:
        """The canary images are held-out images of known class (their folders): of those the card's classes
        decide confidently (P(ALL) at most 0.1 or at least 0.9), at least half must be decided as their folders
        say. The raw outputs cannot tell a card whose class names are swapped; this can."""
        from model.data import label_from_path

        p_all = classifier.p_all(outputs)
        judged = [(p >= 0.9, label) for p, label in zip(p_all, map(label_from_path, self.canary.images), strict=True)
                  if label is not None and (p >= 0.9 or p <= 0.1)]
        against = sum(positive != bool(label) for positive, label in judged)
        if len(judged) >= 2 and 2 * against > len(judged):
            raise BundleError(f"canary: the card's classes contradict its images: {against} of the {len(judged)} "
                              "decided confidently are decided against their class folders")


def canary_tolerance(classifier: Classifier) -> float:
    """`CANARY_TOLERANCE`, or one output step of the classifier's int8 arithmetic where that is larger."""
    return max(CANARY_TOLERANCE, (classifier.output_step or 0.0) + 1e-6)


def verify_bundle(data: bytes, trusted_keys: list[Path], max_bytes: int) -> VerifiedBundle:
    """Check a bundle completely before anything of it is used; `BundleError` with a short reason:
    too large, not a bundle, unsigned, unknown key, bad signature, malformed manifest, member hash
    mismatch, card schema, missing member, canary shape."""
    if len(data) > max_bytes:
        raise BundleError(f"too large: {len(data)} bytes, the limit is {max_bytes}")
    if not data.startswith(MAGIC):
        raise BundleError("not an AllDS model bundle")
    at = len(MAGIC)
    signature_length, at = _u32(data, at, "signature block")
    if signature_length == 0:
        raise BundleError("unsigned")
    if signature_length > MAX_SIGNATURE_BLOCK or at + signature_length > len(data):
        raise BundleError("malformed signature block")
    signer, signature = _signature(data[at : at + signature_length])
    body = data[at + signature_length :]
    keys = {}
    for path in trusted_keys:
        key = load_public_key(path)
        keys[key_id(key)] = (Path(path), key)
    if signer not in keys:
        raise BundleError(f"unknown key {signer[:16]}")
    key_path, key = keys[signer]
    try:
        key.verify(signature, MAGIC + body)
    except InvalidSignature:
        raise BundleError("bad signature") from None
    manifest, members = _members(body)
    try:
        card = check_card(json.loads(members[CARD_NAME]))
    except (ValueError, UnicodeDecodeError) as exc:  # ModelError and JSONDecodeError are ValueErrors
        raise BundleError(f"card schema: {exc}") from None
    if (card["name"], card["version"]) != (manifest["name"], manifest["version"]):
        raise BundleError(f"card is {card['name']}@{card['version']}, manifest says {manifest['name']}@{manifest['version']}")
    for name, digest in listed_files(card).items():
        if name not in members:
            raise BundleError(f"missing member {name} (listed in the card)")
        if hashlib.sha256(members[name]).hexdigest() != digest:
            raise BundleError(f"member {name} differs from the sha256 in the card")
    canary = _canary(manifest, members, card)
    return VerifiedBundle(card["name"], card["version"], hashlib.sha256(data).hexdigest(), key_path, manifest, card,
                          members, canary)


def _u32(data: bytes, at: int, what: str) -> tuple[int, int]:
    if at + _U32.size > len(data):
        raise BundleError(f"truncated before the {what}")
    return _U32.unpack_from(data, at)[0], at + _U32.size


def _signature(block: bytes) -> tuple[str, bytes]:
    try:
        fields = json.loads(block)
        signer, signature = fields["key"], base64.b64decode(fields["signature"], validate=True)
        algorithm = fields["algorithm"]
    except (ValueError, TypeError, KeyError, UnicodeDecodeError):
        raise BundleError("malformed signature block") from None
    if algorithm != "Ed25519" or not isinstance(signer, str) or len(signature) != 64:
        raise BundleError("malformed signature block")
    return signer, signature


def _members(body: bytes) -> tuple[dict, dict[str, bytes]]:
    """The signed manifest and the members it lists, each checked against its size and sha256."""
    length, at = _u32(body, 0, "manifest")
    if length > MAX_MANIFEST or at + length > len(body):
        raise BundleError("malformed manifest: bad length")
    try:
        manifest = json.loads(body[at : at + length])
    except (ValueError, UnicodeDecodeError):
        raise BundleError("malformed manifest: not JSON") from None
    at += length
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError("malformed manifest: unknown format")
    for key in ("name", "version"):
        if not isinstance(manifest.get(key), str) or not _SAFE_NAME.fullmatch(manifest[key]):
            raise BundleError(f"malformed manifest: unsafe {key}")
    try:
        if datetime.fromisoformat(manifest["created"]).tzinfo is None:
            raise ValueError("no time zone")
    except (KeyError, TypeError, ValueError):
        raise BundleError("malformed manifest: created") from None
    entries = manifest.get("members")
    if not isinstance(entries, list) or not 0 < len(entries) <= MAX_MEMBERS:
        raise BundleError("malformed manifest: members")
    members: dict[str, bytes] = {}
    for entry in entries:
        name, size, digest = (entry.get(k) if isinstance(entry, dict) else None for k in ("name", "size", "sha256"))
        if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name):
            raise BundleError(f"unsafe member name {str(name)[:40]!r}")
        if name in members:
            raise BundleError(f"duplicate member {name}")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or at + size > len(body):
            raise BundleError(f"member {name}: bad size")
        content = body[at : at + size]
        at += size
        if not isinstance(digest, str) or hashlib.sha256(content).hexdigest() != digest:
            raise BundleError(f"member {name}: sha256 mismatch")
        members[name] = content
    if at != len(body):
        raise BundleError(f"{len(body) - at} bytes after the last member")
    if manifest.get("card") != CARD_NAME or CARD_NAME not in members:
        raise BundleError(f"missing member {CARD_NAME}")
    return manifest, members


def _canary(manifest: dict, members: dict[str, bytes], card: dict) -> Canary:
    spec = manifest.get("canary")
    if not isinstance(spec, dict) or not isinstance(spec.get("expected"), dict) or not spec["expected"]:
        raise BundleError("canary: missing from the manifest")
    inputs = _array(members, spec.get("inputs"))
    size = card["input_size"]
    if inputs.ndim != 4 or inputs.shape[1:] != (size, size, 3) or not 0 < len(inputs) <= MAX_CANARY_IMAGES:
        raise BundleError(f"canary: inputs of shape {inputs.shape} do not fit the card's {size}x{size}x3 input")
    if not (np.all(np.isfinite(inputs)) and inputs.min() >= 0 and inputs.max() <= 1):
        raise BundleError("canary: inputs outside [0, 1]")
    expected = {}
    for variant, name in spec["expected"].items():
        if variant not in card["artifacts"]:
            raise BundleError(f"canary: expected outputs for {variant!r}, which the card does not list")
        expected[variant] = _array(members, name)
        if expected[variant].shape != (len(inputs), len(card["classes"])) or not np.all(np.isfinite(expected[variant])):
            raise BundleError(f"canary: expected {variant} outputs of shape {expected[variant].shape}")
    images = spec.get("images")
    if not isinstance(images, list) or len(images) != len(inputs) or not all(isinstance(i, str) for i in images):
        raise BundleError("canary: image list does not match the inputs")
    return Canary(inputs, expected, images)


def _array(members: dict[str, bytes], name: object) -> np.ndarray:
    """A float32 .npy member (`allow_pickle=False`: only plain numeric data is accepted)."""
    if not isinstance(name, str) or name not in members:
        raise BundleError(f"canary: missing member {str(name)[:40]}")
    try:
        array = np.lib.format.read_array(io.BytesIO(members[name]), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise BundleError(f"canary: {name} is not a .npy array ({type(exc).__name__})") from None
    if array.dtype != np.float32:
        raise BundleError(f"canary: {name} holds {array.dtype}, not float32")
    return array


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
