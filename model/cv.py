"""Repeated grouped k-fold cross-validation of a training recipe, resumable fold by fold.

Groups are the committed ones (`data/aria2021/grouped/groups.txt`: duplicates, field twins, capture
blocks). In each fold the network is trained from scratch at the recipe's full budget on the fold's
train part, its operating threshold is chosen on the fold's validation part (sensitivity >= 0.98),
and the fold's test part is scored under every variant of the stain protocol. With `--classes subtype`
the network has the 4-class head; the screen is scored on P(ALL) = 1 - P(Benign) as for the binary
head, and each fold adds the subtypes' recalls and confusion matrix. Each fold also fits the served
indeterminate band on its validation part and scores it on its test part (`served_band`: the band without
the input gate) and keeps its validation P(ALL), so other operating rules can be scored later. Each
finished fold is written to `<out>/<repeat>-<fold>.json` and skipped when the command runs again.

    python -m model cv --arch cellnet --folds 5 --repeats 2      # -> runs/cv/cellnet/
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from model import data, grouped, protocol
from model.calibration import wilson

KEYS = protocol.SUMMARY_KEYS


def read_groups(root: Path, samples: list[data.Sample]) -> np.ndarray:
    """Group id per sample from the committed `grouped/groups.txt`."""
    dataset = data.load_dataset(root)[0]
    path = data.split_dir(dataset) / grouped.GROUPED / "groups.txt"
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: run `python -m model grouped-split` first")
    group_of = {f[0]: int(f[1]) for f in (ln.split() for ln in data.read_list(path))}
    return np.array([group_of[s.path] for s in samples])


def run_fold(recipe: str, images: np.ndarray, samples: list[data.Sample], parts: dict[str, np.ndarray], seed: int,
             epochs: int | None, classes: str = "binary") -> dict:
    """Train on one fold's train part, threshold on its validation part, protocol scores on its test part."""
    from model.calibration import choose_threshold
    from model.evaluate import subtype_scores
    from model.train import MIN_SENSITIVITY, class_names, class_probabilities, fit, p_all, targets

    labels = np.array([s.label for s in samples])
    subtypes = np.array([s.subtype for s in samples])
    y, names = targets(samples, classes), class_names(classes)
    tr, va, te = parts["train"], parts["val"], parts["test"]
    model, history = fit(recipe, images[tr], y[tr], images[va], y[va], len(names), seed, epochs)
    p_val = p_all(model, images[va])
    threshold = choose_threshold(labels[va], p_val, MIN_SENSITIVITY)
    by_variant = protocol.variant_p_all(lambda x: p_all(model, x), images[te])
    result = {"recipe": recipe, "classes": names, "seed": seed, "threshold": threshold,
              "epochs_run": len(history["loss"]), "best_val_auc": max(history["val_auc"]),
              "sizes": {k: len(v) for k, v in parts.items()},
              "benign": {k: int((labels[v] == 0).sum()) for k, v in parts.items()},
              "test_paths": [samples[i].path for i in te], "p_all_colour": by_variant["colour"][0].round(6).tolist(),
              "p_all_val": p_val.round(6).tolist(),
              "protocol": protocol.summarise(labels[te], subtypes[te], by_variant, threshold)}
    probabilities = class_probabilities(model, images[te])
    if classes == "subtype":
        result["subtype"] = subtype_scores(names, subtypes[te].tolist(), probabilities)
    benign_on_top = probabilities.argmax(1) == names.index("Benign")
    result["served_band"] = served_band(labels[va], p_val, labels[te], by_variant["colour"][0], threshold, benign_on_top,
                                        f"{recipe} fold seed {seed}")
    return result


def served_band(val_labels: np.ndarray, p_val: np.ndarray, test_labels: np.ndarray, p_test: np.ndarray,
                threshold: float, benign_on_top: np.ndarray | None = None, name: str = "CV fold") -> dict:
    """The served indeterminate band fitted on a fold's validation part, scored on its test part in colour:
    how many are borderline, and the confusion counts of the answered. As `model.calibrate` fits it, except
    that the input gate is left out (it needs an exported artifact's features) and the outputs are the
    float Keras model's, not the int8 artifact's; so this estimates the band, not the whole policy."""
    from model.calibrate import fit_band
    from model.metrics import binary_metrics
    from model.policy import borderline

    _, (low, high) = fit_band(val_labels, p_val, threshold, name)
    undecided = borderline(p_test, (low, high), benign_on_top)
    answered = ~undecided
    return {"limits": [low, high], "borderline": int(undecided.sum()), "n": len(p_test),
            "answered": binary_metrics(test_labels[answered], p_test[answered] >= high) if answered.any() else None}


def _spread(values: list[float]) -> dict:
    """Mean and sample sd (a single value has sd 0)."""
    return {"mean": float(np.mean(values)), "sd": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}


def _with_ci(hits: int, n: int) -> tuple[float, list[float]]:
    return hits / max(n, 1), list(wilson(hits, n))


def _scored(counts: dict) -> dict:
    """Confusion counts with their sensitivity and specificity, each with its Wilson 95 % interval."""
    sensitivity, sensitivity_ci = _with_ci(counts["tp"], counts["tp"] + counts["fn"])
    specificity, specificity_ci = _with_ci(counts["tn"], counts["tn"] + counts["fp"])
    return {**counts, "sensitivity": sensitivity, "sensitivity_ci95": sensitivity_ci, "specificity": specificity,
            "specificity_ci95": specificity_ci}


def pooled(results: list[dict]) -> dict:
    """Each repeat's folds pooled (its test parts hold every image once): per variant the seed-0 counts, with
    sensitivity, specificity (Wilson 95 %, images as units) and balanced accuracy; and Early pre-B, counted from
    each fold's stored colour P(ALL) at its threshold."""
    out = {}
    for repeat in sorted({r["repeat"] for r in results}):
        folds = [r for r in results if r["repeat"] == repeat]
        entry = {"folds": len(folds)}
        for variant in folds[0]["protocol"]:
            scored = _scored({k: sum(f["protocol"][variant]["seed0"][k] for f in folds) for k in ("tp", "fn", "tn", "fp")})
            entry[variant] = {**scored, "balanced_accuracy": (scored["sensitivity"] + scored["specificity"]) / 2}
        early = [p >= f["threshold"] for f in folds for path, p in zip(f["test_paths"], f["p_all_colour"], strict=True)
                 if path.startswith("Early/")]
        sensitivity, ci = _with_ci(sum(early), len(early))
        entry["early"] = {"hits": sum(early), "n": len(early), "sensitivity": sensitivity, "sensitivity_ci95": ci}
        out[str(repeat)] = entry
    return out


def card_headline(summary: dict) -> dict:
    """What a model card quotes of its recipe's CV summary: folds, balanced accuracy and AUC over folds (colour),
    and each repeat's pooled sensitivity, specificity and Early pre-B sensitivity with Wilson intervals."""
    colour = summary["colour"]
    return {"summary": "cv_grouped.json", "folds": summary["folds"], "balanced_accuracy": colour["balanced_accuracy"],
            "roc_auc": colour["roc_auc"],
            "pooled": {repeat: {"folds": p["folds"], **{k: p["colour"][k] for k in (
                "sensitivity", "sensitivity_ci95", "specificity", "specificity_ci95", "balanced_accuracy")},
                "early_sensitivity": p["early"]["sensitivity"], "early_sensitivity_ci95": p["early"]["sensitivity_ci95"]}
                for repeat, p in summary.get("pooled", {}).items()}}


def summary(results: list[dict]) -> dict:
    """Mean and sample sd over folds of each seed-0 metric per variant (and of the per-fold min over seeds), each
    repeat's folds pooled (`pooled`), and the served band's figures pooled over the folds that estimated it, with
    the share of each class it leaves borderline."""
    out = {"folds": len(results)}
    for variant in results[0]["protocol"]:
        entries = [r["protocol"][variant] for r in results]
        out[variant] = {k: _spread([e["seed0"][k] for e in entries]) for k in KEYS}
        out[variant]["balanced_accuracy_min_over_seeds"] = _spread([e["seeds"]["balanced_accuracy"]["min"] for e in entries])
    if all("test_paths" in r for r in results):
        out["pooled"] = pooled(results)
    bands = {f"{r['repeat']}-{r['fold']}": r["served_band"] for r in results if "served_band" in r}
    if bands:  # folds run before the band was estimated have none; counts pooled over those that have it
        counts = {k: sum((b["answered"] or {}).get(k, 0) for b in bands.values()) for k in ("tp", "fn", "tn", "fp")}
        n, borderline = sum(b["n"] for b in bands.values()), sum(b["borderline"] for b in bands.values())
        benign = sum(r["benign"]["test"] for r in results if "served_band" in r)
        benign_borderline = benign - counts["tn"] - counts["fp"]
        out["served_band"] = {"folds": sorted(bands), "n": n, "borderline": borderline, **_scored(counts),
                              "borderline_share": borderline / n,
                              "benign_borderline": benign_borderline, "benign_borderline_share": benign_borderline / benign,
                              "all_borderline": borderline - benign_borderline,
                              "all_borderline_share": (borderline - benign_borderline) / (n - benign)}
    return out


def cross_validate(root: Path, recipe: str, folds: int = 5, repeats: int = 1, seed: int = 42, epochs: int | None = None,
                   out: Path | None = None, only: set[str] | None = None, classes: str = "binary") -> dict:
    """Run (or resume) every repeat x fold, write per-fold JSON and `summary.json`; `only` picks `r-k` folds."""
    from model.networks import INPUT_SIZES
    from model.train import architecture, run_name

    name = run_name(recipe, classes)
    out = out or data.REPO / "runs" / "cv" / (name if epochs is None else f"{name}-{epochs}ep")
    out.mkdir(parents=True, exist_ok=True)
    run = {"recipe": recipe, "head": classes, "epochs_budget": epochs}
    _, samples = data.load_dataset(root)
    groups = read_groups(root, samples)
    done_folds = {path: json.loads(path.read_text()) for path in sorted(out.glob("*-*.json"))}
    done_repeats = {int(path.stem.split("-")[0]) for path in done_folds}
    partitions = {r: grouped.cv_indices(samples, groups, folds, seed + r) for r in sorted(set(range(repeats)) | done_repeats)}
    for path, done in done_folds.items():
        binary = done.get("classes", list(data.BINARY_CLASSES)) == list(data.BINARY_CLASSES)  # older folds: binary
        found = {"recipe": done.get("recipe"), "head": "binary" if binary else "subtype",
                 "epochs_budget": done.get("epochs_budget")}
        if found != run:
            raise ValueError(f"{path} holds a fold of {found}, not of {run}: use another --out")
        r, k = (int(n) for n in path.stem.split("-"))
        if k >= folds or (done.get("seed"), done.get("test_paths")) != (seed + 100 * r + k,
                                                                      [samples[i].path for i in partitions[r][k]["test"]]):
            raise ValueError(f"{path} holds a fold of another partition (fold count, seed, groups or data): "
                             f"use another --out")
    images = None
    for r in range(repeats):
        for k, parts in enumerate(partitions[r]):
            path = out / f"{r}-{k}.json"
            if path.exists() or (only and f"{r}-{k}" not in only):
                continue
            if images is None:
                images = data.load_images(root, samples, INPUT_SIZES[architecture(recipe)])
            result = run_fold(recipe, images, samples, parts, seed + 100 * r + k, epochs, classes)
            result.update(repeat=r, fold=k, epochs_budget=epochs)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(result) + "\n")
            tmp.replace(path)
    results = [json.loads(p.read_text()) for p in sorted(out.glob("*-*.json"))]
    if not results:
        return {"folds": 0}
    result = {**run, **summary(results)}
    (out / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def trial(root: Path, recipe: str, epochs: int | None, seed: int = 42, out: Path | None = None,
          classes: str = "binary") -> dict:
    """A recipe trial on the committed grouped split: train on train, score on validation (never test).

    The threshold and band are chosen on the same validation images they are scored on, so balanced
    accuracies and the band's figures are optimistic alike for every recipe; compare AUCs first.
    """
    from model.networks import INPUT_SIZES
    from model.train import architecture, run_name

    dataset, samples = data.load_dataset(root)
    splits = data.load_splits(dataset, samples, seed, grouped.GROUPED)
    index = {s.path: i for i, s in enumerate(samples)}
    parts = {k: np.array([index[s.path] for s in splits[k]]) for k in ("train", "val")}
    parts["test"] = parts["val"]
    used = np.concatenate([parts["train"], parts["val"]])
    size = INPUT_SIZES[architecture(recipe)]
    images = np.zeros((len(samples), size, size, 3), np.float32)  # test images are never decoded
    images[used] = data.load_images(root, [samples[i] for i in used], size)
    result = run_fold(recipe, images, samples, parts, seed, epochs, classes)
    path = out or data.REPO / "runs" / "trials" / f"{run_name(recipe, classes)}-{epochs or 'full'}ep.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result) + "\n")
    return result
