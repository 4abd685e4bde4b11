"""`python -m model {split,twins,grouped-split,cv,protocol,stains,train,export,calibrate,evaluate,classify,baseline,
results,keygen,bundle,verify-bundle,hias-entity}`."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from pathlib import Path

from model import data
from model.calibration import predictive_values, wilson
from model.classifier import CARD_NAME, DEFAULT_ARTIFACT, read_card
from model.metrics import with_intervals


def _artifact_dir(path: str | None) -> Path:
    p = Path(path) if path else DEFAULT_ARTIFACT
    return p if p.is_dir() else p.parent


def cmd_split(args: argparse.Namespace) -> None:
    root = data.data_root(args.data)
    dataset, samples = data.load_dataset(root)
    groups = data.duplicate_groups(samples, data.duplicate_pairs(root))
    files = data.write_splits(dataset, samples, data.split_indices(samples, groups, args.seed))
    for name, path in files.items():
        print(f"{name}: {len(data.read_list(path))} images -> {path}")


def cmd_twins(args: argparse.Namespace) -> None:
    import numpy as np

    from model import twins

    root = data.data_root(args.data)
    dataset, samples = data.load_dataset(root)
    cache = Path(args.scores)
    if cache.exists():
        scores = np.load(cache)
    else:
        scores = twins.score_matrix([twins.grey_field(root / s.path) for s in samples], args.workers)
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.save(cache, scores)
    pairs = twins.twin_pairs(scores)
    out = data.split_dir(dataset) / twins.TWINS_FILE
    twins.write_twins(out, samples, pairs, "python -m model twins")
    twins.plot_scores(scores, Path(args.plot))
    print(f"{len(pairs)} twin pairs (NCC >= {twins.TWIN_NCC}) -> {out}; score matrix {cache}; histogram {args.plot}")


def cmd_grouped_split(args: argparse.Namespace) -> None:
    from model.grouped import make_grouped_split

    report = make_grouped_split(data.data_root(args.data), args.seed, Path(args.plot))
    print(json.dumps(report, indent=2))


def cmd_cv(args: argparse.Namespace) -> None:
    from model.cv import card_headline, cross_validate, trial

    if args.trial:
        result = trial(data.data_root(args.data), args.arch, args.epochs, args.seed, Path(args.out) if args.out else None,
                       args.classes)
        print(json.dumps({"val_auc": result["best_val_auc"], "epochs_run": result["epochs_run"],
                          **{v: {k: m["seed0"][k] for k in ("balanced_accuracy", "roc_auc", "early_sensitivity")}
                             for v, m in result["protocol"].items()}}, indent=2))
        return
    only = set(args.only.split(",")) if args.only else None
    result = cross_validate(data.data_root(args.data), args.arch, args.folds, args.repeats, args.seed, args.epochs,
                            Path(args.out) if args.out else None, only, args.classes)
    if args.store:  # the summary beside the artifacts, its headline in their card
        store = Path(args.store)
        (store / "cv_grouped.json").write_text(json.dumps(result, indent=2) + "\n")
        card = read_card(store)
        card["metrics"]["cv_grouped"] = card_headline(result)
        (store / CARD_NAME).write_text(json.dumps(card, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def cmd_protocol(args: argparse.Namespace) -> None:
    from model.protocol import evaluate_artifact, table

    root = data.data_root(args.data)
    results = {}
    for folder in args.artifact or [str(DEFAULT_ARTIFACT.parent)]:
        result = evaluate_artifact(_artifact_dir(folder), root, args.split, args.part)
        out = _artifact_dir(folder) / f"protocol_{args.split or 'per_image'}_{args.part}.json"
        out.write_text(json.dumps(result, indent=2) + "\n")
        results[_artifact_dir(folder).name] = result
    print(table(results, "int8"))
    print(table(results, "float32"))


def cmd_stains(args: argparse.Namespace) -> None:
    from model import stains

    path = stains.write_bccd_statistics(stains.bccd_statistics(Path(args.bccd)))
    print(f"Lab statistics of {len(stains.read_bccd_statistics(path))} BCCD fields -> {path}")


def cmd_train(args: argparse.Namespace) -> None:
    from model.baseline import run_baseline
    from model.calibrate import fit_policy
    from model.evaluate import evaluate_artifacts
    from model.train import train
    from model.trust_report import evaluate_trust

    root = data.data_root(args.data)
    out = train(root, args.arch, args.epochs, args.seed, args.classes, Path(args.out) if args.out else None,
                args.limit, args.split, Path(args.trained) if args.trained else None)
    fit_policy(out, root, args.seed)
    metrics = evaluate_artifacts(out, root, args.seed)
    _store(out, {"baseline": run_baseline(root, args.seed)})
    if not args.limit:
        evaluate_trust(out, root, args.seed)
    print(json.dumps(metrics, indent=2))
    print(f"artifacts written to {out}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    root = data.data_root(args.data)
    if args.cv:
        from model.evaluate import cross_validate

        cv = cross_validate(root, args.arch, args.cv, args.seed, args.epochs)
        if args.artifact or args.arch in ("allds2020", "cellnet"):
            _store(_artifact_dir(args.artifact) if args.artifact else DEFAULT_ARTIFACT.parent.parent / args.arch,
                   {"cv": cv})
        print(json.dumps({k: v for k, v in cv.items() if k != "per_fold"}, indent=2))
        return
    from model.evaluate import evaluate_artifacts
    from model.trust_report import evaluate_trust

    out = _artifact_dir(args.artifact)
    metrics = evaluate_artifacts(out, root, args.seed)
    metrics["trust"] = evaluate_trust(out, root, args.seed, Path(args.bccd) if args.bccd else None)
    print(json.dumps(trust_summary(metrics), indent=2))


def trust_summary(metrics: dict) -> dict:
    """The headline trust figures of `metrics.trust` (the card holds all of them)."""
    trust = metrics["trust"]
    out = {}
    for kind in ("int8", "float32"):
        t = trust[kind]
        out[kind] = {"refused_gate": t["refusal"]["gate"]["rate"], "refused_borderline": t["refusal"]["borderline"]["rate"],
                     "refused_total": t["refusal"]["total"]["rate"],
                     "sensitivity_answered": [t["answered"]["sensitivity"]["rate"], *t["answered"]["sensitivity"]["ci95"]],
                     "specificity_answered": [t["answered"]["specificity"]["rate"], *t["answered"]["specificity"]["ci95"]],
                     "ece_before": t["calibration"]["ece_p_all_before"], "ece_after": t["calibration"]["ece_p_all_after"]}
    ood = trust["out_of_distribution"]
    out["out_of_distribution"] = {**ood["summary"], **{name: {"refused": s["total"]["rate"], "decisions": s["decisions"]}
                                                      for name, s in ood["sets"].items()}}
    out["explanation"] = trust.get("explanation")
    return out


def cmd_export(args: argparse.Namespace) -> None:
    from model.export import reexport

    for kind, path in reexport(_artifact_dir(args.artifact), data.data_root(args.data), args.seed).items():
        print(f"{kind}: {path}")


def cmd_calibrate(args: argparse.Namespace) -> None:
    from model.calibrate import fit_policy

    section = fit_policy(_artifact_dir(args.artifact), data.data_root(args.data), args.seed)
    print(json.dumps({k: v for k, v in section.items() if k != "rules"}, indent=2))


def cmd_classify(args: argparse.Namespace) -> None:
    from model.classifier import Classifier
    from model.metrics import binary_metrics, outcome, summary_line
    from model.preprocess import ImageError, jpeg_quality, preprocess

    root = data.data_root(args.data)
    clf = Classifier.load(args.artifact or DEFAULT_ARTIFACT)
    dataset, samples = data.load_dataset(root)
    if args.split != "all":
        samples = data.card_splits(clf.card, dataset, samples, args.seed)[args.split]
    labels, decisions, refused = [], [], 0
    for s in samples:
        try:
            payload = (root / s.path).read_bytes()
            tensor = preprocess(payload, clf.input_size)
        except ImageError as exc:
            logging.error("%s: %s (%s)", s.path, exc.message, exc.code)
            continue
        result = clf.assess(tensor[None], [jpeg_quality(payload)])[0]
        if result.label == "Indeterminate":
            refused += 1
            logging.info("%s: Indeterminate (%s) (P(ALL) %.4f)", s.path, result.reason, result.p_all)
            continue
        logging.info("%s: %s (P(ALL) %.4f, confidence %.4f)", s.path, outcome(s.label, result.positive), result.p_all,
                     result.confidence)
        labels.append(s.label)
        decisions.append(result.positive)
    logging.info("%s | Indeterminate %d of %d", summary_line(binary_metrics(labels, decisions)), refused,
                 refused + len(labels))


def cmd_baseline(args: argparse.Namespace) -> None:
    from model.baseline import run_baseline

    print(json.dumps(run_baseline(data.data_root(args.data), args.seed), indent=2))


def cmd_results(args: argparse.Namespace) -> None:
    """The README's results tables, from the committed model cards and protocol results."""
    folders = sorted(p.parent for p in DEFAULT_ARTIFACT.parent.parent.glob(f"*/{CARD_NAME}"))
    print(grouped_table(folders))
    print()
    print(results_table([f / CARD_NAME for f in folders]))
    print()
    print(trust_tables([f / CARD_NAME for f in folders]))


def _split(card: dict) -> str:
    """Which split a model was trained and tested on, and how many test images: `(per-image, 489)`."""
    folder = Path(card["data"]["splits"]["test"]["file"]).parent.name
    n = card.get("metrics", {}).get("test_images", "?")
    return f"({'grouped' if folder == 'grouped' else 'per-image'}, {n})"


def _rate(r: dict) -> str:
    return f"{r['rate']:.3f} ({r['ci95'][0]:.3f}–{r['ci95'][1]:.3f})" if r["n"] else "–"


def trust_tables(cards: list[Path]) -> str:
    """Served answers (gate, band, calibration) per artifact; subtypes and predictive values of the default."""
    rows = ["| served answers, the model's test split | refused by the gate | borderline | refused in all (95 % CI) "
            "| sensitivity on answered (95 % CI) | specificity on answered (95 % CI) | ECE of P(ALL) before → after "
            "| failed captures + photographs refused | BCCD fields / white-cell crops refused | OOD-score AUROC |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    default = None
    for path in cards:
        card = json.loads(path.read_text())
        trust = card.get("metrics", {}).get("trust")
        if not trust:
            continue
        if path.parent == DEFAULT_ARTIFACT.parent:
            default = card
        ood = trust["out_of_distribution"]
        bccd = " / ".join(f"{ood['sets'][k]['total']['rate']:.3f}" for k in ("bccd_fields", "bccd_white_cells")
                          if k in ood["sets"])
        for kind in ("int8", "float32"):
            t = trust[kind]
            r, a, c = t["refusal"], t["answered"], t["calibration"]
            extra = (f"{_rate(ood['summary']['failed_and_photographs_refused'])} | {bccd} | "
                     f"{ood['summary']['auroc_ood_score_failed_and_photographs']:.3f}") if kind == "int8" else " | | "
            rows.append(f"| `{card['name']}` {kind} {_split(card)} | {r['gate']['k']} ({r['gate']['rate']:.3f}) | "
                        f"{r['borderline']['k']} "
                        f"({r['borderline']['rate']:.3f}) | {r['total']['k']}: {_rate(r['total'])} | {_rate(a['sensitivity'])} "
                        f"| {_rate(a['specificity'])} | {c['ece_p_all_before']:.3f} → {c['ece_p_all_after']:.3f} | {extra} |")
    if default:
        t = default["metrics"]["trust"]["int8"]["answered"]
        rows += ["", f"`{default['name']}` int8 on the answered test images, per class (share answered correctly):", "",
                 "| class | correct / answered | rate (95 % CI) |", "|---|---|---|"]
        rows += [f"| {name} | {r['k']} / {r['n']} | {_rate(r)} |" for name, r in t["per_subtype_correct"].items()]
        rows += ["", "Predictive values of those decisions at a stated prevalence of ALL among the smears answered, "
                 "at the point estimates and at the lower 95 % bounds of specificity (PPV) and sensitivity (NPV):", "",
                 "| prevalence | PPV | NPV | PPV, specificity at its lower bound | NPV, sensitivity at its lower bound |",
                 "|---|---|---|---|---|"]
        sens, spec = t["sensitivity"], t["specificity"]
        rows += [f"| {prev} | {v['ppv']:.3f} | {v['npv']:.4f} | "
                 f"{predictive_values(sens['rate'], spec['ci95'][0], float(prev))[0]:.3f} | "
                 f"{predictive_values(sens['ci95'][0], spec['rate'], float(prev))[1]:.4f} |"
                 for prev, v in t["predictive_values"].items()]
    return "\n".join(rows)


def grouped_table(folders: list[Path]) -> str:
    """Grouped test split (int8, with Wilson intervals) and grouped CV, one row per binary model."""
    from model.protocol import with_ci
    from model.stains import VARIANTS

    rows = ["| model (grouped split) | test: balanced acc. | sensitivity (95 % CI) | specificity (95 % CI) | ROC AUC | "
            "Early pre-B sensitivity (95 % CI) | worst stain variant: bal. acc. / AUC | int8 = float32 | "
            "test images seen in training | grouped 5-fold CV: bal. acc. | CV AUC | CV worst variant bal. acc. |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for folder in folders:
        path = folder / "protocol_grouped_test.json"
        if not path.exists():
            continue
        r = json.loads(path.read_text())
        m = r["int8"]["colour"]["seed0"]
        worst = min(VARIANTS, key=lambda v: r["int8"][v]["seed0"]["balanced_accuracy"])
        w = r["int8"][worst]["seed0"]
        cv_path = folder / "cv_grouped.json"
        cv_cells = "– | – | –"
        if cv_path.exists():
            cv = json.loads(cv_path.read_text())
            cv_worst = min(VARIANTS, key=lambda v: cv[v]["balanced_accuracy"]["mean"])
            cv_cells = (f"{cv['colour']['balanced_accuracy']['mean']:.3f} ± {cv['colour']['balanced_accuracy']['sd']:.3f} "
                        f"({cv['folds']} folds) | {cv['colour']['roc_auc']['mean']:.4f} ± {cv['colour']['roc_auc']['sd']:.4f} | "
                        f"{cv[cv_worst]['balanced_accuracy']['mean']:.3f} ± {cv[cv_worst]['balanced_accuracy']['sd']:.3f} "
                        f"({cv_worst})")
        served = " (served default)" if folder == DEFAULT_ARTIFACT.parent else ""
        rows.append(f"| `{folder.name}` int8{served} | {m['balanced_accuracy']:.3f} | {with_ci(m, 'sensitivity')} | "
                    f"{with_ci(m, 'specificity')} | {m['roc_auc']:.4f} | {with_ci(m, 'early_sensitivity')} | "
                    f"{w['balanced_accuracy']:.3f} / {w['roc_auc']:.3f} ({worst}) | {r['int8_agreement']['all']:.4f} | "
                    f"{r['test_images_in_training']} of {r['images']} | {cv_cells} |")
    return "\n".join(rows)


def results_table(cards: list[Path]) -> str:
    def f(m: dict | None, key: str) -> str:
        return f"{m[key]:.3f}" if m and key in m else "–"

    def ci(m: dict | None, key: str) -> str:
        """A rate with its Wilson 95 % interval, from the counts."""
        if not m or key not in m:
            return "–"
        k, n = (m["tp"], m["tp"] + m["fn"]) if key == "sensitivity" else (m["tn"], m["tn"] + m["fp"])
        low, high = wilson(k, n)
        return f"{m[key]:.3f} ({low:.3f}–{high:.3f})"

    def cv(card: dict, mode: str, key: str) -> str:
        entry = card.get("metrics", {}).get("cv", {}).get(mode, {}).get(key)
        return f"{entry['mean']:.3f} ± {entry['sd']:.3f}" if entry else "–"

    rows = ["| model (its test split, plain threshold) | balanced acc. | sensitivity (95 % CI) | specificity (95 % CI) "
            "| ROC AUC | grayscale: "
            "bal. acc. / AUC | hue-shifted: bal. acc. / AUC | int8 = float32 | 5-fold CV bal. acc. | 5-fold CV AUC |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    baseline = None
    for path in cards:
        card = json.loads(path.read_text())
        m = card.get("metrics", {})
        baseline = m.get("baseline", baseline)
        for kind in ("int8", "float32"):
            c, g, h = (m.get(mode, {}).get(kind) for mode in ("colour", "grayscale", "hue_saturation"))
            agreement = f"{m['int8_agreement']['colour']:.3f}" if kind == "int8" and "int8_agreement" in m else ""
            cv_cells = (cv(card, "colour", "balanced_accuracy"), cv(card, "colour", "roc_auc")) if kind == "int8" \
                else ("", "")
            served = " (served default)" if path.parent == DEFAULT_ARTIFACT.parent and kind == "int8" else ""
            rows.append(f"| `{card['name']}` {kind}{served} {_split(card)} "
                        f"| {f(c, 'balanced_accuracy')} | {ci(c, 'sensitivity')} | {ci(c, 'specificity')} | "
                        f"{f(c, 'roc_auc')} | {f(g, 'balanced_accuracy')} / {f(g, 'roc_auc')} | "
                        f"{f(h, 'balanced_accuracy')} / {f(h, 'roc_auc')} | {agreement} | {cv_cells[0]} | {cv_cells[1]} |")
    if baseline:
        for name, label in (("colour_statistics", "15 colour statistics"), ("grayscale_statistics", "5 grey statistics")):
            b = baseline[name]
            rows.append(f"| logistic regression on {label} (no network) | {f(b, 'balanced_accuracy')} | "
                        f"{ci(b, 'sensitivity')} | {ci(b, 'specificity')} | {f(b, 'roc_auc')} | | | | | |")
    return "\n".join(rows)


def cmd_keygen(args: argparse.Namespace) -> None:
    from model.bundle import key_id, keygen, load_public_key

    key, pub = keygen(Path(args.out))
    print(f"private key {key} (keep it off the devices), public key {pub}, key id {key_id(load_public_key(pub))}")


def cmd_bundle(args: argparse.Namespace) -> None:
    from model.bundle import build_bundle, load_private_key, make_canary

    folder = _artifact_dir(args.artifact)
    canary = make_canary(folder, data.data_root(args.data), args.canary)
    content = build_bundle(folder, load_private_key(Path(args.key)), canary, tuple(args.variants))
    Path(args.out).write_bytes(content)
    print(f"{args.out}: {len(content)} bytes, sha256 {hashlib.sha256(content).hexdigest()}")


def cmd_verify_bundle(args: argparse.Namespace) -> None:
    from model.bundle import verify_bundle

    bundle = verify_bundle(Path(args.file).read_bytes(), [Path(k) for k in args.trusted], args.max_bytes)
    print(json.dumps({"name": bundle.name, "version": bundle.version, "sha256": bundle.sha256, "key": str(bundle.key),
                      "folder": bundle.folder_name, "members": bundle.manifest["members"],
                      "canary": bundle.manifest["canary"]["images"]}, indent=2))


def cmd_hias_entity(args: argparse.Namespace) -> None:
    from model.hias import model_entity

    if any("=" not in item for item in args.set):
        raise ValueError("--set wants ATTRIBUTE=TEXT")
    overrides = dict(item.split("=", 1) for item in args.set)
    print(json.dumps(model_entity(read_card(_artifact_dir(args.artifact)), args.variant, overrides), indent=2))


def _store(out_dir: Path, metrics: dict) -> None:
    """Merge metrics into a model card."""
    card_path = out_dir / CARD_NAME
    card = json.loads(card_path.read_text())
    card["metrics"] = with_intervals({**card.get("metrics", {}), **metrics})
    card_path.write_text(json.dumps(card, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data", help="data root (default: $ALLDS_DATA)")
    common.add_argument("--seed", type=int, default=42)
    p = sub.add_parser("split", parents=[common], help="write the per-image train/val/test lists (duplicates kept together)")
    p.set_defaults(func=cmd_split)
    p = sub.add_parser("twins", parents=[common], help="find field twins (translation-tolerant matching), write the list")
    p.add_argument("--scores", default="runs/twins/scores.npy", help="score matrix cache (computed when absent)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--plot", default="docs/field_twin_scores.png", help="PNG histogram of all pair scores")
    p.set_defaults(func=cmd_twins)
    p = sub.add_parser("grouped-split", parents=[common],
                       help="write the grouped split (duplicates, field twins, capture blocks) and its plot")
    p.add_argument("--plot", default="docs/capture_blocks.png", help="PNG of the capture-block analysis")
    p.set_defaults(func=cmd_grouped_split)
    p = sub.add_parser("cv", parents=[common], help="repeated grouped k-fold CV of a recipe (resumable per fold)")
    p.add_argument("--arch", required=True, help="training recipe (model.train.RECIPES)")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--epochs", type=int, help="override the recipe's budget (trials; results go elsewhere)")
    p.add_argument("--out", help="folder of the per-fold results (default runs/cv/RECIPE)")
    p.add_argument("--only", help="comma-separated repeat-fold ids to run, e.g. 0-0,0-1")
    p.add_argument("--classes", choices=["binary", "subtype"], default="binary",
                   help="head to train: ALL vs benign, or the 4 subtypes (screened on P(ALL) either way)")
    p.add_argument("--store", help="artifact folder to copy the summary into (cv_grouped.json)")
    p.add_argument("--trial", action="store_true",
                   help="one run on the grouped split instead, scored on its validation part (runs/trials/)")
    p.set_defaults(func=cmd_cv)
    p = sub.add_parser("protocol", parents=[common], help="score artifacts under the stain protocol")
    p.add_argument("--artifact", action="append", help="artifact folder (repeatable; default: the served model)")
    p.add_argument("--split", default="grouped", help="split sub-folder ('' = the per-image split)")
    p.add_argument("--part", default="test", choices=["train", "val", "test"])
    p.set_defaults(func=cmd_protocol)
    p = sub.add_parser("stains", help="compute the stain protocol's BCCD Lab statistics (committed file)")
    p.add_argument("--bccd", required=True, help="BCCD data set root (JPEGImages/ inside)")
    p.set_defaults(func=cmd_stains)
    p = sub.add_parser("train", parents=[common], help="train, export and evaluate one network")
    p.add_argument("--arch", required=True, help="training recipe (model.train.RECIPES)")
    p.add_argument("--split", default="", help="split sub-folder of data/<set>/ ('grouped'; default the per-image split)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--classes", choices=["binary", "subtype"], default="binary")
    p.add_argument("--out", help="artifact folder (default model/artifacts/NAME)")
    p.add_argument("--limit", type=int, help="at most N images per split (smoke runs)")
    p.add_argument("--trained", help="package this already trained .keras of the recipe (history.json beside it) "
                                     "instead of fitting: a run whose export failed")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("export", parents=[common], help="re-export an artifact folder's .tflite files from its .keras")
    p.add_argument("--artifact", help="artifact file or folder (default: the served model)")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("calibrate", parents=[common], help="fit the input gate, calibration and band of an artifact")
    p.add_argument("--artifact", help="artifact file or folder (default: the served model)")
    p.set_defaults(func=cmd_calibrate)
    p = sub.add_parser("evaluate", parents=[common], help="score artifacts on the held-out split, or --cv")
    p.add_argument("--artifact", help="artifact file or folder (default: the served model)")
    p.add_argument("--bccd", help="BCCD root for the near-distribution sets (default: $ALLDS_BCCD or ../shared/data/BCCD)")
    p.add_argument("--cv", type=int, help="k-fold cross-validation of --arch instead")
    p.add_argument("--arch", choices=["allds2020", "cellnet"], default="cellnet")
    p.add_argument("--epochs", type=int)
    p.set_defaults(func=cmd_evaluate)
    p = sub.add_parser("classify", parents=[common], help="classify images locally, one line each")
    p.add_argument("--artifact", help="artifact file (default: the served model)")
    p.add_argument("--split", choices=["train", "val", "test", "all"], default="test")
    p.set_defaults(func=cmd_classify)
    p = sub.add_parser("baseline", parents=[common], help="colour-statistics logistic regression")
    p.set_defaults(func=cmd_baseline)
    p = sub.add_parser("results", help="the README's results table from the model cards")
    p.set_defaults(func=cmd_results)
    p = sub.add_parser("keygen", help="write an Ed25519 signing key pair (signing.key, signing.pub)")
    p.add_argument("--out", required=True, help="folder for the key pair")
    p.set_defaults(func=cmd_keygen)
    p = sub.add_parser("bundle", parents=[common], help="pack and sign a model folder with a canary set")
    p.add_argument("artifact", help="model folder (or an artifact in it)")
    p.add_argument("--key", required=True, help="signing.key from keygen")
    p.add_argument("--out", required=True, help="bundle file to write")
    p.add_argument("--canary", type=int, default=8, help="held-out test images in the canary set (default 8)")
    p.add_argument("--variants", nargs="+", default=["int8", "float32"], choices=["int8", "float32", "keras"],
                   help="artifacts the bundle carries (default: int8 float32, what a Pi serves)")
    p.set_defaults(func=cmd_bundle)
    p = sub.add_parser("verify-bundle", help="verify a bundle against trusted public keys and print its manifest")
    p.add_argument("file")
    p.add_argument("--trusted", action="append", required=True, help="a trusted signing.pub (repeatable)")
    p.add_argument("--max-bytes", type=int, default=256 << 20)
    p.set_defaults(func=cmd_verify_bundle)
    p = sub.add_parser("hias-entity", help="the HIAS AI Model entity (JSON) of a model folder from its card")
    p.add_argument("artifact", nargs="?", help="model folder (default: the served model)")
    p.add_argument("--variant", choices=["int8", "float32"], default="int8", help="artifact whose figures to report")
    p.add_argument("--set", action="append", default=[], metavar="ATTRIBUTE=TEXT",
                   help="fill a descriptive attribute the card does not hold (e.g. paperDoi=10.1000/x; repeatable)")
    p.set_defaults(func=cmd_hias_entity)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        args.func(args)
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
