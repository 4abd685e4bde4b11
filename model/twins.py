"""Field twins: two images that show the same microscope field, found by translation-tolerant matching.

The data set's duplicate lists catch byte-identical files and near-identical re-captures; a field
photographed twice with the stage moved a little escapes them. Here the 112 px centre crop of one
grey 224 px image is slid over the whole of the other (shifts up to ±56 px both ways) and the peak
normalised cross-correlation (OpenCV `TM_CCOEFF_NORMED`) is the pair's score, the larger of the two
directions. Pairs at or above `TWIN_NCC` are twins. Every pair of the data set is scored (no
pre-filter that could miss one); the full score matrix is kept for the capture-block analysis.

    python -m model twins     # writes data/aria2021/field_twins.txt (+ the score matrix under runs/twins/)
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from model import data

FIELD_SIZE = 224
CROP = 112  # template side; the search covers the whole other image, i.e. shifts of ±(224 - 112) / 2
# The issue that asked for this matcher used 0.90. Every pair scoring 0.80-0.90 (16) was checked by
# eye and shows one field, shifted; the first pair of two class folders (so necessarily not one
# field) scores 0.775, and 99.99 % of all pairs score below 0.57.
TWIN_NCC = 0.80
TWINS_FILE = "field_twins.txt"


def grey_field(path: Path) -> np.ndarray:
    """One image as float32 grey at FIELD_SIZE px (the matcher's view)."""
    grey = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if grey is None:
        raise FileNotFoundError(f"cannot read image {path}")
    if grey.shape != (FIELD_SIZE, FIELD_SIZE):
        grey = cv2.resize(grey, (FIELD_SIZE, FIELD_SIZE), interpolation=cv2.INTER_AREA)
    return grey.astype(np.float32)


def centre_crop(field: np.ndarray) -> np.ndarray:
    """The CROP x CROP template at the centre of a field."""
    start = (FIELD_SIZE - CROP) // 2
    return field[start:start + CROP, start:start + CROP]


def match_score(template: np.ndarray, field: np.ndarray) -> float:
    """Peak normalised cross-correlation of a template anywhere inside a field (0 for flat images)."""
    peak = float(cv2.matchTemplate(field, template, cv2.TM_CCOEFF_NORMED).max())
    return peak if np.isfinite(peak) else 0.0


def pair_score(a: np.ndarray, b: np.ndarray) -> float:
    """Symmetric score of two fields: the better of a's centre in b and b's centre in a."""
    return max(match_score(centre_crop(a), b), match_score(centre_crop(b), a))


def score_matrix(fields: list[np.ndarray], workers: int = 2) -> np.ndarray:
    """S[i, j] = peak NCC of field i's centre crop inside field j, for every ordered pair (float16)."""
    n = len(fields)
    scores = np.zeros((n, n), np.float16)

    def row(i: int) -> None:
        template = centre_crop(fields[i])
        scores[i] = [match_score(template, f) for f in fields]

    cv2.setNumThreads(1)  # parallel over rows instead; OpenCV releases the GIL in matchTemplate
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(tqdm(pool.map(row, range(n)), total=n, desc="field twins", unit="row"))
    return scores


def twin_pairs(scores: np.ndarray, threshold: float = TWIN_NCC) -> list[tuple[int, int, float]]:
    """(i, j, score) for i < j whose symmetric score reaches the threshold."""
    sym = np.maximum(scores, scores.T).astype(np.float32)
    i, j = np.nonzero(np.triu(sym >= threshold, k=1))
    return [(int(a), int(b), float(sym[a, b])) for a, b in zip(i, j, strict=True)]


def write_twins(path: Path, samples: list[data.Sample], pairs: list[tuple[int, int, float]], command: str) -> None:
    """The committed list: one `path_a path_b ncc` line per twin pair, with how it was made."""
    header = (f"# Field twins of ALL_Aria2021: the same microscope field in two files (translation-tolerant).\n"
              f"# {CROP} px centre crop of one grey {FIELD_SIZE} px image slid over the other (shifts up to "
              f"±{(FIELD_SIZE - CROP) // 2} px), peak TM_CCOEFF_NORMED, the larger of both directions, >= {TWIN_NCC}.\n"
              f"# All {len(samples) * (len(samples) - 1) // 2} pairs scored. Made by: {command}\n"
              f"# columns: path_a path_b ncc\n")
    lines = [f"{samples[i].path} {samples[j].path} {s:.3f}\n" for i, j, s in sorted(pairs, key=lambda p: (p[0], p[1]))]
    path.write_text(header + "".join(lines))


def read_twins(path: Path) -> list[tuple[str, str]]:
    """Pairs of a committed twins list (empty when the list does not exist)."""
    if not path.exists():
        return []
    return [(f[0], f[1]) for f in (ln.split() for ln in data.read_list(path)) if len(f) >= 2]


def plot_scores(scores: np.ndarray, path: Path, threshold: float = TWIN_NCC) -> None:
    """Histogram (log counts) of the symmetric score of every pair, with the twin threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sym = np.maximum(scores, scores.T).astype(np.float32)[np.triu_indices(len(scores), 1)]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.hist(sym, bins=np.linspace(0, 1, 101), log=True)
    ax.axvline(threshold, color="C3", label=f"twin threshold {threshold}")
    ax.set_xlabel("peak NCC (112 px centre crop within the other image)")
    ax.set_ylabel("pairs")
    ax.set_title(f"All {len(sym):,} pairs of images; {int((sym >= threshold).sum())} at or above the threshold")
    ax.legend()
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
