"""The one preprocessing path: image bytes -> decoded RGB -> resized -> float32 in [0, 1].

Training, evaluation, local classification and the agent all call `preprocess`, so the tensor a
model sees at serving time is the one it learned from (the original project fed /255 in training
and raw 0..255 at inference).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

Image.MAX_IMAGE_PIXELS = None  # the pixel limit is ours (ImageLimits), checked on the header

# OpenCV reduced decoders: the JPEG decoder scales in the DCT domain, so a 2592x1944 field decodes
# at 1/8 for roughly half the cost of a full decode.
_REDUCED_FLAGS = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
                  8: cv2.IMREAD_REDUCED_COLOR_8}


_JPEG_END = b"\xff\xd9"
_JPEG_START_OF_SCAN = 0xDA
_JPEG_START_OF_SCAN_MARKER = b"\xff\xda"  # never inside scan data (0xFF is stuffed as FF 00)
# Progressive decoding reads every scan over the whole image: a hostile 139 kB JPEG of 2,647 scans took 16 s
# at 12 MP. libjpeg's progressive mode writes 10 scans; at this limit a 12 MP image costs about 0.4 s.
MAX_JPEG_SCANS = 64
MAX_JPEG_SEGMENTS = 256  # before the first scan (a camera writes about a dozen): 900,000 APP segments took 6 s, 254 MB
MAX_PNG_COMPRESSED_METADATA = 16  # zTXt, iTXt, iCCP chunks: libpng inflates each (up to 8 MB), wherever it sits
MAX_TILE_PIXELS = 1024 * 1024  # a TIFF tile may exceed a small image up to this; else no larger than the image
_JPEG_FORMATS = {"JPEG", "MPO"}  # Pillow names a JPEG with a multi-picture segment MPO; OpenCV decodes it as a JPEG
_JPEG_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # TEM, RST0-7: markers without a length


class ImageError(ValueError):
    """An image the project refuses, with a wire error code (`not_an_image`, `image_too_large`...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class ImageLimits:
    """What an accepted image may be; the agent's config fills these in."""

    max_pixels: int = 50_000_000
    min_side: int = 48  # smaller smears are misread (docs/trust.md, "Images too small to read")
    max_aspect_ratio: float = 20.0


@dataclass(frozen=True)
class Header:
    """What an image's header says, read without decoding its pixels."""

    width: int    # as stored (a decoder may turn it by its EXIF orientation: `decode` gives the size shown)
    height: int
    format: str
    animated: bool = False      # a second frame or page (GIF, APNG, WebP, TIFF, AVIF): viewers show more than one
    transparent: bool = False   # an alpha channel or a transparent colour
    tile: tuple[int, int] | None = None  # a tiled TIFF's tile size


_ANIMATED_FORMATS = {"GIF", "PNG", "WEBP", "TIFF", "AVIF"}  # other formats' extra frames (MPO's) are not shown
_TIFF_NEW_SUBFILE_TYPE, _MAX_TIFF_PAGES = 254, 16  # bit 0: a reduced-resolution page (a preview)
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}


def _has_second_frame(img: Image.Image) -> bool:
    """A second frame, or a second full-resolution page (a TIFF's reduced-resolution previews do not count)."""
    if img.format not in _ANIMATED_FORMATS or not getattr(img, "is_animated", False):
        return False
    if img.format != "TIFF":
        return True
    for page in range(1, _MAX_TIFF_PAGES):
        try:
            img.seek(page)
        except EOFError:
            return False
        if not int(img.tag_v2.get(_TIFF_NEW_SUBFILE_TYPE, 0)) & 1:
            return True
    return True


def read_header(data: bytes, max_pixels: int | None = None) -> Header:
    """The image's header, without decoding the pixels. Frames are looked for only within `max_pixels` (Pillow
    decodes a GIF's first frame to find the second: a 10,000 x 10,000 two-frame PNG took 765 MB)."""
    if not data:
        raise ImageError("empty_payload", "the payload is empty")
    if data[:2] == b"\xff\xd8" and any(n >= MAX_JPEG_SEGMENTS for n, _ in enumerate(_jpeg_segments(data))):
        # before Pillow reads them all (it keeps every APP segment: 900,000 took 3 s and 250 MB)
        raise ImageError("unsupported_image", f"JPEG of more than {MAX_JPEG_SEGMENTS} segments before its image data")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as img:
                tags = getattr(img, "tag_v2", {})
                tile = (int(tags[322]), int(tags[323])) if 322 in tags and 323 in tags else None
                transparent = img.mode in _ALPHA_MODES or "transparency" in img.info
                probe = max_pixels is None or img.width * img.height <= max_pixels
                return Header(img.width, img.height, img.format or "unknown", probe and _has_second_frame(img),
                              transparent, tile)
    except UnidentifiedImageError:
        raise ImageError("not_an_image", "not a recognised image format") from None
    except Exception as exc:  # noqa: BLE001 - hostile bytes make header parsers fail in many ways
        raise ImageError("not_an_image", f"unreadable image header: {type(exc).__name__}") from None


def _jpeg_segments(data: bytes) -> Iterator[tuple[int, int, int]]:
    """(marker, offset, length) of each marker segment of a JPEG, up to its start of scan; fill
    bytes and markers without a length are skipped. Bounded by the data, no decoding."""
    at = 2  # after SOI
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            return
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker in _JPEG_STANDALONE:
            at += 2
            continue
        length = int.from_bytes(data[at + 2:at + 4], "big")
        yield marker, at, length
        if marker == _JPEG_START_OF_SCAN:
            return
        at += 2 + length


def _check_jpeg(data: bytes, width: int, height: int) -> None:
    """Refuse a JPEG that is truncated, or costs more to decode than any encoder's output would.

    The main image's scan data must end with an end-of-image marker (whatever follows it: phone "motion photos"
    append a video). Segments before the scan are skipped by their lengths, so a complete thumbnail inside EXIF
    does not count; scan data never holds FF D9 (0xFF is stuffed as FF 00). OpenCV would otherwise decode a
    truncated file and fill the missing part with grey. Scans are counted up to that end."""
    for marker, at, length in _jpeg_segments(data):
        if marker == _JPEG_START_OF_SCAN:
            end = data.find(_JPEG_END, at + 2 + length)
            if end == -1:
                break
            if (scans := data.count(_JPEG_START_OF_SCAN_MARKER, at, end)) > MAX_JPEG_SCANS:
                raise ImageError("unsupported_image", f"progressive JPEG of {scans} scans (at most {MAX_JPEG_SCANS} accepted)")
            return
    raise ImageError("not_an_image", f"truncated JPEG of {width}x{height}: no end-of-image marker")


def _png_compressed_metadata(data: bytes) -> int:
    """How many compressed metadata chunks (zTXt, iTXt, iCCP) a PNG holds, before and after its pixels; chunks
    are walked by their lengths, nothing is inflated."""
    count, at = 0, 8
    while at + 8 <= len(data):
        length, kind = int.from_bytes(data[at:at + 4], "big"), data[at + 4:at + 8]
        count += kind in (b"zTXt", b"iTXt", b"iCCP")
        if kind == b"IEND":
            break
        at += 12 + length
    return count


# libjpeg's standard luminance quantisation table (quality 50), in the zigzag order a DQT segment uses.
_JPEG_LUMINANCE_ZIGZAG = np.array([16, 11, 12, 14, 12, 10, 16, 14, 13, 14, 18, 17, 16, 19, 24, 40, 26, 24, 22, 22, 24,
                                   49, 35, 37, 29, 40, 58, 51, 61, 60, 57, 51, 56, 55, 64, 72, 92, 78, 64, 68, 87, 69,
                                   55, 56, 80, 109, 81, 87, 95, 98, 103, 104, 103, 62, 77, 113, 121, 112, 100, 120, 92,
                                   101, 103, 99], float)
_JPEG_QUANTISATION_TABLE = 0xDB


def jpeg_quality(data: bytes) -> int | None:
    """Estimated libjpeg quality (1-100) of a JPEG from its first luminance quantisation table, or
    None for other formats and unreadable headers (header only, no decoding). Heavy compression
    destroys detail that a resized tensor hides."""
    if data[:2] != b"\xff\xd8":
        return None
    for marker, at, length in _jpeg_segments(data):
        if marker == _JPEG_QUANTISATION_TABLE:
            segment = data[at + 4:at + 2 + length]
            if len(segment) < 65 or segment[0] != 0:  # only an 8-bit table 0 first is read
                return None
            scale = float(np.mean(np.frombuffer(segment[1:65], np.uint8) / _JPEG_LUMINANCE_ZIGZAG)) * 100
            quality = (200 - scale) / 2 if scale <= 100 else 5000 / scale
            return int(np.clip(round(quality), 1, 100))
    return None


def _opaque(data: bytes) -> bool:
    """Every pixel of the (first) frame is fully opaque (decodes the image: only for formats that carry
    transparency). A transparent colour key of a grey or colour image is refused unread: Pillow compares the
    key with rescaled samples at 4 and 16 bit, where browsers show those pixels transparent."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as img:
                if img.mode in _ALPHA_MODES and img.mode != "PA":
                    return img.getchannel("A").getextrema()[0] == 255
                if img.mode not in ("P", "PA"):
                    return False  # a colour key
                return img.convert("RGBA").getchannel("A").getextrema()[0] == 255
    except Exception:  # noqa: BLE001 - a transparency that cannot be checked is not served
        return False


def reduction_factor(width: int, height: int, target: int) -> int:
    """Largest OpenCV reduction (1, 2, 4, 8) that keeps the short side at or above `target`."""
    short = min(width, height)
    return max((f for f in _REDUCED_FLAGS if short // f >= target), default=1)


_JPEG_FILL = 128  # libjpeg decodes a block it got no data for (all coefficients zero) as mid-grey


def _ends_in_fill(bgr: np.ndarray, factor: int) -> bool:
    """The decoded JPEG's last row ends in libjpeg's grey fill (over 16 px at full scale, 4 px at an eighth)
    while the image is not all grey: its scan data stopped early and an end marker followed (a cut file with
    FF D9 added back decodes without error). A real capture has sensor noise; a uniform grey frame is the
    gate's to refuse. Only the last row is read: chroma upsampling blends the rows above the cut."""
    return bool((bgr[-1, -max(4, 16 // factor):] == _JPEG_FILL).all() and (bgr != _JPEG_FILL).any())


@dataclass(frozen=True)
class Decoded:
    tensor: np.ndarray              # size x size x 3 RGB float32 in [0, 1]
    shown_size: tuple[int, int]     # (width, height) at full resolution, turned as the decoder turned it


def preprocess(data: bytes, size: int, limits: ImageLimits = ImageLimits()) -> np.ndarray:
    """Decode image bytes into a `size`x`size`x3 RGB float32 tensor in [0, 1].

    Raises `ImageError` for anything that is not an acceptable image.
    """
    return decode(data, size, limits).tensor


def decode(data: bytes, size: int, limits: ImageLimits = ImageLimits()) -> Decoded:
    """`preprocess`, and the image's size as shown: decoders turn some images by their EXIF orientation
    (JPEG, MPO, PNG and WebP, not every tag type), so it is read off the decoded pixels."""
    header = read_header(data, limits.max_pixels)
    width, height, fmt = header.width, header.height, header.format
    if width * height > limits.max_pixels:
        raise ImageError("image_too_large",
                         f"{fmt} image of {width}x{height} exceeds {limits.max_pixels} pixels")
    if min(width, height) < limits.min_side:
        raise ImageError("image_too_small",
                         f"{fmt} image of {width}x{height} is under {limits.min_side} px on a side")
    if max(width, height) / min(width, height) > limits.max_aspect_ratio:
        raise ImageError("bad_aspect_ratio",
                         f"{fmt} image of {width}x{height} exceeds aspect ratio {limits.max_aspect_ratio}")
    if header.tile and header.tile[0] * header.tile[1] > max(width * height, MAX_TILE_PIXELS):
        raise ImageError("image_too_large", f"TIFF tiles of {header.tile[0]}x{header.tile[1]} are larger than the "
                                            f"{width}x{height} image (the decoder would allocate a whole tile)")
    if header.animated:
        raise ImageError("unsupported_image", f"{fmt} image of more than one frame or page: send one still image")
    if fmt in _JPEG_FORMATS:
        _check_jpeg(data, width, height)
    if fmt == "PNG" and (chunks := _png_compressed_metadata(data)) > MAX_PNG_COMPRESSED_METADATA:
        raise ImageError("unsupported_image", f"PNG of {chunks} compressed metadata chunks (at most "
                                              f"{MAX_PNG_COMPRESSED_METADATA} accepted)")
    if header.transparent and not _opaque(data):
        raise ImageError("unsupported_image", f"{fmt} image with transparent pixels: send an opaque image")
    factor = reduction_factor(width, height, size)
    flag = _REDUCED_FLAGS[factor]
    try:
        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
    except cv2.error:
        bgr = None
    if bgr is None or bgr.size == 0:
        raise ImageError("not_an_image", f"{fmt} image of {width}x{height} could not be decoded")
    if fmt in _JPEG_FORMATS and _ends_in_fill(bgr, factor):
        raise ImageError("not_an_image", f"JPEG of {width}x{height} whose data stops before its last blocks (they "
                                         "decode as libjpeg's mid-grey fill): send the whole file")
    if bgr.dtype != np.uint8:  # some decoders keep 16-bit depth even with IMREAD_COLOR
        bgr = cv2.convertScaleAbs(bgr, alpha=255.0 / np.iinfo(bgr.dtype).max)
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    stored = (-(-height // factor), -(-width // factor))  # the decoded (rows, columns) of an unturned image
    turned = rgb.shape[:2] != stored and rgb.shape[:2] == stored[::-1]
    rgb = cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA)
    return Decoded(rgb.astype(np.float32) / np.float32(255.0), (height, width) if turned else (width, height))


def preprocess_file(path: str | Path, size: int, limits: ImageLimits = ImageLimits()) -> np.ndarray:
    """`preprocess` applied to a file's bytes (the training and evaluation entry point)."""
    return preprocess(Path(path).read_bytes(), size, limits)
