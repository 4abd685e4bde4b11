"""Training: leakage-free split -> on-the-fly augmentation -> fit -> operating point -> export."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from sklearn.metrics import roc_auc_score
from sklearn.utils.class_weight import compute_class_weight
from tqdm.keras import TqdmCallback

from model import data, stains
from model.augment import ColourAugmentation, RandomLabStatistics, build_augmenter
from model.calibration import choose_threshold
from model.classifier import file_sha256
from model.export import export, flops, library_versions, write_card
from model.networks import ARCHITECTURES, INPUT_SIZES

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
MIN_SENSITIVITY = 0.98


@dataclass(frozen=True)
class Recipe:
    """How a network is trained; `architecture` defaults to the recipe's own name."""

    learning_rate: float
    weight_decay: float
    epochs: int
    patience: int
    colour: ColourAugmentation | None
    batch_size: int = 32
    architecture: str = ""


RECIPES = {
    # The paper's network with the paper's augmentation set. In 6-epoch trials Adam at 1e-3 and
    # 5e-4 left the loss at chance (0.69), with and without geometric augmentation; 1e-4 learns.
    "allds2020": Recipe(learning_rate=1e-4, weight_decay=0.0, epochs=60, patience=20, colour=None),
    # Ours: in trials, brightness/contrast jitter stalled training; hue/saturation jitter plus random
    # grayscale learn, slowly, hence 60 epochs of cosine decay.
    "cellnet": Recipe(learning_rate=1e-3, weight_decay=1e-4, epochs=60, patience=20, colour=ColourAugmentation()),
    # Stain jitter inside the protocol's ranges (docs/stain_protocol.md): any hue, saturation 0.3-1.7,
    # grayscale, and per-channel optical density x0.7-1.3 (more or less stain).
    # Half the images also get random Lab statistics of the training set (RandStainNA).
    "cellnet_stain": Recipe(learning_rate=1e-3, weight_decay=1e-4, epochs=60, patience=20, architecture="cellnet",
                            colour=ColourAugmentation(hue_deg=180.0, saturation=(0.3, 1.7), optical_density=0.3,
                                                      lab_statistics=0.5, grayscale_first=True)),
    # Blind to each channel's global level and contrast by construction, with cellnet_stain's jitter.
    "cellnet_standardised": Recipe(learning_rate=1e-3, weight_decay=1e-4, epochs=60, patience=20,
                                   colour=ColourAugmentation(hue_deg=180.0, saturation=(0.3, 1.7), optical_density=0.3,
                                                             lab_statistics=0.5, grayscale_first=True)),
    # Hue-blind by construction: the network sees max(R, G, B); optical density, Lab statistics, grayscale.
    "cellnet_value": Recipe(learning_rate=1e-3, weight_decay=1e-4, epochs=60, patience=20,
                            colour=ColourAugmentation(hue_deg=0.0, saturation=(1.0, 1.0), optical_density=0.3,
                                                      lab_statistics=0.5, grayscale_first=True)),
}


def architecture(recipe: str) -> str:
    """The network a recipe trains."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r} (one of {', '.join(RECIPES)})")
    return RECIPES[recipe].architecture or recipe


def class_names(classes: str) -> list[str]:
    """Output classes for `binary` or `subtype` training."""
    return list(data.BINARY_CLASSES) if classes == "binary" else list(data.ARIA_CLASSES)


def run_name(recipe: str, classes: str) -> str:
    """What a recipe trained with `classes` is called (artifact, CV and trial folders): `cellnet_subtype`."""
    return recipe if classes == "binary" else f"{recipe}_{classes}"


def targets(samples: list[data.Sample], classes: str) -> np.ndarray:
    """Integer class index per sample."""
    if classes == "binary":
        return np.array([s.label for s in samples])
    return np.array([data.ARIA_CLASSES.index(s.subtype) for s in samples])


def class_probabilities(model: keras.Model, images: np.ndarray, batch_size: int = 128) -> np.ndarray:
    """Softmax outputs of a Keras model, in inference mode, batch by batch."""
    return np.concatenate([model(images[i:i + batch_size], training=False).numpy()
                           for i in range(0, len(images), batch_size)])


def p_all(model: keras.Model, images: np.ndarray) -> np.ndarray:
    """P(ALL) = 1 - P(Benign) (class 0 in both class lists) of a Keras model, in inference mode."""
    return 1.0 - class_probabilities(model, images)[:, 0]


class ValidationAUC(keras.callbacks.Callback):
    """Adds `val_auc`, the ROC AUC of P(ALL) on the validation images, to each epoch's logs.

    Validation accuracy and loss swing while the network learns colour-invariant features (the
    clean validation images sit at one end of the augmented training distribution); the ranking
    that the operating point is chosen from is what early stopping should watch.
    """

    def __init__(self, x_val: np.ndarray, y_val_binary: np.ndarray) -> None:
        super().__init__()
        self.x_val, self.y_val = x_val, y_val_binary

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is not None:
            logs["val_auc"] = float(roc_auc_score(self.y_val, p_all(self.model, self.x_val)))


def fit(recipe_name: str, x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
        n_classes: int, seed: int, epochs: int | None = None) -> tuple[keras.Model, dict]:
    """Train one network from scratch; returns the best-on-validation model and its history."""
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    model = ARCHITECTURES[architecture(recipe_name)](n_classes=n_classes)
    recipe = RECIPES[recipe_name]
    epochs = epochs or recipe.epochs
    steps = int(np.ceil(len(x_train) / recipe.batch_size)) * epochs
    schedule = keras.optimizers.schedules.CosineDecay(recipe.learning_rate, decay_steps=max(steps, 1))
    optimizer = (keras.optimizers.AdamW(schedule, weight_decay=recipe.weight_decay) if recipe.weight_decay
                 else keras.optimizers.Adam(schedule))
    model.compile(optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    augmenter = build_augmenter(seed, recipe.colour)
    train_ds = (tf.data.Dataset.from_tensor_slices((x_train, y_train))
                .shuffle(len(x_train), seed=seed, reshuffle_each_iteration=True)
                .batch(recipe.batch_size))
    if recipe.colour and recipe.colour.lab_statistics:
        lab = RandomLabStatistics(x_train, recipe.colour.lab_statistics, seed)
        train_ds = train_ds.map(lambda x, y: (tf.ensure_shape(tf.numpy_function(lab, [x], tf.float32), x.shape), y))
    train_ds = train_ds.map(lambda x, y: (augmenter(x, training=True), y)).prefetch(2)
    weights = compute_class_weight("balanced", classes=np.arange(n_classes), y=y_train)
    x_watch, y_watch = x_val, (y_val != 0).astype(int)
    if recipe.colour and recipe.colour.hue_deg >= 180.0:
        # Trained on every hue: pick the epoch on validation images as they are and with their hue
        # turned at random (seeded), not on the untouched ones alone, where the AUC saturates early.
        x_watch = np.concatenate([x_val, stains.apply_variant(x_val, "hue_full", seed)])
        y_watch = np.concatenate([y_watch, y_watch])
    history = model.fit(
        train_ds, validation_data=(x_val, y_val), epochs=epochs, verbose=0,
        class_weight=dict(enumerate(weights.tolist())),
        callbacks=[ValidationAUC(x_watch, y_watch),
                   keras.callbacks.EarlyStopping("val_auc", mode="max", patience=recipe.patience,
                                                 restore_best_weights=True),
                   TqdmCallback(verbose=1)],
    )
    return model, {k: [float(v) for v in vs] for k, vs in history.history.items()}


def train(root: Path, arch: str, epochs: int | None, seed: int, classes: str, out_dir: Path | None = None,
          limit: int | None = None, split: str = "", trained: Path | None = None) -> Path:
    """Train recipe `arch`, pick the operating point on validation, export the artifacts and write the card.

    `limit` keeps a seeded random subset of at most that many images per split (smoke runs);
    `split` names a sub-folder of the data set's split lists (`grouped`), "" the per-image split;
    `trained` is a `.keras` file this recipe already trained on that split (with its `history.json`
    beside it): it is packaged as if it had just been fitted, so an export that failed needs no retraining.
    """
    dataset, samples = data.load_dataset(root)
    splits = data.load_splits(dataset, samples, seed, split)
    if limit:
        rng = np.random.default_rng(seed)
        splits = {k: [v[i] for i in sorted(rng.permutation(len(v))[:limit])] for k, v in splits.items()}
    size = INPUT_SIZES[architecture(arch)]
    x = {k: data.load_images(root, v, size) for k, v in splits.items() if k != "test"}
    y = {k: targets(v, classes) for k, v in splits.items()}
    names = class_names(classes)
    if trained:
        model = keras.models.load_model(trained, compile=False)
        history = json.loads((trained.parent / "history.json").read_text())
    else:
        model, history = fit(arch, x["train"], y["train"], x["val"], y["val"], len(names), seed, epochs)
    threshold = choose_threshold(np.array([s.label for s in splits["val"]]), p_all(model, x["val"]), MIN_SENSITIVITY)
    name = run_name(arch, classes)
    out_dir = out_dir or ARTIFACTS / name
    model.name = name  # artifact file names follow the model name
    rng = np.random.default_rng(seed)
    representative = x["train"][rng.choice(len(x["train"]), min(200, len(x["train"])), replace=False)]
    paths, segments = export(model, out_dir, representative)
    (out_dir / "history.json").write_text(json.dumps(history) + "\n")
    split_files = {k: data.split_dir(dataset) / split / f"{k}.txt" for k in ("train", "val", "test")}
    card = {
        "name": name,
        "version": dt.date.today().isoformat(),
        "architecture": architecture(arch),
        "recipe": arch,
        "classes": names,
        "positive_classes": [c for c in names if c != "Benign"],
        "input_size": size,
        "feature_segments": segments,
        "preprocessing": {"function": "model.preprocess.preprocess", "colour": "RGB",
                          "resize": "cv2.INTER_AREA", "scale": "1/255 to float32 [0, 1]",
                          "reduced_decode": "IMREAD_REDUCED_COLOR_{2,4,8} while the short side stays >= input"},
        "threshold": threshold,
        "operating_point": f"highest P(ALL) threshold of the Keras model with validation sensitivity >= {MIN_SENSITIVITY} "
                           "(`python -m model calibrate` replaces it with the int8 artifact's own)",
        "parameters": int(model.count_params()),
        "gflops": round(flops(model) / 1e9, 4),
        "data": {"dataset": dataset, "root": root.name, "limit_per_split": limit,
                 "splits": {k: {"file": str(p.relative_to(data.REPO)), "images": len(splits[k]),
                                "sha256": file_sha256(p)} for k, p in split_files.items() if p.exists()}},
        "training": {"command": "python -m model " + shlex.join(sys.argv[1:]), "seed": seed,
                     "recipe": dataclasses.asdict(RECIPES[arch]), "epochs_run": len(history["loss"]),
                     "best_val_auc": max(history["val_auc"]),
                     "epoch_selection": "best validation ROC AUC of P(ALL)" + (
                         ", validation images as they are and with a random hue turn"
                         if RECIPES[arch].colour and RECIPES[arch].colour.hue_deg >= 180.0 else ""),
                     "libraries": library_versions()},
    }
    write_card(out_dir, card, paths)
    return out_dir

