"""Dataset adapters and leakage-free splits."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from model import data


def test_aria_labels_from_folders(data_root):
    samples = data.load_aria(data_root)
    counts = {c: sum(s.subtype == c for s in samples) for c in data.ARIA_CLASSES}
    assert counts == {"Benign": 504, "Early": 985, "Pre": 963, "Pro": 804}
    assert all(s.label == (s.subtype != "Benign") for s in samples)
    assert all(data.label_from_path(data_root / s.path) == s.label for s in samples[::50])


def test_label_from_file_names():
    assert data.label_from_path("x/Im006_1.jpg") == 1
    assert data.label_from_path("Im035_0.tif") == 0
    assert data.label_from_path("Benign/a.jpg") == 0 and data.label_from_path("Pre/b.jpg") == 1
    assert data.label_from_path("somewhere/cell.jpg") is None


def test_committed_split_has_no_leak(data_root):
    dataset, samples = data.load_dataset(data_root)
    splits = data.load_splits(dataset, samples)
    side = {s.path: name for name, members in splits.items() for s in members}
    assert sum(len(v) for v in splits.values()) == len(samples) == len(side)
    pairs = data.duplicate_pairs(data_root)
    assert len(pairs) == 85
    for a, b in pairs:
        assert side[a] == side[b], (a, b)
    for name, members in splits.items():
        benign = np.mean([s.label == 0 for s in members])
        assert abs(benign - 504 / 3256) < 0.03, name
    assert 0.13 < len(splits["test"]) / len(samples) < 0.17


def test_split_is_seeded_and_groups_duplicates(data_root):
    samples = data.load_aria(data_root)
    groups = data.duplicate_groups(samples, data.duplicate_pairs(data_root))
    a, b = data.split_indices(samples, groups, 7), data.split_indices(samples, groups, 7)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["test"], data.split_indices(samples, groups, 8)["test"])
    for k1 in a:
        for k2 in a:
            if k1 != k2:
                assert not set(groups[a[k1]]) & set(groups[a[k2]])


def test_allidb_layout_on_created_files(tmp_path: Path):
    tile = np.full((60, 80, 3), 180, np.uint8)
    fixed = {stem[:5]: stem for stem in data.read_list(data.split_dir("ALL-IDB1") / "test.txt")}
    names = [fixed.get(f"Im{n:03d}", f"Im{n:03d}_{int(n <= 33)}") + ".jpg" for n in range(1, 109)]
    names = [name.replace("Im093_1", "Im093_0").replace("Im108_1", "Im108_0") for name in names]
    for name in names:
        cv2.imwrite(str(tmp_path / name), tile)
    dataset, samples = data.load_dataset(tmp_path)
    assert dataset == "ALL-IDB1" and len(samples) == 108
    assert {s.label for s in samples if s.path.startswith("Im006")} == {1}
    splits = data.load_splits(dataset, samples, seed=3)
    test = {Path(s.path).stem for s in splits["test"]}
    assert test == set(data.read_list(data.split_dir("ALL-IDB1") / "test.txt"))
    assert len(test) == 20
    rest = {Path(s.path).stem: k for k in ("train", "val") for s in splits[k]}
    assert not set(rest) & test and len(rest) == 88
    assert rest["Im093_0"] == rest["Im108_0"]  # the known duplicate pair stays together
