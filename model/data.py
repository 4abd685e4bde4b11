"""Dataset adapters (ALL_Aria2021, ALL-IDB1), duplicate groups and the committed splits.

Paths are kept relative to the data root; images are read from `ALLDS_DATA` (or a flag), never
copied into the repository. This module does not import TensorFlow.
"""

from __future__ import annotations

import csv
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold
from tqdm import tqdm

from model.preprocess import preprocess_file

REPO = Path(__file__).resolve().parent.parent
SPLIT_DIR = REPO / "data"
ARIA_CLASSES = ("Benign", "Early", "Pre", "Pro")
BINARY_CLASSES = ("Benign", "ALL")
ALLIDB_NAME = re.compile(r"^Im\d{3}_([01])\.(jpe?g|tiff?|png)$", re.IGNORECASE)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff"}
# ALL-IDB1: Im108_0 is the same field as Im093_0 (reported by the data set's users).
ALLIDB_DUPLICATES = (("Im093_0", "Im108_0"),)


@dataclass(frozen=True)
class Sample:
    """One image: path relative to the data root, binary label (1 = ALL) and subtype name."""

    path: str
    label: int
    subtype: str


def data_root(flag: str | None = None) -> Path:
    """The data root from a CLI flag, else `ALLDS_DATA`; a clear error when neither exists."""
    root = flag or os.environ.get("ALLDS_DATA")
    if not root:
        raise FileNotFoundError("no data root: pass --data DIR or set ALLDS_DATA")
    path = Path(root).expanduser().resolve()
    if not path.is_dir():
        raise FileNotFoundError(f"data root {path} is not a directory")
    return path


def label_from_path(path: str | Path) -> int | None:
    """Binary label from a folder name (Benign/Early/Pre/Pro) or an ALL-IDB `_0`/`_1` file name."""
    p = Path(path)
    match = ALLIDB_NAME.match(p.name)
    if match:
        return int(match.group(1))
    folder = p.parent.name
    if folder in ARIA_CLASSES:
        return int(folder != "Benign")
    return None


def load_aria(root: Path) -> list[Sample]:
    """ALL_Aria2021: `labels.csv` when present, else the folder-per-class layout."""
    labels = root / "labels.csv"
    if labels.exists():
        with labels.open() as fh:
            rows = list(csv.DictReader(fh))
        return [Sample(r["path"], int(r["all_malignant"]), r["folder_class"]) for r in rows]
    return [
        Sample(p.relative_to(root).as_posix(), int(cls != "Benign"), cls)
        for cls in ARIA_CLASSES
        for p in sorted((root / cls).glob("*"))
        if p.suffix.lower() in IMAGE_SUFFIXES
    ]


def load_allidb(root: Path) -> list[Sample]:
    """ALL-IDB1: `Im###_L.jpg` files anywhere under root; L = 1 means ALL present."""
    samples = []
    for p in sorted(root.rglob("Im*")):
        match = ALLIDB_NAME.match(p.name)
        if match:
            label = int(match.group(1))
            samples.append(Sample(p.relative_to(root).as_posix(), label, "ALL" if label else "Healthy"))
    return samples


def load_dataset(root: Path) -> tuple[str, list[Sample]]:
    """Detect the layout under root and return (dataset name, samples)."""
    if any((root / c).is_dir() for c in ARIA_CLASSES):
        return "ALL_Aria2021", load_aria(root)
    samples = load_allidb(root)
    if samples:
        return "ALL-IDB1", samples
    raise FileNotFoundError(f"{root}: neither the ALL_Aria2021 folders nor ALL-IDB1 Im###_L files")


def duplicate_pairs(root: Path) -> list[tuple[str, str]]:
    """Pairs that must share a split: the data set's duplicate lists, and ALL-IDB's known pair."""
    pairs = []
    for name in ("exact_duplicates.txt", "near_duplicates.txt"):
        listing = root / name
        if listing.exists():
            for line in listing.read_text().splitlines():
                fields = line.split()
                if len(fields) >= 2 and not line.startswith("#"):
                    pairs.append((fields[0], fields[1]))
    return pairs


def duplicate_groups(samples: list[Sample], pairs: list[tuple[str, str]]) -> np.ndarray:
    """Group id per sample: samples linked by a duplicate pair (transitively) share one id."""
    index = {s.path: i for i, s in enumerate(samples)}
    by_stem = {Path(s.path).stem: i for i, s in enumerate(samples)}
    parent = list(range(len(samples)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in list(pairs) + list(ALLIDB_DUPLICATES):
        ia, ib = index.get(a, by_stem.get(a)), index.get(b, by_stem.get(b))
        if ia is not None and ib is not None:
            parent[find(ia)] = find(ib)
    return np.array([find(i) for i in range(len(samples))])


def grouped_folds(samples: list[Sample], groups: np.ndarray, n_folds: int, seed: int) -> list[np.ndarray]:
    """Stratified, grouped, seeded folds (indices into samples)."""
    labels = np.array([s.label for s in samples])
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    return [test for _, test in splitter.split(np.zeros(len(samples)), labels, groups)]


def split_indices(samples: list[Sample], groups: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """70/15/15 train/val/test by source image: 20 grouped folds, 3 to test, 3 to validation."""
    folds = grouped_folds(samples, groups, 20, seed)
    return {
        "test": np.sort(np.concatenate(folds[:3])),
        "val": np.sort(np.concatenate(folds[3:6])),
        "train": np.sort(np.concatenate(folds[6:])),
    }


SPLIT_FOLDERS = {"ALL_Aria2021": "aria2021", "ALL-IDB1": "all-idb1"}


def split_dir(dataset: str) -> Path:
    """Folder of the committed split lists for a data set (file lists only; images stay outside)."""
    return SPLIT_DIR / SPLIT_FOLDERS[dataset]


def write_splits(dataset: str, samples: list[Sample], splits: dict[str, np.ndarray]) -> dict[str, Path]:
    """Write one file list per split (paths relative to the data root)."""
    out = split_dir(dataset)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, idx in splits.items():
        files[name] = out / f"{name}.txt"
        files[name].write_text("".join(samples[i].path + "\n" for i in idx))
    return files


def read_list(path: Path) -> list[str]:
    """Paths of a split file, ignoring blank lines and comments."""
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]


def card_splits(card: dict, dataset: str, samples: list[Sample], seed: int = 42) -> dict[str, list[Sample]]:
    """The split an artifact was trained on, read from its model card (per-image or `grouped`)."""
    folder = (REPO / card["data"]["splits"]["test"]["file"]).parent
    return load_splits(dataset, samples, seed, str(folder.relative_to(split_dir(dataset))))


def load_splits(dataset: str, samples: list[Sample], seed: int = 42, split: str = "") -> dict[str, list[Sample]]:
    """The committed split of a data set, as Samples; `split` names a sub-folder (`grouped`).

    ALL-IDB1 ships only the original project's fixed 20-image test list; its train/validation
    split is then made from the other images, grouped and seeded, in memory.
    """
    by_path = {s.path: s for s in samples}
    by_stem = {Path(s.path).stem: s for s in samples}
    folder = split_dir(dataset) / split
    if not (folder / "test.txt").exists():
        raise FileNotFoundError(f"no split lists in {folder}: run `python -m model split` first")
    test = [by_path.get(p) or by_stem[Path(p).stem] for p in read_list(folder / "test.txt")]
    if (folder / "train.txt").exists():
        return {"train": [by_path[p] for p in read_list(folder / "train.txt")],
                "val": [by_path[p] for p in read_list(folder / "val.txt")], "test": test}
    taken = {s.path for s in test}
    rest = [s for s in samples if s.path not in taken]
    folds = grouped_folds(rest, duplicate_groups(rest, []), 6, seed)
    return {"train": [rest[i] for i in np.sort(np.concatenate(folds[1:]))],
            "val": [rest[i] for i in np.sort(folds[0])], "test": test}


def load_images(root: Path, samples: list[Sample], size: int) -> np.ndarray:
    """Preprocess every sample's file (the serving path) into one float32 array."""
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        images = list(tqdm(pool.map(lambda s: preprocess_file(root / s.path, size), samples),
                           total=len(samples), desc=f"decode {size}px", unit="img", leave=False))
    return np.stack(images) if images else np.zeros((0, size, size, 3), np.float32)
