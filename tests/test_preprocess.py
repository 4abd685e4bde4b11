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


def png(width: int, height: int, depth: int, colour: int, rows: bytes, *chunks: tuple[bytes, bytes],
        after: tuple[tuple[bytes, bytes], ...] = ()) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + b"".join(chunk(*c) for c in chunks)
            + chunk(b"IDAT", zlib.compress(rows)) + b"".join(chunk(*c) for c in after) + chunk(b"IEND", b""))


def png_declaring(width: int, height: int, frames: int = 1) -> bytes:
    """A tiny PNG whose header declares width x height (a decompression bomb's shape), and `frames` frames."""
    animation = ((b"acTL", struct.pack(">II", frames, 0)),) if frames > 1 else ()
    return png(width, height, 8, 2, b"\0" * 64, *animation)


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
    (png_declaring(60000, 60000, frames=2), "image_too_large"),  # Pillow would decode frame 1 to find frame 2
    (encode(np.zeros((1, 1, 3), np.uint8)), "image_too_small"),
    (encode(np.zeros((48, 4000, 3), np.uint8)), "bad_aspect_ratio"),
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
    tail = np.random.default_rng(0).integers(0, 256, 6_000_000, dtype=np.uint8).tobytes()
    assert b"\xff\xd9" in tail and tail.count(b"\xff\xda") > 64  # end and scan markers' bytes, by chance
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


@pytest.mark.parametrize("kept", [0.3, 0.9, 0.97])
@pytest.mark.parametrize("side", [224, 2000])  # decoded whole, and reduced to an eighth
def test_a_jpeg_cut_short_and_given_an_end_marker_is_refused(data_root, kept, side):
    """libjpeg decodes a scan that stops early and fills the blocks it did not get with mid-grey; the end marker
    a transfer or a hostile sender adds back hides the cut from the end-of-image check. Two benign smears missing
    15 of 224 rows were answered Negative."""
    cell = cv2.resize(cv2.imread(str(data_root / SAMPLE)), (side, side * 4 // 5), interpolation=cv2.INTER_CUBIC)
    jpeg = encode(cell, ".jpg", [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert preprocess(jpeg, 128).shape == (128, 128, 3)
    with pytest.raises(ImageError) as info:
        preprocess(jpeg[: int(len(jpeg) * kept)] + b"\xff\xd9", 128)
    assert info.value.code == "not_an_image" and "grey" in info.value.message


def test_mid_grey_in_a_whole_jpeg_is_not_taken_for_a_cut():
    """A uniformly grey frame is the gate's to refuse (blank); grey at the top of a frame is image content."""
    assert preprocess(encode(np.full((64, 64, 3), 128, np.uint8), ".jpg"), 64).shape == (64, 64, 3)
    top_grey = np.full((64, 64, 3), 200, np.uint8)
    top_grey[:32] = 128
    assert preprocess(encode(top_grey, ".jpg"), 64).shape == (64, 64, 3)


@pytest.mark.parametrize("image", [
    np.full((64, 64), 128, np.uint8),  # 1 channel
    np.full((64, 64, 4), 255, np.uint8),  # opaque alpha
    np.full((64, 64, 3), 40000, np.uint16),  # 16 bit
])
def test_other_channel_counts_and_depths_are_served_as_rgb(image):
    x = preprocess(encode(image), 128)
    assert x.shape == (128, 128, 3) and 0 <= x.min() <= x.max() <= 1


def tiled_tiff(width: int, height: int, tile: int) -> bytes:
    """An RGB TIFF whose header declares width x height, holding one deflate tile of tile x tile px."""
    pixels = np.full((tile, tile, 3), (200, 120, 160), np.uint8)
    pixels.reshape(-1)[::251] = np.arange(pixels.size // 251 + 1, dtype=np.uint64)[:len(pixels.reshape(-1)[::251])] % 256
    body = zlib.compress(pixels.tobytes(), 1)
    tags = [(256, 4, width), (257, 4, height), (258, 3, None), (259, 3, 8), (262, 3, 2), (277, 3, 3), (284, 3, 1),
            (322, 4, tile), (323, 4, tile), (324, 4, None), (325, 4, len(body))]
    bits_at = 8 + 2 + 12 * len(tags) + 4  # after the header and the one IFD: BitsPerSample (8, 8, 8), then the tile
    out = b"II*\x00" + struct.pack("<IH", 8, len(tags))
    for tag, kind, value in tags:
        value = {258: bits_at, 324: bits_at + 6}.get(tag, value)
        count = 3 if tag == 258 else 1
        out += struct.pack("<HHI", tag, kind, count) + struct.pack("<HH" if kind == 3 and count == 1 else "<I",
                                                                    *((value, 0) if kind == 3 and count == 1 else (value,)))
    return out + struct.pack("<IHHH", 0, 8, 8, 8) + body


def test_a_tiff_whose_tile_dwarfs_the_image_is_refused_before_decoding():
    """A 2 MB TIFF of 100 x 100 px with one 8000 x 8000 tile: the pixel limit reads 10,000 px from the header,
    while the decoder allocates the tile (measured: 298 MB peak for the process, 52 MB for a normal TIFF)."""
    with pytest.raises(ImageError) as info:
        preprocess(tiled_tiff(100, 100, 8000), 128)
    assert info.value.code == "image_too_large" and "tile" in info.value.message
    assert preprocess(tiled_tiff(200, 200, 256), 128).shape == (128, 128, 3)  # a tile a bit larger than the image


def progressive_jpeg(side: int = 1024) -> bytes:
    """A valid progressive JPEG of grey `side` x `side` px in 1 + 3 x 63 scans: a DC scan, then one scan per
    colour component and AC coefficient, each a single end-of-band run over all blocks (the cost of a
    progressive decode grows with its scans; a few kB can hold thousands)."""
    blocks = (side // 8) ** 2
    assert blocks == 2 ** 14  # one EOB14 run (code '0', 14 extra bits 0) covers a whole component

    def segment(marker: int, body: bytes) -> bytes:
        return bytes([0xFF, marker]) + struct.pack(">H", len(body) + 2) + body

    def scan(components: list[int], start: int, end: int) -> bytes:
        return segment(0xDA, bytes([len(components)]) + b"".join(bytes([c, 0]) for c in components) + bytes([start, end, 0]))

    one_code = bytes([1] + [0] * 15)  # one Huffman code of length 1
    out = b"\xff\xd8" + segment(0xDB, b"\x00" + bytes([1] * 64))
    out += segment(0xC2, struct.pack(">BHHB", 8, side, side, 3) + b"".join(bytes([c, 0x11, 0]) for c in (1, 2, 3)))
    out += segment(0xC4, b"\x00" + one_code + b"\x00" + b"\x10" + one_code + b"\xe0")  # DC: category 0; AC: EOB14
    out += scan([1, 2, 3], 0, 0) + bytes(blocks * 3 // 8)
    for component in (1, 2, 3):
        for k in range(1, 64):
            out += scan([component], k, k) + b"\x00\x01"  # '0' + 14 zero bits, padded with a 1
    return out + b"\xff\xd9"


def test_a_jpeg_of_more_scans_than_any_encoder_writes_is_refused(data_root):
    """Decode time grows with the scans: a hostile 139 kB progressive JPEG of 2,647 scans took 16 s to decode
    and stalled every request behind it. libjpeg's own progressive mode writes 10."""
    bomb = progressive_jpeg()
    with pytest.raises(ImageError) as info:
        preprocess(bomb, 128)
    assert info.value.code == "unsupported_image" and "190 scans" in info.value.message
    smear = cv2.imread(str(data_root / SAMPLE))
    progressive = encode(smear, ".jpg", [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    np.testing.assert_allclose(preprocess(progressive, 128), preprocess(encode(smear, ".jpg"), 128), atol=0.05)


def _pillow(frames: list[np.ndarray], fmt: str, **options) -> bytes:
    import io

    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    out = io.BytesIO()
    images[0].save(out, fmt, save_all=len(images) > 1, append_images=images[1:], **options)
    return out.getvalue()


def test_images_that_are_not_one_opaque_still_are_refused():
    """What a viewer shows is not what the network would read: only the first frame of an animation or of a
    multi-page file, the colour hidden under transparent pixels. Opaque single frames are served."""
    red, blue = np.full((64, 64, 3), (200, 40, 60), np.uint8), np.full((64, 64, 3), (40, 60, 200), np.uint8)
    hidden = np.dstack([red, np.zeros((64, 64), np.uint8)])
    half = np.dstack([red, np.full((64, 64), 128, np.uint8)])
    refused = {
        "animated GIF": _pillow([red, blue], "GIF", duration=20),
        "animated PNG": _pillow([red, blue], "PNG"),
        "multi-page TIFF": _pillow([red, blue], "TIFF"),
        "animated WebP": _pillow([red, blue], "WEBP", lossless=True),
        "transparent PNG": encode(cv2.cvtColor(hidden, cv2.COLOR_RGBA2BGRA)),
        "half-transparent PNG": encode(cv2.cvtColor(half, cv2.COLOR_RGBA2BGRA)),
        "transparent WebP": _pillow([hidden], "WEBP", lossless=True),
        "transparent grey PNG": _pillow([np.dstack([red[..., 0], np.zeros((64, 64), np.uint8)])], "PNG"),
        "palette PNG with a transparent colour": _pillow([red], "PNG", transparency=(200, 40, 60)),
    }
    for name, payload in refused.items():
        with pytest.raises(ImageError) as info:
            preprocess(payload, 32)
        assert info.value.code == "unsupported_image", name
    opaque = np.dstack([red, np.full((64, 64), 255, np.uint8)])
    for name, payload in {"GIF": _pillow([red], "GIF"), "opaque RGBA PNG": _pillow([opaque], "PNG"),
                          "opaque WebP": _pillow([opaque], "WEBP", lossless=True), "TIFF": _pillow([red], "TIFF")}.items():
        x = preprocess(payload, 32)
        assert abs(float(x[..., 0].mean()) - 200 / 255) < 0.02, name


def _with_exif(fmt: str, orientation: int, wrap_mpo: bool = False) -> bytes:
    import io

    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = orientation
    out = io.BytesIO()
    Image.fromarray(np.zeros((150, 224, 3), np.uint8)).save(out, fmt, exif=exif)
    return with_mpf(out.getvalue()) if wrap_mpo else out.getvalue()


def test_decode_gives_the_size_a_viewer_shows_of_a_turned_image():
    """A camera's EXIF Orientation turns the picture; OpenCV decodes it turned (for some formats and tag
    types), and an explanation's heat map must be turned alike: sized from the header, it came out 224 x 150
    over a 150 x 224 picture. The shown size is read off the decoded pixels, whatever the format."""
    from model.preprocess import decode

    cases = {"JPEG 1": _with_exif("JPEG", 1), "JPEG 3": _with_exif("JPEG", 3), "JPEG 6": _with_exif("JPEG", 6),
             "JPEG 8": _with_exif("JPEG", 8), "MPO 6": _with_exif("JPEG", 6, wrap_mpo=True),
             "PNG 6": _with_exif("PNG", 6), "WebP 6": _with_exif("WEBP", 6)}
    for name, payload in cases.items():
        decoded = cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_COLOR)
        result = decode(payload, 128)
        assert result.shown_size == decoded.shape[1::-1], name
        np.testing.assert_array_equal(result.tensor, preprocess(payload, 128))


def mpf_segment() -> bytes:
    """The APP2 "MPF" segment of a two-image MPO, as Pillow writes it."""
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (16, 16)).save(out, "MPO", save_all=True, append_images=[Image.new("RGB", (16, 16))])
    data = out.getvalue()
    at = data.index(b"\xff\xe2\x00")
    while data[at + 4:at + 8] != b"MPF\x00":
        at = data.index(b"\xff\xe2", at + 2)
    return data[at:at + 2 + int.from_bytes(data[at + 2:at + 4], "big")]


def with_mpf(jpeg: bytes) -> bytes:
    """A JPEG that Pillow opens as "MPO" (a phone's multi-picture format), the same image to OpenCV."""
    return jpeg[:2] + mpf_segment() + jpeg[2:]


def test_what_slipped_past_the_first_checks_is_refused_too():
    """A second hostile pass: the scan limit skipped JPEGs that Pillow names MPO (10,000 scans: 13 s); an
    animated AVIF; grey PNGs whose tRNS colour key (4 and 16 bit) Pillow mis-scales, so Chromium shows them
    transparent while they passed as opaque; 1,389 zTXt chunks after IDAT (libpng inflated 9.7 GB: 31 s);
    900,000 APP segments (6 s, 254 MB)."""
    grey_rows = lambda depth: b"".join(b"\x00" + bytes(64 * depth // 8) for _ in range(64))  # noqa: E731
    text = zlib.compress(b"\x00" * 100_000)
    smear = encode(np.full((64, 64, 3), 120, np.uint8), ".jpg")
    app_stuffed = smear[:2] + b"".join(b"\xff\xe5\x00\x08APP5xx" for _ in range(2000)) + smear[2:]
    refused = {
        "MPO of 190 scans": with_mpf(progressive_jpeg()),
        "animated AVIF": _pillow([np.full((64, 64, 3), 90, np.uint8), np.full((64, 64, 3), 200, np.uint8)], "AVIF"),
        "4-bit grey PNG with a colour key": png(64, 64, 4, 0, grey_rows(4), (b"tRNS", b"\x00\x00")),
        "16-bit grey PNG with a colour key": png(64, 64, 16, 0, grey_rows(16), (b"tRNS", b"\x00\x00")),
        "PNG with 40 zTXt chunks after IDAT": png(64, 64, 8, 0, grey_rows(8),
                                                  after=tuple((b"zTXt", b"k\x00\x00" + text) for _ in range(40))),
        "JPEG of 2000 APP segments": app_stuffed,
    }
    for name, payload in refused.items():
        with pytest.raises(ImageError) as info:
            preprocess(payload, 32)
        assert info.value.code == "unsupported_image", (name, info.value.message)
    from unittest import mock

    from PIL import Image

    with mock.patch("model.preprocess.Image.open", wraps=Image.open) as opened, pytest.raises(ImageError):
        preprocess(app_stuffed, 32)
    assert not opened.called  # refused before Pillow keeps every APP segment (900,000: 3 s, 250 MB)
    served = {"8-bit grey PNG with 3 zTXt chunks": png(64, 64, 8, 0, grey_rows(8),
                                                        after=tuple((b"zTXt", b"k\x00\x00" + text) for _ in range(3))),
              "MPO of one scan": with_mpf(smear)}
    for name, payload in served.items():
        assert preprocess(payload, 32).shape == (32, 32, 3), name


def two_page_tiff(second_page_subfile_type: int, side: int = 48) -> bytes:
    """An uncompressed `side` x `side` RGB TIFF of two pages; the second page's NewSubfileType (1: a reduced-resolution
    preview, as scanners and slide cameras write)."""
    def page(at: int, subfile_type: int, last: bool) -> tuple[bytes, int]:
        tags = [(254, 4, subfile_type), (256, 4, side), (257, 4, side), (258, 3, None), (259, 3, 1), (262, 3, 2),
                (273, 4, None), (277, 3, 3), (278, 4, side), (279, 4, 3 * side * side)]
        bits_at = at + 2 + 12 * len(tags) + 4
        pixels_at = bits_at + 6
        ifd = struct.pack("<H", len(tags))
        for tag, kind, value in tags:
            value = {258: bits_at, 273: pixels_at}.get(tag, value)
            count = 3 if tag == 258 else 1
            packed = struct.pack("<HH", value, 0) if kind == 3 and count == 1 else struct.pack("<I", value)
            ifd += struct.pack("<HHI", tag, kind, count) + packed
        end = pixels_at + 3 * side * side
        pixels = bytes([120, 60, 90] * side * side)
        return ifd + struct.pack("<I", 0 if last else end) + struct.pack("<HHH", 8, 8, 8) + pixels, end

    first, second_at = page(8, 0, False)
    second, _ = page(second_at, second_page_subfile_type, True)
    return b"II*\x00" + struct.pack("<I", 8) + first + second


def test_legitimate_files_the_first_checks_refused_are_served(data_root):
    """Review of the hardening: a TIFF whose second page is a reduced-resolution preview, a CIELab TIFF (its
    a* band is not alpha), a baseline JPEG whose APP2 data holds FF DA byte pairs (not scans); and the shown
    size of a near-square image decoded at a reduced size is not taken for turned."""
    import io

    from PIL import Image

    from model.preprocess import decode

    with pytest.raises(ImageError) as info:
        preprocess(two_page_tiff(0), 32)
    assert info.value.code == "unsupported_image"
    lab = io.BytesIO()
    Image.new("LAB", (48, 48), (50, 10, 20)).save(lab, "TIFF")
    smear = (data_root / SAMPLE).read_bytes()
    app2 = b"ICC_PROFILE\x00" + b"\xff\xda" * 70
    with_app2 = smear[:2] + b"\xff\xe2" + (len(app2) + 2).to_bytes(2, "big") + app2 + smear[2:]
    for name, payload in {"TIFF with a preview page": two_page_tiff(1), "CIELab TIFF": lab.getvalue(),
                          "JPEG with FF DA inside APP2": with_app2}.items():
        assert preprocess(payload, 32).shape == (32, 32, 3), name
    near_square = encode(np.full((1000, 999, 3), 128, np.uint8), ".jpg")
    assert decode(near_square, 100).shown_size == (999, 1000)  # decoded at 1/8: 125 x 125


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
                            "bad_aspect_ratio", "unsupported_image"}
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
