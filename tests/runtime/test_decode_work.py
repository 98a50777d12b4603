"""Decode time is bounded from a file's structure, read before Pillow parses it (``i2p.runtime.decode_work``).

Each hostile file below is refused as an error row naming the file, from its bytes, before any decoding
("refused before decoding" is raised before ``Image.open``), and fast; files at the limits and real
encoders' output (Pillow/libjpeg progressive, optimised, CMYK, grey; APNG; animated GIF) still decode.
Before the limits, the same files took seconds to minutes (numbers in ``i2p.runtime.decode_work``).
"""

from __future__ import annotations

import io
import re
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from i2p.runtime import decode_work
from i2p.runtime.decode_work import MAX_GIF_EXTENSIONS, MAX_JPEG_SCANS, MAX_JPEG_SEGMENTS, MAX_PNG_CHUNKS
from i2p.runtime.preprocess import ImageError, PreprocessSpec, load_image, preprocess
from tests.support.corpus import base_image, encode

SPEC = PreprocessSpec(size=32)
FAST_S = 2.0  # generous: the checks themselves take milliseconds


def jpeg_segments(data: bytes) -> list[tuple[int, int, int]]:
    """(start, end, marker) of each segment after SOI; a scan's entropy data belongs to its SOS."""
    out, pos = [], 2
    while True:
        marker = data[pos + 1]
        if marker == 0xD9:
            return [*out, (pos, pos + 2, marker)]
        end = pos + 2 + struct.unpack(">H", data[pos + 2 : pos + 4])[0]
        if marker == 0xDA:
            end = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]").search(data, end).start()
        out.append((pos, end, marker))
        pos = end


def progressive_with_extra_scans(extra: int, size: int = 512) -> bytes:
    """A flat progressive JPEG with its smallest scan (an AC scan of EOB runs, with its DHT) spliced in
    ``extra`` more times before EOI: each copy is a few dozen bytes and one more pass over the image."""
    data = encode(Image.new("RGB", (size, size), (128, 100, 90)), "JPEG", progressive=True, quality=90)
    segs = jpeg_segments(data)
    scans = [i for i, (_, _, m) in enumerate(segs) if m == 0xDA]
    i = min(scans, key=lambda k: segs[k][1] - segs[k][0])
    start = segs[i - 1][0] if segs[i - 1][2] == 0xC4 else segs[i][0]
    eoi = segs[-1][0]
    return data[:eoi] + data[start : segs[i][1]] * extra + data[eoi:]


def png_chunk(tag: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload))


def png_split_idat(img: np.ndarray, piece: int) -> bytes:
    """An RGB PNG whose zlib stream is cut into IDAT chunks of ``piece`` bytes."""
    h, w, _ = img.shape
    z = zlib.compress(b"".join(b"\0" + img[y].tobytes() for y in range(h)), 9)
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    idat = b"".join(png_chunk(b"IDAT", z[k : k + piece]) for k in range(0, len(z), piece))
    return b"\x89PNG\r\n\x1a\n" + header + idat + png_chunk(b"IEND", b"")


def png_with_chunks(n: int) -> bytes:
    data = encode(base_image(16, 16), "PNG")
    at = data.index(b"IDAT") - 4
    return data[:at] + png_chunk(b"zzZz", b"") * n + data[at:]


def jpeg_with(insert: bytes) -> bytes:
    data = encode(base_image(), "JPEG")
    return data[:2] + insert + data[2:]


def gif_with_extensions(n: int) -> bytes:
    data = encode(Image.new("P", (16, 16), 3), "GIF")
    at = data.index(b"\x2c", 13)  # the image descriptor, after the colour table
    return data[:at] + b"\x21\xfe\x01c\x00" * n + data[at:]


def tiff(entries: list[tuple[int, int, int, int]], little: bool = True) -> bytes:
    """A classic TIFF with one IFD of (tag, type, count, value) entries (enough for the structure check)."""
    o = "<" if little else ">"
    ifd = struct.pack(o + "H", len(entries)) + b"".join(struct.pack(o + "HHII", *e) for e in entries)
    return (b"II*\x00" if little else b"MM\x00*") + struct.pack(o + "I", 8) + ifd + b"\0\0\0\0"


def tiff_strips(n: int) -> bytes:
    """A 1-pixel-wide grey TIFF of ``n`` rows, one strip per row (Pillow itself writes these)."""
    return encode(Image.new("L", (1, n), 7), "TIFF", tiffinfo={278: 1})


HOSTILE = {
    "progressive.jpg": (lambda: progressive_with_extra_scans(MAX_JPEG_SCANS), "over 100 scans"),
    "progressive_1000.jpg": (lambda: progressive_with_extra_scans(1000), "over 100 scans"),
    "comments.jpg": (lambda: jpeg_with(b"\xff\xfe\x00\x02" * MAX_JPEG_SEGMENTS), "over 4,096 markers"),
    "app_flood.jpg": (lambda: jpeg_with(b"\xff\xe5\x00\x03x" * 100_000), "over 4,096 markers"),
    "fill_flood.jpg": (lambda: jpeg_with((b"\xff" * 1000 + b"\xfe\x00\x02") * 5000), "over 4,096 markers"),
    "stray.jpg": (lambda: jpeg_with(b"\xff\xfe\x00\x02" + b"\x00" * 70_000), "stray bytes"),
    "chunks.png": (lambda: png_with_chunks(MAX_PNG_CHUNKS), "over 16,384 chunks"),
    "idat_bytes.png": (lambda: png_split_idat(base_image(200, 200, seed=3), 1), "over 16,384 chunks"),
    "extensions.gif": (lambda: gif_with_extensions(MAX_GIF_EXTENSIONS + 1), "over 1,024 extension blocks"),
    "strips.tif": (lambda: tiff_strips(70_000), "70,000 strips or tiles"),
    "tiles_be.tif": (
        lambda: tiff([(256, 4, 1, 10**6), (257, 4, 1, 10**6), (324, 4, 10**6, 8)], False),
        "1,000,000 strips",
    ),
    "tags.tif": (lambda: tiff([(700, 1, 1, 0)] * 5000), "5,000 entries"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_structure_is_refused_before_decoding_and_fast(name: str, tmp_path) -> None:
    make, message = HOSTILE[name]
    path = tmp_path / name
    path.write_bytes(make())
    started = time.perf_counter()
    with pytest.raises(ImageError) as info:
        preprocess(path, SPEC)
    elapsed = time.perf_counter() - started
    assert str(info.value).startswith(f"{path}: refused before decoding: "), info.value
    assert message in str(info.value)
    assert elapsed < FAST_S, f"{name}: {elapsed:.2f} s"


def test_hostile_files_are_error_rows_among_good_ones(tmp_path) -> None:
    """Through the Detector: one error row per hostile file, the good images scored."""
    from i2p.runtime import Detector
    from tests.support.fake_artifact import make_artifact

    good = tmp_path / "good.png"
    Image.fromarray(base_image()).save(good)
    bad = tmp_path / "scans.jpg"
    bad.write_bytes(progressive_with_extra_scans(500))
    det = Detector(make_artifact(tmp_path / "fake.i2p"))
    results = det.predict([str(good), str(bad), str(good)])
    assert [r.error is None for r in results] == [True, False, True]
    assert str(bad) in results[1].error and "scans" in results[1].error


def test_files_at_the_limits_decode(tmp_path) -> None:
    """Exactly MAX_JPEG_SCANS scans, MAX_PNG_CHUNKS chunks, MAX_GIF_EXTENSIONS extensions are accepted."""
    base = progressive_with_extra_scans(0, size=64)
    scans = sum(m == 0xDA for _, _, m in jpeg_segments(base))
    at_limit = progressive_with_extra_scans(MAX_JPEG_SCANS - scans, size=64)
    assert load_image(at_limit).size == (64, 64)
    assert load_image(png_with_chunks(MAX_PNG_CHUNKS - 4)).size == (16, 16)  # + IHDR, IDAT, IEND
    assert load_image(gif_with_extensions(MAX_GIF_EXTENSIONS)).size == (16, 16)
    assert load_image(tiff_strips(1000)).size == (1, 1000)
    assert load_image(jpeg_with(b"\xff\xfe\x00\x02" * 100 + b"\x00" * 1000)).size == (48, 40)  # stray bytes


@pytest.mark.parametrize(
    "kw",
    [
        {"progressive": True, "quality": 90},
        {"progressive": True, "optimize": True},
        {"optimize": True, "quality": 75},
        {"progressive": True, "subsampling": 0},
    ],
)
@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_real_encoders_output_passes(kw: dict, mode: str) -> None:
    img = Image.fromarray(base_image(96, 80)).convert(mode)
    data = encode(img, "JPEG", **kw)
    decode_work.check_decode_work(data)
    assert load_image(data).size == (96, 80)


def test_only_the_first_frame_of_an_animation_is_read(tmp_path) -> None:
    """A GIF whose first frame is fine and whose rest is 2M extension blocks: frame 0, fast (the rest is
    never walked: before, asking ``is_animated`` walked it, ~3 s); same for an APNG and animated WebP."""
    frames = [Image.fromarray(base_image(seed=s)) for s in range(3)]
    gif = encode(frames[0], "GIF")
    flood = gif[:-1] + b"\x21\xf9\x04\x00\x00\x00\x00\x00" * 2_000_000 + gif[-1:]  # before the trailer
    started = time.perf_counter()
    img = load_image(flood)
    assert time.perf_counter() - started < FAST_S
    with Image.open(io.BytesIO(gif)) as original:
        assert np.array_equal(np.asarray(img), np.asarray(original.convert("RGB")))
    for fmt in ("PNG", "WEBP"):
        data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], lossless=True)
        with Image.open(io.BytesIO(data)) as original:
            assert getattr(original, "n_frames", 1) == 3
            first_frame = np.asarray(original.convert("RGB"))
        assert np.array_equal(np.asarray(load_image(data)), first_frame)


def test_a_caller_image_on_a_later_frame_gives_its_first_frame() -> None:
    frames = [Image.fromarray(base_image(seed=s)) for s in range(3)]
    with Image.open(io.BytesIO(encode(frames[0], "PNG", save_all=True, append_images=frames[1:]))) as img:
        first = np.asarray(img.convert("RGB"))
        img.seek(2)
        assert np.array_equal(np.asarray(load_image(img)), first)


def test_trailing_pictures_of_an_mpo_are_not_walked() -> None:
    """The walk stops at the first EOI: what follows (an MPO's second picture, junk) is not counted."""
    data = encode(base_image(), "JPEG") + b"\xff\xfe\x00\x02" * (MAX_JPEG_SEGMENTS + 10)
    decode_work.check_decode_work(data)
