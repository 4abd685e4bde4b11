"""Both architectures: shapes, parameter counts and compute budget."""

from __future__ import annotations

import numpy as np

from model.export import flops
from model.networks import allds2020, cellnet


def test_allds2020_is_the_paper_network():
    model = allds2020()
    assert model.count_params() == 174_812
    assert model.input_shape == (None, 100, 100, 3) and model.output_shape == (None, 2)
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds == ["ZeroPadding2D", "Conv2D", "ZeroPadding2D", "Conv2D", "MaxPooling2D", "Flatten", "Dense",
                     "Softmax"]
    assert round(flops(model) / 1e9, 2) == 0.5


def test_cellnet_fits_the_pi_budget():
    model = cellnet()
    assert model.count_params() <= 1_000_000
    assert flops(model) <= 0.6e9
    out = model(np.random.default_rng(0).random((3, 128, 128, 3), dtype=np.float32), training=False).numpy()
    assert out.shape == (3, 2) and np.allclose(out.sum(1), 1, atol=1e-5)
    assert cellnet(n_classes=4).output_shape == (None, 4)


def test_cellnet_input_variants_fit_the_pi_budget_and_do_what_they_say():
    from model.networks import ARCHITECTURES

    rng = np.random.default_rng(1)
    x = rng.random((2, 128, 128, 3), dtype=np.float32)
    for name in ("cellnet_value", "cellnet_standardised"):
        model = ARCHITECTURES[name]()
        assert model.count_params() <= 1_000_000 and flops(model) <= 0.6e9, name
    value = ARCHITECTURES["cellnet_value"]()
    swapped = x[..., ::-1].copy()  # same max(R, G, B), other colours
    np.testing.assert_allclose(value(x, training=False), value(swapped, training=False), atol=1e-6)
    standardised = ARCHITECTURES["cellnet_standardised"]()
    relit = 0.6 * x + np.array([0.1, 0.05, 0.2], np.float32)  # each channel's level and contrast changed
    np.testing.assert_allclose(standardised(x, training=False), standardised(relit, training=False), atol=1e-4)


def test_features_output_of_a_branching_input_keeps_the_network_it_taps():
    """`cellnet_standardised` computes its input statistics in side branches (ops, not layers): the
    second output must tap the trained graph itself, and its probabilities stay the network's own."""
    from model.export import with_features
    from model.networks import ARCHITECTURES

    net = ARCHITECTURES["cellnet_standardised"](n_classes=2)
    tapped, widths = with_features(net)
    x = np.random.default_rng(0).random((3, 128, 128, 3), dtype=np.float32)
    out = tapped(x)
    assert widths == [32, 64, 112, 160, 224] and out["features"].shape == (3, sum(widths))
    np.testing.assert_allclose(out["probabilities"].numpy(), net(x).numpy(), atol=1e-6)


def _ops_and_input_types(blob: bytes) -> list[tuple[str, str]]:
    """(op name, dtype of its first input) of each op of a LiteRT flatbuffer."""
    from tensorflow.lite.python.interpreter import Interpreter  # TensorFlow is loaded: not LiteRT's wrapper

    interp = Interpreter(model_content=blob)
    dtypes = {t["index"]: np.dtype(t["dtype"]).name for t in interp.get_tensor_details()}
    return [(op["op_name"], dtypes.get(op["inputs"][0], "")) for op in interp._get_ops_details()]


def test_int8_export_keeps_a_per_image_standardisation_in_float():
    """A low-contrast image spans a few int8 steps of the centred input: quantised, the standardisation
    amplifies those steps into the network's input (a trained model's P(ALL) moved by up to 0.93).
    Its ops stay float32 in the int8 file, and so does the output softmax (in int8 a confident answer
    saturates at 255/256, and half the occlusion maps of the served model came out blank); every
    convolution is still int8."""
    from model.export import to_tflite, with_features
    from model.networks import ARCHITECTURES

    rng = np.random.default_rng(0)
    served, _ = with_features(ARCHITECTURES["cellnet_standardised"](n_classes=2))
    pattern = rng.random((24, 128, 128, 3), dtype=np.float32)
    contrast = np.array([0.02, 0.3, 1.0], np.float32)[np.arange(24) % 3, None, None, None]
    images = (0.5 + contrast * (pattern - 0.5)).astype(np.float32)  # low, medium and full contrast
    ops = _ops_and_input_types(to_tflite(served, images))
    standardisation = [t for name, t in ops if name in ("RSQRT", "AVERAGE_POOL_2D", "SUB")]
    assert standardisation and set(standardisation) == {"float32"}, ops
    assert {t for name, t in ops if name == "SOFTMAX"} == {"float32"}, ops
    assert {t for name, t in ops if name == "CONV_2D"} == {"int8"}, ops
    assert {t for name, t in ops if name == "FULLY_CONNECTED"} == {"int8"}, ops
    plain = _ops_and_input_types(to_tflite(with_features(ARCHITECTURES["cellnet"](n_classes=2))[0], images))
    assert {t for name, t in plain if name not in ("QUANTIZE",)} == {"int8"}, plain  # unchanged: all int8
