"""The one preprocessing path: range, parity, reduced decode, refusals, and a fuzz test."""

from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model import data
from model.preprocess import ImageError, ImageLimits, preprocess, preprocess_file, reduction_factor

SAMPLE = "Benign/WBC-Benign-001.jpg"


def encode(image: np.ndarray, ext: str = ".png", params: list[int] | None = None) -> bytes:
    ok, buf = cv2.imencode(ext, image, params or [])
    assert ok
    return buf.tobytes()


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height (a decompression bomb's shape)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def jpeg_declaring(jpeg: bytes, width: int, height: int) -> bytes:
    """A real JPEG with its SOF0 frame size rewritten."""
    sof = jpeg.index(b"\xff\xc0")
    return jpeg[:sof + 5] + struct.pack(">HH", height, width) + jpeg[sof + 9:]


def test_range_shape_and_dtype(data_root):
    x = preprocess_file(data_root / SAMPLE, 128)
    assert x.shape == (128, 128, 3) and x.dtype == np.float32
    assert 0.0 <= x.min() < 0.5 < x.max() <= 1.0


def test_rgb_order_and_area_interpolation(data_root):
    raw = (data_root / SAMPLE).read_bytes()
    bgr = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_REDUCED_COLOR_2)
    expected = cv2.resize(bgr[..., ::-1], (100, 100), interpolation=cv2.INTER_AREA).astype(np.float32) / 255
    np.testing.assert_array_equal(preprocess(raw, 100), expected)


def test_training_and_serving_paths_give_the_same_tensor(data_root):
    samples = [s for s in data.load_aria(data_root) if s.path in (SAMPLE, "Pro/WBC-Malignant-Pro-089.jpg")]
    trained = data.load_images(data_root, samples, 128)
    for sample, tensor in zip(samples, trained, strict=True):
        served = preprocess((data_root / sample.path).read_bytes(), 128)
        np.testing.assert_array_equal(served, tensor)


def test_reduced_decode_of_a_large_field(data_root):
    cell = cv2.imread(str(data_root / SAMPLE))
    field = cv2.resize(cell, (2592, 1944), interpolation=cv2.INTER_CUBIC)
    jpeg = encode(field, ".jpg", [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert reduction_factor(2592, 1944, 128) == 8 and reduction_factor(224, 224, 100) == 2
    assert reduction_factor(224, 224, 128) == 1
    fast = preprocess(jpeg, 128)
    full = cv2.resize(cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)[..., ::-1], (128, 128),
                      interpolation=cv2.INTER_AREA).astype(np.float32) / 255
    assert fast.shape == (128, 128, 3)
    assert np.abs(fast - full).mean() < 0.02


@pytest.mark.parametrize("payload, code", [
    (b"", "empty_payload"),
    (b"definitely not an image", "not_an_image"),
    (png_declaring(60000, 60000), "image_too_large"),
    (encode(np.zeros((1, 1, 3), np.uint8)), "image_too_small"),
    (encode(np.zeros((10, 4000, 3), np.uint8)), "bad_aspect_ratio"),
])
def test_refusals(payload, code):
    with pytest.raises(ImageError) as info:
        preprocess(payload, 128)
    assert info.value.code == code and info.value.message


def test_jpeg_bomb_and_truncation_are_refused(data_root):
    jpeg = (data_root / SAMPLE).read_bytes()
    with pytest.raises(ImageError) as info:
        preprocess(jpeg_declaring(jpeg, 60000, 60000), 128)
    assert info.value.code == "image_too_large"
    with pytest.raises(ImageError) as info:
        preprocess(jpeg[: len(jpeg) // 2], 128)
    assert info.value.code == "not_an_image"


def test_jpeg_with_data_after_its_end_is_served(data_root):
    """Phone "motion photos" append a video after the JPEG's end marker; decoders read the image."""
    jpeg = (data_root / SAMPLE).read_bytes()
    tail = np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
    assert b"\xff\xd9" in tail  # the appended data may even hold the end marker's bytes
    np.testing.assert_array_equal(preprocess(jpeg + tail, 128), preprocess(jpeg, 128))


def test_truncated_jpeg_is_refused_even_with_a_complete_thumbnail_inside(data_root):
    jpeg = (data_root / SAMPLE).read_bytes()
    thumbnail = encode(np.full((16, 16, 3), 90, np.uint8), ".jpg")
    app1 = b"Exif\x00\x00" + thumbnail
    with_thumbnail = jpeg[:2] + b"\xff\xe1" + (len(app1) + 2).to_bytes(2, "big") + app1 + jpeg[2:]
    assert preprocess(with_thumbnail, 128).shape == (128, 128, 3)
    with pytest.raises(ImageError) as info:
        preprocess(with_thumbnail[: len(with_thumbnail) * 2 // 3], 128)
    assert info.value.code == "not_an_image"


@pytest.mark.parametrize("image", [
    np.full((64, 64), 128, np.uint8),  # 1 channel
    np.full((64, 64, 4), 200, np.uint8),  # alpha
    np.full((64, 64, 3), 40000, np.uint16),  # 16 bit
])
def test_other_channel_counts_and_depths_are_served_as_rgb(image):
    x = preprocess(encode(image), 128)
    assert x.shape == (128, 128, 3) and 0 <= x.min() <= x.max() <= 1


def test_pixel_limit_is_configurable(data_root):
    with pytest.raises(ImageError):
        preprocess((data_root / SAMPLE).read_bytes(), 128, ImageLimits(max_pixels=224 * 224 - 1))


@pytest.fixture(scope="module")
def seeds(data_root) -> list[bytes]:
    cell = cv2.imread(str(data_root / SAMPLE))
    return [(data_root / SAMPLE).read_bytes(), encode(cell, ".png"), encode(cell, ".bmp"),
            encode(cv2.resize(cell, (40, 30)), ".tiff")]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(choice=st.integers(0, 3), edits=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), max_size=12),
       cut=st.floats(0.05, 1.0), junk=st.binary(max_size=64))
def test_fuzz_decode_returns_a_tensor_or_our_error(seeds, choice, edits, cut, junk):
    data_bytes = bytearray(seeds[choice])
    for where, value in edits:
        data_bytes[int(where * (len(data_bytes) - 1))] = value
    payload = bytes(data_bytes[: max(1, int(len(data_bytes) * cut))]) + junk
    try:
        x = preprocess(payload, 64)
    except ImageError as exc:
        assert exc.code in {"empty_payload", "not_an_image", "image_too_large", "image_too_small",
                            "bad_aspect_ratio"}
        return
    assert x.shape == (64, 64, 3) and x.dtype == np.float32 and np.isfinite(x).all()


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2048))
def test_fuzz_random_bytes(payload):
    try:
        x = preprocess(payload, 64)
    except ImageError:
        return
    assert x.shape == (64, 64, 3)
