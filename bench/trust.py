"""Serving cost of the decision policy (input gate + calibration + band) against plain threshold
decisions, measured in the same run, and the p50 cost of an explanation.

    python bench/trust.py [--repeats 300]

Per image, from the image bytes as the agent receives them: `preprocess` -> `classify` -> `diagnose`
(baseline, the agent's path before the gate) against `preprocess` -> `assess` (with the JPEG quality
read from the header), at batch 1 and 8, and the LiteRT-only part of each. Medians over interleaved
repeats; no TensorFlow is imported.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from model.classifier import DEFAULT_ARTIFACT, Classifier  # noqa: E402
from model.explain import explain  # noqa: E402
from model.preprocess import jpeg_quality, preprocess  # noqa: E402


def interleaved_medians(calls: dict, repeats: int) -> dict[str, float]:
    """Median ms of each call, the calls taking turns so that machine noise hits them alike."""
    for call in calls.values():
        for _ in range(10):
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append((time.perf_counter() - start) * 1000)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--artifact", default=str(DEFAULT_ARTIFACT))
    args = parser.parse_args()
    data = Path(os.environ.get("ALLDS_DATA", REPO.parent / "shared/data/ALL_Aria2021"))
    clf = Classifier.load(args.artifact, threads=2)
    payloads = [p.read_bytes() for p in sorted((data / "Pre").glob("*.jpg"))[:8]]
    print(f"{Path(args.artifact).name}, {clf.input_size} px, medians of {args.repeats} interleaved repeats (ms per image)\n")
    print("| batch | plain: preprocess + classify + threshold | served: preprocess + assess | ratio "
          "| LiteRT only: classify | assess on tensors | ratio |")
    print("|---|---|---|---|---|---|---|")
    for n in (1, 8):
        batch_bytes = payloads[:n]
        tensors = np.stack([preprocess(b, clf.input_size) for b in batch_bytes])

        def plain(batch_bytes=batch_bytes):
            x = np.stack([preprocess(b, clf.input_size) for b in batch_bytes])
            return clf.p_all(clf.classify(x)) >= clf.threshold  # what serving did before the policy

        def served(batch_bytes=batch_bytes):
            x = np.stack([preprocess(b, clf.input_size) for b in batch_bytes])
            return clf.assess(x, [jpeg_quality(b) for b in batch_bytes])

        m = interleaved_medians({"plain": plain, "served": served,
                                 "classify": lambda t=tensors: clf.p_all(clf.classify(t)) >= clf.threshold,
                                 "assess": lambda t=tensors: clf.assess(t)}, args.repeats)
        print(f"| {n} | {m['plain'] / n:.3f} | {m['served'] / n:.3f} | {m['served'] / m['plain']:.3f} "
              f"| {m['classify'] / n:.3f} | {m['assess'] / n:.3f} | {m['assess'] / m['classify']:.3f} |")
    tensor = preprocess(payloads[0], clf.input_size)
    costs = [explain(clf, tensor, (224, 224)).ms for _ in range(max(args.repeats // 5, 20))]
    print(f"\nexplain (one image, output 224x224): p50 {statistics.median(costs):.1f} ms, "
          f"p90 {np.percentile(costs, 90):.1f} ms over {len(costs)} calls")


if __name__ == "__main__":
    main()
