"""Signed model bundles: keygen/bundle/verify/install round trip on the shipped cellnet; every byte is
covered (a flip anywhere, a wrong or missing signature, an oversized file, unsafe member names, a
card that does not match, a canary that does not reproduce are all refused with a reason).

`pack` below writes the layout of docs/bundle.md independently of `model.bundle`, to craft bundles
that a careless or hostile signer could make."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from model import bundle as b
from model.classifier import CARD_NAME, DEFAULT_ARTIFACT, Classifier, read_card
from tests.helpers import REPO

CELLNET = DEFAULT_ARTIFACT.parent.parent / "cellnet"
ALLDS2020 = CELLNET.parent / "allds2020"
LIMIT = 64 << 20


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    out = tmp_path_factory.mktemp("keys")
    key, pub = b.keygen(out / "signer")
    other_key, other_pub = b.keygen(out / "other")
    return {"key": b.load_private_key(key), "pub": pub, "other_key": b.load_private_key(other_key), "other_pub": other_pub}


@pytest.fixture(scope="module")
def canary(data_root):
    return b.make_canary(CELLNET, data_root, 8)


@pytest.fixture(scope="module")
def good(keys, canary) -> bytes:
    return b.build_bundle(CELLNET, keys["key"], canary)


def pack(manifest: dict, members: list[tuple[str, bytes]], key, trailing: bytes = b"") -> bytes:
    """A bundle in the documented layout, signed with `key`; the manifest's member list is filled in."""
    manifest = dict(manifest, members=[{"name": n, "size": len(c), "sha256": hashlib.sha256(c).hexdigest()}
                                       for n, c in members])
    manifest_bytes = json.dumps(manifest).encode()
    body = struct.pack(">I", len(manifest_bytes)) + manifest_bytes + b"".join(c for _, c in members) + trailing
    signature = json.dumps({"algorithm": "Ed25519", "key": b.key_id(key.public_key()),
                            "signature": base64.b64encode(key.sign(b.MAGIC + body)).decode()}).encode()
    return b.MAGIC + struct.pack(">I", len(signature)) + signature + body


def unpack(data: bytes) -> tuple[dict, list[tuple[str, bytes]]]:
    """The manifest and members of a bundle in the documented layout (no checks)."""
    at = len(b.MAGIC)
    (sig_len,) = struct.unpack_from(">I", data, at)
    at += 4 + sig_len
    (manifest_len,) = struct.unpack_from(">I", data, at)
    at += 4
    manifest = json.loads(data[at : at + manifest_len])
    at += manifest_len
    members = []
    for entry in manifest["members"]:
        members.append((entry["name"], data[at : at + entry["size"]]))
        at += entry["size"]
    return manifest, members


def replaced(members: list[tuple[str, bytes]], name: str, content: bytes) -> list[tuple[str, bytes]]:
    return [(n, content if n == name else c) for n, c in members]


def npy(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def test_keygen_writes_a_private_key_only_its_owner_reads_and_never_overwrites(tmp_path):
    key, pub = b.keygen(tmp_path / "k")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert pub.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    assert b.key_id(b.load_private_key(key).public_key()) == b.key_id(b.load_public_key(pub))
    before = key.read_bytes()
    with pytest.raises(FileExistsError):
        b.keygen(tmp_path / "k")
    assert key.read_bytes() == before


def test_round_trip_installs_the_model_folder_and_its_canary_reproduces(good, keys, tmp_path):
    bundle = b.verify_bundle(good, [keys["other_pub"], keys["pub"]], LIMIT)
    card = read_card(CELLNET)
    assert (bundle.name, bundle.version, bundle.key) == (card["name"], card["version"], keys["pub"])
    assert bundle.sha256 == hashlib.sha256(good).hexdigest()
    assert 0 <= (datetime.now(UTC) - bundle.created).total_seconds() < 3600
    folder = bundle.install(tmp_path / "models")
    assert folder == tmp_path / "models" / f"cellnet@{card['version']}-{bundle.sha256[:12]}"
    served = {v: e for v, e in card["artifacts"].items() if v in b.SERVED_VARIANTS}
    for entry in served.values():  # every served artifact, byte for byte; the .keras file stays home
        assert (folder / entry["file"]).read_bytes() == (CELLNET / entry["file"]).read_bytes()
    assert read_card(folder) == {**card, "artifacts": served}
    assert not (folder / card["artifacts"]["keras"]["file"]).exists() and len(good) < 10 * 1024 * 1024  # fits a request
    assert not [p for p in (tmp_path / "models").iterdir() if p.name.startswith(".")]  # no partial folder left
    for variant in ("int8", "float32"):
        classifier = Classifier.load(folder / card["artifacts"][variant]["file"])
        assert bundle.check_canary(classifier) <= b.CANARY_TOLERANCE
    assert bundle.install(tmp_path / "models") == folder  # a retained bundle delivered again: same folder


def test_canary_spans_both_classes_and_uncertain_images(canary):
    p_all = 1 - canary.expected["int8"][:, 0]
    assert {Path(p).parts[0] for p in canary.images} >= {"Benign", "Pro"}
    assert p_all.min() < 0.1 and p_all.max() > 0.9 and np.any((p_all > 0.05) & (p_all < 0.95))
    assert canary.inputs.dtype == np.float32 and canary.inputs.shape == (8, 128, 128, 3)


def test_install_never_overwrites_a_different_folder_of_the_same_name(good, keys, tmp_path):
    bundle = b.verify_bundle(good, [keys["pub"]], LIMIT)
    folder = tmp_path / bundle.folder_name
    folder.mkdir()
    (folder / CARD_NAME).write_text("{}")
    with pytest.raises(b.BundleError, match="exists with other content"):
        bundle.install(tmp_path)
    assert (folder / CARD_NAME).read_text() == "{}" and len(list(folder.iterdir())) == 1


def test_a_failed_install_leaves_nothing_behind(good, keys, tmp_path, monkeypatch):
    bundle = b.verify_bundle(good, [keys["pub"]], LIMIT)
    calls = []

    def failing_fsync(fd):
        calls.append(fd)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(b.BundleError, match="No space left"):
        bundle.install(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_flipped_byte_anywhere_is_refused(good, keys):
    manifest_at = len(b.MAGIC) + 4 + struct.unpack_from(">I", good, len(b.MAGIC))[0]
    positions = [0, len(b.MAGIC) - 1, len(b.MAGIC) + 3, len(b.MAGIC) + 30, manifest_at + 2, manifest_at + 40,
                 len(good) // 2, len(good) - 1, *np.linspace(0, len(good) - 1, 40).astype(int)]
    for at in positions:
        tampered = bytearray(good)
        tampered[at] ^= 0x01
        with pytest.raises(b.BundleError):
            b.verify_bundle(bytes(tampered), [keys["pub"]], LIMIT)
    for altered in (good[:-1], good + b"\x00", good[: len(good) // 3]):
        with pytest.raises(b.BundleError, match="bad signature"):
            b.verify_bundle(altered, [keys["pub"]], LIMIT)


def test_a_flipped_member_byte_names_bad_signature(good, keys):
    manifest, members = unpack(good)
    tampered = bytearray(good)
    tampered[good.index(members[2][1]) + 1000] ^= 0x80  # inside a .tflite
    with pytest.raises(b.BundleError, match="^bad signature$"):
        b.verify_bundle(bytes(tampered), [keys["pub"]], LIMIT)


def test_wrong_key_unsigned_and_oversized_are_refused(good, keys):
    with pytest.raises(b.BundleError, match="unknown key"):
        b.verify_bundle(good, [keys["other_pub"]], LIMIT)
    manifest, members = unpack(good)
    by_other = pack(manifest, members, keys["other_key"])
    with pytest.raises(b.BundleError, match="unknown key"):
        b.verify_bundle(by_other, [keys["pub"]], LIMIT)
    signature_length = struct.unpack_from(">I", by_other, len(b.MAGIC))[0]
    block = json.loads(by_other[len(b.MAGIC) + 4 : len(b.MAGIC) + 4 + signature_length])
    block["key"] = b.key_id(b.load_public_key(keys["pub"]))  # claims the trusted signer
    claimed = json.dumps(block).encode()
    forged = b.MAGIC + struct.pack(">I", len(claimed)) + claimed + by_other[len(b.MAGIC) + 4 + signature_length :]
    with pytest.raises(b.BundleError, match="bad signature"):
        b.verify_bundle(forged, [keys["pub"]], LIMIT)
    body = good[len(b.MAGIC) + 4 + struct.unpack_from(">I", good, len(b.MAGIC))[0] :]
    with pytest.raises(b.BundleError, match="^unsigned$"):
        b.verify_bundle(b.MAGIC + struct.pack(">I", 0) + body, [keys["pub"]], LIMIT)
    with pytest.raises(b.BundleError, match="too large"):
        b.verify_bundle(good, [keys["pub"]], len(good) - 1)
    assert b.verify_bundle(good, [keys["pub"]], len(good)).name == "cellnet"
    with pytest.raises(b.BundleError, match="not an AllDS model bundle"):
        b.verify_bundle(b"PK\x03\x04" + good, [keys["pub"]], LIMIT)


@pytest.mark.parametrize("name", ["../model_card.json", "/etc/passwd", "a/b", "..", ".hidden", "a\\b", "nul\x00",
                                  "x" * 200, ""])
def test_unsafe_member_names_are_refused_even_when_signed(good, keys, tmp_path, name):
    manifest, members = unpack(good)
    crafted = pack(manifest, [*members, (name, b"payload")], keys["key"])
    with pytest.raises(b.BundleError, match="unsafe member name"):
        b.verify_bundle(crafted, [keys["pub"]], LIMIT)


def test_duplicate_members_trailing_bytes_and_undated_manifests_are_refused(good, keys):
    manifest, members = unpack(good)
    for created in (None, "yesterday", "2026-11-26T10:00:00"):
        with pytest.raises(b.BundleError, match="malformed manifest: created"):
            b.verify_bundle(pack(manifest | {"created": created}, members, keys["key"]), [keys["pub"]], LIMIT)
    with pytest.raises(b.BundleError, match="duplicate member model_card.json"):
        b.verify_bundle(pack(manifest, [*members, members[0]], keys["key"]), [keys["pub"]], LIMIT)
    with pytest.raises(b.BundleError, match="bytes after the last member"):
        b.verify_bundle(pack(manifest, members, keys["key"], trailing=b"extra"), [keys["pub"]], LIMIT)


def test_card_schema_missing_and_mismatched_members_are_refused(good, keys):
    manifest, members = unpack(good)
    card = json.loads(dict(members)[CARD_NAME])
    no_threshold = json.dumps({k: v for k, v in card.items() if k != "threshold"}).encode()
    with pytest.raises(b.BundleError, match="card schema"):
        b.verify_bundle(pack(manifest, replaced(members, CARD_NAME, no_threshold), keys["key"]), [keys["pub"]], LIMIT)
    renamed = json.dumps(card | {"version": "2099-01-01"}).encode()
    with pytest.raises(b.BundleError, match="manifest says"):
        b.verify_bundle(pack(manifest, replaced(members, CARD_NAME, renamed), keys["key"]), [keys["pub"]], LIMIT)
    int8 = card["artifacts"]["int8"]["file"]
    with pytest.raises(b.BundleError, match=f"missing member {int8}"):
        b.verify_bundle(pack(manifest, [m for m in members if m[0] != int8], keys["key"]), [keys["pub"]], LIMIT)
    altered = bytearray(dict(members)[int8])
    altered[5000] ^= 0xFF  # a consistent manifest, but not the artifact the card names
    with pytest.raises(b.BundleError, match=f"member {int8} differs from the sha256 in the card"):
        b.verify_bundle(pack(manifest, replaced(members, int8, bytes(altered)), keys["key"]), [keys["pub"]], LIMIT)


def test_every_file_the_card_lists_travels(keys, canary, tmp_path):
    folder = tmp_path / "cellnet"
    shutil.copytree(CELLNET, folder)
    gate = b"gate statistics"
    (folder / "cellnet_gate.npz").write_bytes(gate)
    card = json.loads((folder / CARD_NAME).read_text())
    card["decision"] = {"gate_file": {"file": "cellnet_gate.npz", "sha256": hashlib.sha256(gate).hexdigest()}}
    (folder / CARD_NAME).write_text(json.dumps(card))
    bundle = b.verify_bundle(b.build_bundle(folder, keys["key"], canary), [keys["pub"]], LIMIT)
    assert bundle.members["cellnet_gate.npz"] == gate
    assert (bundle.install(tmp_path / "models") / "cellnet_gate.npz").read_bytes() == gate
    assert {"history.json", "roc.png"}.isdisjoint(bundle.members)  # files the card does not list stay home
    (folder / "cellnet_gate.npz").write_bytes(b"changed")
    with pytest.raises(b.BundleError, match="differs from the sha256 its card lists"):
        b.build_bundle(folder, keys["key"], canary)


def test_an_altered_canary_expectation_is_caught_by_check_canary(keys, canary, tmp_path):
    expected = canary.expected["int8"].copy()
    expected[3] = expected[3][::-1]  # the signer's record of image 3 no longer matches the model
    altered = b.Canary(canary.inputs, canary.expected | {"int8": expected}, canary.images)
    bundle = b.verify_bundle(b.build_bundle(CELLNET, keys["key"], altered), [keys["pub"]], LIMIT)
    folder = bundle.install(tmp_path)
    classifier = Classifier.load(folder / "cellnet_int8.tflite")
    with pytest.raises(b.BundleError, match=r"canary mismatch on image 3 .*max \|Δp\|"):
        bundle.check_canary(classifier)
    assert bundle.check_canary(Classifier.load(folder / "cellnet_float32.tflite")) <= b.CANARY_TOLERANCE


def test_another_models_canary_is_refused(keys, canary, good, tmp_path):
    with pytest.raises(b.BundleError, match="do not fit the card's 100x100x3 input"):
        b.verify_bundle(b.build_bundle(ALLDS2020, keys["key"], canary), [keys["pub"]], LIMIT)
    bundle = b.verify_bundle(good, [keys["pub"]], LIMIT)
    with pytest.raises(b.BundleError, match="is not an artifact of"):
        bundle.check_canary(Classifier.load(ALLDS2020 / "allds2020_int8.tflite"))


def test_a_pickled_canary_is_refused(good, keys):
    manifest, members = unpack(good)
    pickled = npy(np.array([{"not": "numbers"}], dtype=object), allow_pickle=True)
    with pytest.raises(b.BundleError, match="canary: canary_inputs.npy is not a .npy array"):
        b.verify_bundle(pack(manifest, replaced(members, b.CANARY_INPUTS, pickled), keys["key"]), [keys["pub"]], LIMIT)
    as_float64 = npy(np.load(io.BytesIO(dict(members)[b.CANARY_INPUTS])).astype(np.float64))
    with pytest.raises(b.BundleError, match="not float32"):
        b.verify_bundle(pack(manifest, replaced(members, b.CANARY_INPUTS, as_float64), keys["key"]), [keys["pub"]], LIMIT)


def test_cli_keygen_bundle_verify(tmp_path, data_root):
    env = dict(os.environ, ALLDS_DATA=str(data_root))

    def run(*args):
        return subprocess.run([sys.executable, "-m", "model", *args], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=300)

    assert run("keygen", "--out", str(tmp_path / "keys")).returncode == 0
    out = tmp_path / "cellnet.bundle"
    made = run("bundle", str(CELLNET), "--key", str(tmp_path / "keys" / "signing.key"), "--out", str(out), "--canary", "4")
    assert made.returncode == 0, made.stderr
    assert hashlib.sha256(out.read_bytes()).hexdigest() in made.stdout
    checked = run("verify-bundle", str(out), "--trusted", str(tmp_path / "keys" / "signing.pub"))
    assert checked.returncode == 0, checked.stderr
    assert json.loads(checked.stdout)["name"] == "cellnet" and len(json.loads(checked.stdout)["canary"]) == 4
    tampered = bytearray(out.read_bytes())
    tampered[-10] ^= 1
    out.write_bytes(bytes(tampered))
    refused = run("verify-bundle", str(out), "--trusted", str(tmp_path / "keys" / "signing.pub"))
    assert refused.returncode == 1 and refused.stderr.strip() == "error: bad signature"


def test_the_default_canary_allows_one_step_of_its_int8_logits_and_no_more(keys, data_root, tmp_path):
    """The default's int8 file ends in a float32 softmax on int8 logits: one rounding step of those logits
    (as another CPU's int8 kernels may take) moves a probability by up to half their scale, more than
    1/256; twice that is another model or a broken runtime. Full-integer and float32 files keep 1/256."""
    canary = b.make_canary(DEFAULT_ARTIFACT.parent, data_root, 8)
    served = Classifier.load(DEFAULT_ARTIFACT)
    step = served.output_step
    assert 1 / 256 < step < 0.05 and b.canary_tolerance(served) == pytest.approx(step + 1e-6)
    assert b.canary_tolerance(Classifier.load(DEFAULT_ARTIFACT.with_name(f"{DEFAULT_ARTIFACT.parent.name}_float32.tflite"))) \
        == b.CANARY_TOLERANCE
    assert b.canary_tolerance(Classifier.load(CELLNET / "cellnet_int8.tflite")) == b.CANARY_TOLERANCE  # int8 softmax
    middle = int(np.argmax(canary.expected["int8"].min(axis=1)))  # the least certain image: room both ways
    for deviation, accepted in ((max(0.9 * step, (step + 1 / 256) / 2), True), (2 * step, False)):
        expected = canary.expected["int8"].copy()
        expected[middle] += deviation * np.array([1.0, -1.0])
        altered = b.Canary(canary.inputs, canary.expected | {"int8": expected}, canary.images)
        bundle = b.verify_bundle(b.build_bundle(DEFAULT_ARTIFACT.parent, keys["key"], altered), [keys["pub"]], LIMIT)
        classifier = Classifier.load(bundle.install(tmp_path / str(accepted)) / DEFAULT_ARTIFACT.name)
        if accepted:
            assert bundle.check_canary(classifier) <= step + 1e-6
        else:
            with pytest.raises(b.BundleError, match="canary mismatch"):
                bundle.check_canary(classifier)


def test_a_signed_card_whose_classes_contradict_the_canary_images_is_refused(keys, canary, tmp_path):
    """A trusted signer's card with its classes swapped (the same artifact, name and version) passed the canary,
    which compares raw outputs only, and turned every answer round: Benign smears Positive at 0.94-0.98. The
    canary images are held-out images of known class: the ones the model decides confidently must mostly be
    decided as their folders say."""
    import shutil

    folder = tmp_path / "swapped" / "cellnet"
    shutil.copytree(CELLNET, folder)
    card = read_card(folder)
    (folder / "model_card.json").write_text(json.dumps({**card, "classes": card["classes"][::-1]}, indent=2))
    bundle = b.verify_bundle(b.build_bundle(folder, keys["key"], canary), [keys["pub"]], LIMIT)
    installed = bundle.install(tmp_path / "models")
    with pytest.raises(b.BundleError, match="contradict"):
        bundle.check_canary(Classifier.load(installed / card["artifacts"]["int8"]["file"]))
