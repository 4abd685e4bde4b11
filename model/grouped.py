"""Grouped splits of ALL_Aria2021: duplicates ∪ field twins ∪ capture blocks never straddle a split.

The data set gives no patient ids, but its file numbers follow capture order. Within a class folder
the numbers interleave a few capture streams (Benign cycles through three, Early and Pre through
two: image n looks like n + 3, resp. n + 2, not like n + 1), and along a stream neighbouring images
share their session's background colour (white balance, lamp, camera). A *capture block* is a
run of `block_length` consecutive images of one stream. Both the period and the block length are
read from the data (`capture_structure`):

* the descriptor of an image is the Lab colour of its background (median of its brightest 30 % of
  pixels), which does not depend on how many cells the field holds;
* the period is the lag of 1..4 file numbers at which neighbouring images are most alike;
* along a stream, the distance between an image and the one j steps later grows with j; the block
  length is the first j at which that distance (median over the class, smoothed over 5 lags) reaches
  `RANDOM_LEVEL_SHARE` of the random-pair level (median distance of random pairs of the same stream).

    python -m model grouped-split    # data/aria2021/grouped/{train,val,test,groups}.txt and the plot
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from model import data
from model.twins import TWINS_FILE, read_twins

GROUPED = "grouped"
MAX_PERIOD = 4
MAX_STREAM_LAG = 120
RANDOM_LEVEL_SHARE = 0.9
BACKGROUND_SHARE = 0.3
_NUMBER = re.compile(r"(\d+)\.[A-Za-z]+$")


@dataclass(frozen=True)
class CaptureStructure:
    """What the data says about one class folder's capture order."""

    subtype: str
    period: int
    lag_distance: list[float]  # median distance at raw lags 1..MAX_PERIOD
    stream_distance: list[float]  # median distance at stream steps 1..MAX_STREAM_LAG
    random_level: float
    block_length: int


def file_number(path: str) -> int:
    """The capture number at the end of a file name (`WBC-Benign-017.jpg` -> 17)."""
    match = _NUMBER.search(path)
    if not match:
        raise ValueError(f"no file number in {path!r}")
    return int(match.group(1))


def background_colour(rgb: np.ndarray) -> np.ndarray:
    """Lab colour (OpenCV float Lab) of the brightest BACKGROUND_SHARE of an RGB float32 image's pixels."""
    lab = cv2.cvtColor(np.ascontiguousarray(rgb, np.float32), cv2.COLOR_RGB2LAB).reshape(-1, 3)
    bright = lab[:, 0] >= np.quantile(lab[:, 0], 1.0 - BACKGROUND_SHARE)
    return np.median(lab[bright], axis=0)


def capture_descriptors(root: Path, samples: list[data.Sample]) -> np.ndarray:
    """Background colour of every sample, standardised over the data set (N, 3)."""
    colours = []
    for s in samples:
        bgr = cv2.imread(str(root / s.path))
        if bgr is None:
            raise FileNotFoundError(f"cannot read {root / s.path}")
        colours.append(background_colour(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0))
    colours = np.array(colours)
    return (colours - colours.mean(0)) / colours.std(0)


def _class_order(samples: list[data.Sample], subtype: str) -> np.ndarray:
    idx = np.array([i for i, s in enumerate(samples) if s.subtype == subtype])
    return idx[np.argsort([file_number(samples[i].path) for i in idx], kind="stable")]


def _median_lag_distance(x: np.ndarray, lag: int) -> float:
    return float(np.median(np.linalg.norm(x[lag:] - x[:-lag], axis=1)))


def _streams(order: np.ndarray, samples: list[data.Sample], period: int) -> list[np.ndarray]:
    numbers = np.array([file_number(samples[i].path) for i in order])
    return [order[numbers % period == r] for r in range(period)]


def capture_structure(samples: list[data.Sample], descriptors: np.ndarray, seed: int = 0) -> list[CaptureStructure]:
    """Period, stream-lag curve, random-pair level and block length of each class folder."""
    rng = np.random.default_rng(seed)
    out = []
    for subtype in sorted({s.subtype for s in samples}, key=data.ARIA_CLASSES.index):
        order = _class_order(samples, subtype)
        lag_distance = [_median_lag_distance(descriptors[order], k) for k in range(1, MAX_PERIOD + 1)]
        period = int(np.argmin(lag_distance)) + 1
        streams = [descriptors[s] for s in _streams(order, samples, period)]
        random_pairs = []
        for x in streams:
            a, b = rng.integers(0, len(x), (2, 20_000))
            random_pairs.append(np.linalg.norm(x[a[a != b]] - x[b[a != b]], axis=1))
        random_level = float(np.median(np.concatenate(random_pairs)))
        steps = range(1, min(MAX_STREAM_LAG, min(len(x) for x in streams) - 1) + 1)
        stream_distance = [float(np.median(np.concatenate([np.linalg.norm(x[j:] - x[:-j], axis=1) for x in streams])))
                           for j in steps]
        smooth = np.convolve(stream_distance, np.ones(5) / 5, mode="same")
        reached = np.nonzero(smooth >= RANDOM_LEVEL_SHARE * random_level)[0]
        block_length = int(reached[0]) + 1 if len(reached) else len(stream_distance)
        out.append(CaptureStructure(subtype, period, lag_distance, stream_distance, random_level, block_length))
    return out


def capture_blocks(samples: list[data.Sample], structure: list[CaptureStructure]) -> dict[str, list[str]]:
    """Block name -> member paths: runs of `block_length` consecutive images of one capture stream."""
    blocks: dict[str, list[str]] = {}
    for cs in structure:
        for r, stream in enumerate(_streams(_class_order(samples, cs.subtype), samples, cs.period)):
            for k, start in enumerate(range(0, len(stream), cs.block_length)):
                blocks[f"{cs.subtype}/{r}/{k}"] = [samples[i].path for i in stream[start:start + cs.block_length]]
    return blocks


def group_pairs(root: Path, samples: list[data.Sample], blocks: dict[str, list[str]]) -> list[tuple[str, str]]:
    """Every link that must keep two images together: duplicates, field twins, capture-block membership."""
    dataset = data.load_dataset(root)[0]
    twins = read_twins(data.split_dir(dataset) / TWINS_FILE)
    chains = [(m[i], m[i + 1]) for m in blocks.values() for i in range(len(m) - 1)]
    return data.duplicate_pairs(root) + twins + chains


def balanced_parts(samples: list[data.Sample], groups: np.ndarray, fractions: list[float], seed: int,
                   tries: int = 2000) -> list[np.ndarray]:
    """Whole groups into parts of the given shares, separately per subtype (groups here never mix subtypes).

    Groups are large (a few hundred images at most), so a stratified k-fold splitter misses the
    shares badly. Per subtype, `tries` seeded orders of its groups are dealt out, each group to the
    part furthest below its share, and the order closest to the shares (squared error) is kept;
    among equally close ones, the one whose last part (the test part) and then whose sparsest part
    holds the most groups (more independent units to estimate from).
    """
    rng = np.random.default_rng(seed)
    subtypes = np.array([s.subtype for s in samples])
    parts: list[list[int]] = [[] for _ in fractions]
    for subtype in dict.fromkeys(subtypes.tolist()):
        ids, sizes = np.unique(groups[subtypes == subtype], return_counts=True)
        targets = np.array(fractions) * sizes.sum()
        best, best_error = None, (np.inf, 0)
        for _ in range(tries):
            filled, owner = np.zeros(len(fractions)), {}
            for k in rng.permutation(len(ids)):
                part = int(np.argmax(targets - filled))
                filled[part] += sizes[k]
                owner[ids[k]] = part
            counts = np.bincount(list(owner.values()), minlength=len(fractions))
            error = (float(np.sum((filled - targets) ** 2)), -counts[-1], -counts.min())
            if error < best_error:
                best, best_error = owner, error
        for i in np.nonzero(subtypes == subtype)[0]:
            parts[best[groups[i]]].append(int(i))
    return [np.array(sorted(p), dtype=int) for p in parts]


def split_indices(samples: list[data.Sample], groups: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """70/15/15 train/val/test by whole groups, balanced per subtype."""
    train, val, test = balanced_parts(samples, groups, [0.70, 0.15, 0.15], seed)
    return {"train": train, "val": val, "test": test}


def cv_indices(samples: list[data.Sample], groups: np.ndarray, n_folds: int, repeat_seed: int) -> list[dict[str, np.ndarray]]:
    """Grouped k-fold: each fold's test part, and its train/validation parts (1/6 of the rest, grouped)."""
    out = []
    for k, test in enumerate(balanced_parts(samples, groups, [1 / n_folds] * n_folds, repeat_seed)):
        rest = np.setdiff1d(np.arange(len(samples)), test)
        train, val = balanced_parts([samples[i] for i in rest], groups[rest], [5 / 6, 1 / 6], repeat_seed + 1000 + k)
        out.append({"train": rest[train], "val": rest[val], "test": test})
    return out


def write_groups(path: Path, samples: list[data.Sample], groups: np.ndarray, blocks: dict[str, list[str]]) -> None:
    """`path group block` per image, so a reviewer can check any pair."""
    block_of = {p: name for name, members in blocks.items() for p in members}
    ids = {g: k for k, g in enumerate(dict.fromkeys(groups.tolist()))}
    path.write_text("# path group capture_block (python -m model grouped-split)\n"
                    + "".join(f"{s.path} {ids[g]} {block_of.get(s.path, '-')}\n" for s, g in zip(samples, groups, strict=True)))


def plot_capture_structure(structure: list[CaptureStructure], path: Path) -> None:
    """The lag curves that chose each class's block length, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(18, 7))
    for ax_raw, ax, cs in zip(axes[0], axes[1], structure, strict=True):
        ax_raw.bar(range(1, MAX_PERIOD + 1), cs.lag_distance, color=["C1" if k + 1 == cs.period else "C0"
                                                                     for k in range(MAX_PERIOD)])
        ax_raw.set_title(f"{cs.subtype}: neighbours n, n+k (period {cs.period})")
        ax_raw.set_xlabel("file-number lag k")
        ax_raw.set_ylabel("median background-colour distance")
        steps = np.arange(1, len(cs.stream_distance) + 1)
        ax.plot(steps, cs.stream_distance, lw=0.8, label="images j steps apart in a stream")
        ax.axhline(cs.random_level, color="k", label="random pairs of the stream")
        ax.axhline(RANDOM_LEVEL_SHARE * cs.random_level, color="k", ls=":", label=f"{RANDOM_LEVEL_SHARE:.0%} of it")
        ax.axvline(cs.block_length, color="C3", label=f"block length {cs.block_length}")
        ax.set_xlabel("stream steps j")
        ax.set_title(f"{cs.subtype}: blocks of {cs.block_length} images")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def make_grouped_split(root: Path, seed: int, plot: Path | None = None) -> dict:
    """Compute groups, write `data/<set>/grouped/{train,val,test,groups}.txt`; return what was found."""
    dataset, samples = data.load_dataset(root)
    structure = capture_structure(samples, capture_descriptors(root, samples), seed)
    blocks = capture_blocks(samples, structure)
    groups = data.duplicate_groups(samples, group_pairs(root, samples, blocks))
    folder = data.split_dir(dataset) / GROUPED
    folder.mkdir(parents=True, exist_ok=True)
    splits = split_indices(samples, groups, seed)
    for name, idx in splits.items():
        (folder / f"{name}.txt").write_text("".join(samples[i].path + "\n" for i in idx))
    write_groups(folder / "groups.txt", samples, groups, blocks)
    if plot:
        plot_capture_structure(structure, plot)
    sizes = np.bincount(np.unique(groups, return_inverse=True)[1])
    return {"structure": {cs.subtype: {"period": cs.period, "block_length": cs.block_length,
                                       "random_level": round(cs.random_level, 3)} for cs in structure},
            "blocks": len(blocks), "groups": int(len(sizes)), "largest_group": int(sizes.max()),
            "splits": {name: {t: int(sum(samples[i].subtype == t for i in idx)) for t in data.ARIA_CLASSES}
                       for name, idx in splits.items()}}
