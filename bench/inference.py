"""Per-image inference time of each shipped `.tflite` under LiteRT (XNNPACK), batch 1 and 8.

    python bench/inference.py

Prints medians over repeated calls on a real preprocessed image; no TensorFlow is imported.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from model.classifier import Classifier  # noqa: E402
from model.preprocess import preprocess_file  # noqa: E402


def median_ms(classify, batch: np.ndarray, repeats: int = 200) -> float:
    """Median milliseconds of one `classify(batch)` call after a warm-up."""
    for _ in range(20):
        classify(batch)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        classify(batch)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    data = Path(os.environ.get("ALLDS_DATA", REPO.parent / "shared/data/ALL_Aria2021"))
    print("| artifact | threads | batch 1 ms/image | batch 8 ms/image |")
    print("|---|---|---|---|")
    for path in sorted((REPO / "model/artifacts").glob("*/*.tflite")):
        for threads in (1, 2):
            clf = Classifier.load(path, threads)
            x = preprocess_file(data / "Benign/WBC-Benign-001.jpg", clf.input_size)[None]
            one = median_ms(clf.classify, x)
            eight = median_ms(clf.classify, np.repeat(x, 8, axis=0)) / 8
            print(f"| {path.relative_to(REPO)} | {threads} | {one:.2f} | {eight:.2f} |")


if __name__ == "__main__":
    main()
