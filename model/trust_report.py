"""How far the served answers can be trusted, measured: refusal and answered figures on the held-out
split (with Wilson intervals, per subtype, predictive values at stated prevalences), calibration
before/after with a reliability diagram, and the gate on out-of-distribution sets built here.

Called by `python -m model evaluate`; figures go into the model card under `metrics.trust`.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import cv2
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from model import data, ood  # noqa: E402
from model.calibration import expected_calibration_error, predictive_values, reliability, wilson  # noqa: E402
from model.classifier import CARD_NAME, Classifier, Diagnosis  # noqa: E402
from model.evaluate import stress  # noqa: E402
from model.explain import METHOD, explain, heat_grid, nucleus_mask, nucleus_share  # noqa: E402
from model.preprocess import jpeg_quality, preprocess  # noqa: E402

PREVALENCES = (0.01, 0.05, 0.20, 0.50, 0.85)  # 0.85: this data set's test split
BCCD_DEFAULT = Path(__file__).resolve().parents[2] / "shared/data/BCCD"
DOCS = Path(__file__).resolve().parents[1] / "docs"
FAILURE_BASE_STEP = 12  # every 12th held-out image (41) is spoiled for the failed-capture sets
SWEEPS = {"defocus radius (px at 224)": ("defocus", (1, 2, 3, 4, 5, 6, 8, 12)),
          "exposure gain": ("exposure", (0.1, 0.2, 0.3, 0.5, 0.7, 1.4, 2.0, 2.5, 3.0, 4.0)),
          "JPEG quality": ("jpeg", (3, 6, 10, 15, 20, 30, 50))}


def assess_all(clf: Classifier, images: np.ndarray, qualities: list[int | None] | None = None,
               batch_size: int = 64) -> list[Diagnosis]:
    out: list[Diagnosis] = []
    for i in range(0, len(images), batch_size):
        q = None if qualities is None else qualities[i:i + batch_size]
        out.extend(clf.assess(images[i:i + batch_size], q))
    return out


def rate(successes: int, n: int) -> dict:
    low, high = wilson(successes, n)
    return {"k": int(successes), "n": int(n), "rate": successes / n if n else float("nan"), "ci95": [low, high]}


def answered_figures(labels: np.ndarray, subtypes: list[str], diagnoses: list[Diagnosis]) -> dict:
    """Counts, sensitivity/specificity with Wilson intervals, per-subtype sensitivity and predictive
    values on the images that got a decision."""
    decided = np.array([d.label != "Indeterminate" for d in diagnoses])
    positive = np.array([d.positive for d in diagnoses])
    y = labels[decided]
    p = positive[decided]
    tp, fn = int(np.sum(p & (y == 1))), int(np.sum(~p & (y == 1)))
    tn, fp = int(np.sum(~p & (y == 0))), int(np.sum(p & (y == 0)))
    sens, spec = rate(tp, tp + fn), rate(tn, tn + fp)
    per_subtype = {}
    for name in sorted(set(subtypes)):
        idx = np.array([s == name for s in subtypes]) & decided
        correct = positive[idx] == (labels[idx] == 1)
        per_subtype[name] = rate(int(correct.sum()), int(idx.sum()))
    return {"answered": int(decided.sum()), "tp": tp, "fp": fp, "tn": tn, "fn": fn, "sensitivity": sens,
            "specificity": spec, "balanced_accuracy": (sens["rate"] + spec["rate"]) / 2,
            "per_subtype_correct": per_subtype,
            "predictive_values": {f"{prev:g}": dict(zip(("ppv", "npv"), predictive_values(sens["rate"], spec["rate"],
                                                                                            prev), strict=True))
                                  for prev in PREVALENCES}}


def refusal(diagnoses: list[Diagnosis]) -> dict:
    reasons = Counter(d.reason for d in diagnoses if d.label == "Indeterminate")
    n = len(diagnoses)
    gate = sum(v for k, v in reasons.items() if k != "borderline")
    return {"n": n, "gate": rate(gate, n), "borderline": rate(reasons.get("borderline", 0), n),
            "total": rate(gate + reasons.get("borderline", 0), n), "reasons": dict(reasons)}


def in_distribution(clf: Classifier, images: np.ndarray, labels: np.ndarray, subtypes: list[str]) -> dict:
    """Refusal and answered figures on the held-out split; the same at the plain threshold (no gate,
    no band) for comparison; calibration error before and after."""
    diagnoses = assess_all(clf, images)
    p_all = np.array([d.p_all for d in diagnoses])
    plain = [Diagnosis("Positive" if p >= clf.threshold else "Negative", None, None, float(p), {}) for p in p_all]
    passed = np.array([d.reason in (None, "borderline") for d in diagnoses])
    q = clf.policy.calibration(p_all)
    served = np.array([d.label != "Indeterminate" for d in diagnoses])
    confidence = np.array([d.confidence for d in diagnoses if d.confidence is not None])
    correct = np.array([d.positive == bool(y) for d, y in zip(diagnoses, labels, strict=True) if d.confidence is not None])
    raw_confidence = np.where(p_all >= clf.threshold, p_all, 1 - p_all)[served]
    return {
        "refusal": refusal(diagnoses),
        "answered": answered_figures(labels, subtypes, diagnoses),
        "plain_threshold_all_images": answered_figures(labels, subtypes, plain),
        "calibration": {
            "ece_p_all_before": expected_calibration_error(p_all[passed], labels[passed]),
            "ece_p_all_after": expected_calibration_error(q[passed], labels[passed]),
            "ece_confidence_before": expected_calibration_error(raw_confidence, correct),
            "ece_confidence_after": expected_calibration_error(confidence, correct),
            "min_confidence": float(confidence.min()) if len(confidence) else None,
            "bins": 15, "images": int(passed.sum()),
        },
    }, diagnoses


def _sweep_images(kind: str, value: float, rgbs: list[np.ndarray]) -> list[bytes]:
    if kind == "defocus":
        return [ood.encode(ood.defocus(im, int(value)), ".jpg", 95) for im in rgbs]
    if kind == "exposure":
        return [ood.encode(ood.exposure(im, value), ".jpg", 95) for im in rgbs]
    return [ood.encode(im, ".jpg", int(value)) for im in rgbs]


def gate_on_bytes(clf: Classifier, payloads: list[bytes], labels: np.ndarray | None = None) -> tuple[dict, np.ndarray]:
    """Refusal (by reason) and decisions on encoded images; accuracy of the decisions when labelled."""
    images = np.stack([preprocess(b, clf.input_size) for b in payloads])
    diagnoses = assess_all(clf, images, [jpeg_quality(b) for b in payloads])
    out = refusal(diagnoses)
    out["decisions"] = dict(Counter(d.label for d in diagnoses if d.label != "Indeterminate"))
    plain = np.array([d.p_all for d in diagnoses]) >= clf.threshold
    out["without_gate"] = {"Positive": int(plain.sum()), "Negative": int((~plain).sum())}
    if labels is not None:
        decided = np.array([d.label != "Indeterminate" for d in diagnoses])
        right = np.array([d.positive == bool(y) for d, y in zip(diagnoses, labels, strict=True)])
        out["accuracy_of_decisions"] = rate(int(right[decided].sum()), int(decided.sum()))
        out["accuracy_without_gate"] = rate(int(np.sum((np.array([d.p_all for d in diagnoses]) >= clf.threshold)
                                                       == (labels == 1))), len(labels))
    scores = np.array([d.ood_score for d in diagnoses], float)
    return out, scores


def out_of_distribution(clf: Classifier, root: Path, test: list[data.Sample], test_scores: np.ndarray,
                        bccd_root: Path | None) -> dict:
    base = test[::FAILURE_BASE_STEP]
    base_labels = np.array([s.label for s in base])
    smears = [(root / s.path).read_bytes() for s in base]
    sets: dict[str, dict] = {}
    all_scores = []
    for name, payloads in ood.failed_captures(smears).items():
        spoiled = len(payloads) == len(base)
        result, scores = gate_on_bytes(clf, payloads, base_labels if spoiled else None)
        result["expected_reasons"] = sorted(ood.EXPECTED_REASONS[ood.failure_type(name)])
        sets[f"failed:{name}"] = result
        all_scores.append(scores)
    result, scores = gate_on_bytes(clf, list(ood.photographs().values()))
    sets["photographs"] = result
    all_scores.append(scores)
    if bccd_root is not None and (bccd_root / "JPEGImages").is_dir():
        fields, crops = ood.bccd(bccd_root)
        for name, items in (("bccd_fields", fields), ("bccd_white_cells", crops)):
            result, scores = gate_on_bytes(clf, list(items.values()))
            result["auroc_ood_score"] = _auroc(test_scores, scores)
            sets[name] = result
    failed = np.concatenate(all_scores)
    summary = {"auroc_ood_score_failed_and_photographs": _auroc(test_scores, failed)}
    for name, result in sets.items():
        if name.startswith("failed:") or name == "photographs":
            result["auroc_ood_score"] = _auroc(test_scores, all_scores[list(sets).index(name)])
    refused = sum(r["total"]["k"] for k, r in sets.items() if k.startswith("failed:") or k == "photographs")
    total = sum(r["n"] for k, r in sets.items() if k.startswith("failed:") or k == "photographs")
    summary["failed_and_photographs_refused"] = rate(refused, total)
    summary["decisions_on_failed_and_photographs"] = sum(sum(r["decisions"].values()) for k, r in sets.items()
                                                         if k.startswith("failed:") or k == "photographs")
    rgbs = [ood.decode(b) for b in smears]
    sweeps = {}
    for title, (kind, values) in SWEEPS.items():
        sweeps[title] = {f"{v:g}": gate_on_bytes(clf, _sweep_images(kind, v, rgbs), base_labels)[0] for v in values}
    return {"sets": sets, "summary": summary, "sweeps": sweeps}


def _auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    return float(roc_auc_score(np.r_[np.zeros(len(inside)), np.ones(len(outside))], np.r_[inside, outside]))


def stress_refusal(clf: Classifier, images: np.ndarray, labels: np.ndarray, subtypes: list[str], seed: int) -> dict:
    out = {}
    for mode in ("grayscale", "hue_saturation"):
        diagnoses = assess_all(clf, stress(images, mode, seed))
        out[mode] = {"refusal": refusal(diagnoses), "answered": answered_figures(labels, subtypes, diagnoses)}
    return out


def reliability_plot(path: Path, title: str, labels: np.ndarray, p_all: np.ndarray, q: np.ndarray) -> None:
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "k:", label="perfect calibration")
    for name, probability, marker in (("raw P(ALL)", p_all, "o"), ("calibrated", q, "s")):
        mean, observed, count = reliability(probability, labels.astype(float))
        ece = expected_calibration_error(probability, labels)
        ax.plot(mean, observed, marker=marker, label=f"{name} (ECE {ece:.3f})")
        for x, y, c in zip(mean, observed, count, strict=True):
            ax.annotate(str(c), (x, y), fontsize=6, xytext=(2, -8), textcoords="offset points")
    ax.set_xlabel("predicted P(ALL) (15 bins; numbers: images per bin)")
    ax.set_ylabel("observed share of ALL")
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def explanation_figures(clf: Classifier, images: np.ndarray, labels: np.ndarray, grid_png: Path,
                        examples: int = 8) -> dict:
    """Occlusion heat on nucleus pixels vs the share of the image they cover (and vs the most a heat
    map of this grid could put there), over the held-out images with heat and a nucleus mask; how many
    maps carry heat; p50 cost of `explain`; a PNG grid of examples (image, heat, nucleus mask)."""
    shares, areas, ceilings, costs, heats = [], [], [], [], []
    for tensor in images:
        costs.append(explain(clf, tensor, (224, 224)).ms)
        heat = heat_grid(clf, tensor)
        share, area, ceiling = nucleus_share(heat, nucleus_mask(tensor))
        heats.append(heat)
        if np.isfinite(share) and np.isfinite(ceiling):
            shares.append(share)
            areas.append(area)
            ceilings.append(ceiling)
    shares, areas, ceilings = np.array(shares), np.array(areas), np.array(ceilings)
    rng = np.random.default_rng(0)
    picks = np.concatenate([rng.choice(np.flatnonzero(labels == c), examples // 2, replace=False) for c in (0, 1)])
    fig, axes = plt.subplots(3, len(picks), figsize=(1.6 * len(picks), 5.2))
    for col, i in enumerate(picks):
        heat = cv2.resize(heats[i] / max(heats[i].max(), 1e-9), images[i].shape[:2][::-1], interpolation=cv2.INTER_CUBIC)
        axes[0, col].imshow(images[i])
        axes[0, col].set_title(("ALL" if labels[i] else "Benign") + f"\nP(ALL) {clf.p_all(clf.classify(images[i][None]))[0]:.2f}",
                               fontsize=7)
        axes[1, col].imshow(images[i])
        axes[1, col].imshow(np.clip(heat, 0, 1), cmap="jet", alpha=0.5)
        axes[2, col].imshow(nucleus_mask(images[i]), cmap="gray")
    for row, name in enumerate(("input", "occlusion heat", "nucleus mask")):
        axes[row, 0].set_ylabel(name, fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{clf.name} int8, held-out split: heat on nuclei {shares.mean():.2f} of the total, "
                 f"nuclei cover {areas.mean():.2f} of the image", fontsize=9)
    grid_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(grid_png, dpi=100, bbox_inches="tight")
    plt.close(fig)
    ratio = shares / np.maximum(areas, 1e-9)
    return {"method": METHOD, "images_with_heat": int(sum(h.max() > 0 for h in heats)),
            "images_scored_on_nuclei": int(len(shares)), "images": int(len(images)),
            "heat_share_on_nuclei_mean": float(shares.mean()), "nucleus_area_share_mean": float(areas.mean()),
            "grid_ceiling_share_mean": float(ceilings.mean()), "ratio_median": float(np.median(ratio)),
            "images_with_more_heat_than_area": float(np.mean(shares > areas)),
            "ms_p50": float(np.median(costs)), "ms_p90": float(np.percentile(costs, 90)), "grid_png": grid_png.name,
            "nucleus_mask": "HSV saturation above Otsu (>= 0.3), 3x3 opening"}


def evaluate_trust(out_dir: Path, root: Path, seed: int = 42, bccd_root: Path | None = None) -> dict:
    """All trust figures of an artifact folder (int8 and float32); stores them in the card."""
    card_path = out_dir / CARD_NAME
    card = json.loads(card_path.read_text())
    dataset, samples = data.load_dataset(root)
    test = data.card_splits(card, dataset, samples, seed)["test"]
    labels = np.array([s.label for s in test])
    subtypes = [s.subtype for s in test]
    images = data.load_images(root, test, int(card["input_size"]))
    bccd_root = bccd_root or Path(os.environ.get("ALLDS_BCCD", BCCD_DEFAULT))
    trust: dict = {"command": "python -m model evaluate", "prevalences": list(PREVALENCES)}
    for kind in ("int8", "float32"):
        clf = Classifier.load(out_dir / card["artifacts"][kind]["file"])
        figures, diagnoses = in_distribution(clf, images, labels, subtypes)
        trust[kind] = figures
        if kind == "int8":
            p_all = np.array([d.p_all for d in diagnoses])
            passed = np.array([d.reason in (None, "borderline") for d in diagnoses])
            reliability_plot(out_dir / "reliability.png", f"{card['name']} int8, test split ({int(passed.sum())} "
                             "images the gate passes)", labels[passed], p_all[passed],
                             clf.policy.calibration(p_all[passed]))
            test_scores = np.array([d.ood_score for d in diagnoses], float)
            trust["out_of_distribution"] = out_of_distribution(clf, root, test, test_scores, bccd_root)
            trust["stress"] = stress_refusal(clf, images, labels, subtypes, seed)
            trust["explanation"] = explanation_figures(clf, images, labels, DOCS / f"explanations_{card['name']}.png")
    trust = _no_nan(trust)
    card["metrics"] = {**card.get("metrics", {}), "trust": trust}
    card_path.write_text(json.dumps(card, indent=2, allow_nan=False) + "\n")
    return trust


def _no_nan(tree):
    """Undefined rates (nothing answered) as null, so the card stays strict JSON."""
    if isinstance(tree, dict):
        return {k: _no_nan(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return [_no_nan(v) for v in tree]
    return None if isinstance(tree, float) and tree != tree else tree
