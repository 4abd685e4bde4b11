"""Scores under the stain evaluation protocol (docs/stain_protocol.md), for artifacts and CV folds.

    python -m model protocol --artifact model/artifacts/cellnet      # grouped test split, every variant
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from model import data, stains
from model.metrics import binary_metrics, wilson_interval

SEEDS = (0, 1, 2, 3, 4)
SUMMARY_KEYS = ("balanced_accuracy", "sensitivity", "specificity", "roc_auc", "early_sensitivity")
FULL_CIRCLE = 180.0  # a hue jitter of ±180 degrees reaches every turn


def scores(labels: np.ndarray, subtypes: np.ndarray, p_all: np.ndarray, threshold: float) -> dict:
    """Binary metrics at a threshold, Wilson 95 % intervals, and sensitivity per ALL subtype."""
    decisions = p_all >= threshold
    m = binary_metrics(labels, decisions, p_all)
    m["sensitivity_ci"] = wilson_interval(m["tp"], m["tp"] + m["fn"])
    m["specificity_ci"] = wilson_interval(m["tn"], m["tn"] + m["fp"])
    for subtype in ("Early", "Pre", "Pro"):
        mask = subtypes == subtype
        if mask.any():
            hits = int(decisions[mask].sum())
            m[f"{subtype.lower()}_sensitivity"] = hits / int(mask.sum())
            m[f"{subtype.lower()}_sensitivity_ci"] = wilson_interval(hits, int(mask.sum()))
    return m


def variant_p_all(p_all_of: Callable[[np.ndarray], np.ndarray], images: np.ndarray,
                  seeds: tuple[int, ...] = SEEDS) -> dict[str, dict[int, np.ndarray]]:
    """P(ALL) for every protocol variant (random variants once per seed) of the same test images."""
    bccd = stains.read_bccd_statistics()
    return {v: {s: p_all_of(stains.apply_variant(images, v, s, bccd))
                for s in (seeds if v in stains.RANDOM_VARIANTS else (0,))} for v in stains.VARIANTS}


def summarise(labels: np.ndarray, subtypes: np.ndarray, p_all: dict[str, dict[int, np.ndarray]],
              threshold: float) -> dict:
    """Per variant: the seed-0 scores with intervals, and min/mean over seeds of balanced accuracy and AUC."""
    out = {}
    for variant, by_seed in p_all.items():
        per_seed = {s: scores(labels, subtypes, p, threshold) for s, p in by_seed.items()}
        out[variant] = {"seed0": per_seed[0], "seeds": {
            key: {"mean": float(np.mean([m[key] for m in per_seed.values()])),
                  "min": float(np.min([m[key] for m in per_seed.values()]))} for key in ("balanced_accuracy", "roc_auc")}}
    return out


def coverage(colour: dict | None) -> dict[str, str]:
    """Whether a recipe's colour augmentation covers each variant: `seen`, `partly` or `unseen`.

    `colour` is the recipe's ColourAugmentation as a dict (None: the paper's set, grayscale 10 %).
    """
    hue = colour["hue_deg"] if colour else 0.0
    low, high = colour["saturation"] if colour else (1.0, 1.0)
    grey = colour["grayscale"] if colour else 0.1

    def share(covered: float, total: float) -> str:
        return "seen" if covered >= total else ("partly" if covered > 0 else "unseen")

    far_low, far_high = stains.HUE_FAR_DEG
    sat_low, sat_high = stains.SATURATION_FACTOR
    return {"colour": "seen", "grayscale": "seen" if grey > 0 else "unseen",
            "hue_full": share(min(hue, FULL_CIRCLE), FULL_CIRCLE),
            "hue_far": share(max(0.0, min(hue, FULL_CIRCLE) - far_low), FULL_CIRCLE - far_low),
            "saturation": share(max(0.0, min(high, sat_high) - max(low, sat_low)), sat_high - sat_low),
            "bccd_transfer": "unseen"}


def card_colour_augmentation(card: dict) -> dict | None:
    """A card's colour augmentation; cards written before recipes named it carry `colour_jitter`."""
    recipe = card["training"]["recipe"]
    if "colour" in recipe:
        return recipe["colour"]
    from model.augment import ColourAugmentation

    return ColourAugmentation().__dict__ if recipe.get("colour_jitter") else None


def evaluate_artifact(folder: Path, root: Path, split: str = "grouped", part: str = "test") -> dict:
    """Score an artifact's float32 and int8 files under the protocol on `split/part.txt`."""
    from model.classifier import CARD_NAME, Classifier

    card = json.loads((folder / CARD_NAME).read_text())
    dataset, samples = data.load_dataset(root)
    test = data.load_splits(dataset, samples, split=split)[part]
    labels = np.array([s.label for s in test])
    subtypes = np.array([s.subtype for s in test])
    images = data.load_images(root, test, int(card["input_size"]))
    trained_on = {p for p in data.read_list(data.REPO / card["data"]["splits"]["train"]["file"])}
    result = {"split": f"data/{data.SPLIT_FOLDERS[dataset]}/{split}/{part}.txt".replace("//", "/"),
              "images": len(test), "benign": int((labels == 0).sum()),
              "test_images_in_training": sum(s.path in trained_on for s in test),
              "coverage": coverage(card_colour_augmentation(card)), "threshold": card["threshold"]}
    p_all, decide = {}, {}
    for kind in ("float32", "int8"):
        clf = Classifier.load(folder / card["artifacts"][kind]["file"])
        p_all[kind] = variant_p_all(lambda x, c=clf: c.p_all(np.concatenate(
            [c.classify(x[i:i + 64]) for i in range(0, len(x), 64)])), images)
        result[kind] = summarise(labels, subtypes, p_all[kind], clf.threshold)
        decide[kind] = lambda p, t=clf.threshold: p >= t  # each artifact at its own served threshold
    same = {v: [decide["float32"](p_all["float32"][v][s]) == decide["int8"](p_all["int8"][v][s]) for s in p_all["int8"][v]]
            for v in stains.VARIANTS}
    result["int8_agreement"] = {**{v: float(np.mean([np.mean(a) for a in same[v]])) for v in stains.VARIANTS},
                                "all": float(np.mean(np.concatenate([a for v in stains.VARIANTS for a in same[v]])))}
    return result


def with_ci(m: dict, key: str) -> str:
    low, high = m[key + "_ci"]
    return f"{m[key]:.3f} ({low:.3f}–{high:.3f})"


def table(results: dict[str, dict], kind: str = "int8") -> str:
    """Markdown table: one row per (model, variant), seed-0 figures with intervals, seed range."""
    rows = ["| model | variant | augmentation | balanced acc. (min–mean over seeds) | sensitivity (95 % CI) | "
            "specificity (95 % CI) | ROC AUC (min over seeds) | Early pre-B sensitivity (95 % CI) | int8 = float32 |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        for v in stains.VARIANTS:
            m, seeds = r[kind][v]["seed0"], r[kind][v]["seeds"]
            spread = (f" ({seeds['balanced_accuracy']['min']:.3f}–{seeds['balanced_accuracy']['mean']:.3f})"
                      if v in stains.RANDOM_VARIANTS else "")
            auc_min = f" ({seeds['roc_auc']['min']:.3f})" if v in stains.RANDOM_VARIANTS else ""
            rows.append(f"| `{name}` {kind} | {v} | {r['coverage'][v]} | {m['balanced_accuracy']:.3f}{spread} | "
                        f"{with_ci(m, 'sensitivity')} | {with_ci(m, 'specificity')} | {m['roc_auc']:.3f}{auc_min} | "
                        f"{with_ci(m, 'early_sensitivity')} | {r['int8_agreement'][v]:.3f} |")
    return "\n".join(rows)
