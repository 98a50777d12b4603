"""A generated corpus of awkward and hostile image files, with what the runtime must make of each.

Bad files must come back as an error naming the file (``Case.error`` is a substring of the message);
good files must give the same result as their upright 8-bit RGB pixels (``Case.pixels``), which are
computed here independently of the decode path under test (numpy, or a lossless encoding).
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from i2p.runtime.preprocess import MAX_INPUT_BYTES


@dataclass(frozen=True)
class Case:
    error: str | None = None  # expected substring of the error message; None for a good image
    pixels: np.ndarray | None = None  # good images: the upright uint8 RGB pixels it must score as
    tolerance: float = 0.0  # on the probability, for lossy re-encodings (CMYK JPEG)


def base_image(width: int = 48, height: int = 40, seed: int = 0) -> np.ndarray:
    """A smooth, asymmetric RGB test picture (gradients plus a little noise) that survives JPEG well."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    rng = np.random.default_rng(seed)
    img = np.stack([255 * x / width, 255 * y / height, 128 + 100 * np.sin(x / 5 + y / 9)], axis=2)
    return (img + rng.normal(0, 4, img.shape)).clip(0, 255).astype(np.uint8)


def png_bytes(width: int, height: int, bit_depth: int, color_type: int, rows: Iterable[bytes]) -> bytes:
    """A PNG written by hand, for what Pillow will not write (16-bit RGB, a 20000x20000 bomb)."""
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(b"\0" + row) for row in rows) + comp.flush()

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def encode(img: Image.Image | np.ndarray, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    (Image.fromarray(img) if isinstance(img, np.ndarray) else img).save(buf, fmt, **kw)
    return buf.getvalue()


def make_bad_corpus(directory: str | os.PathLike) -> dict[str, Case]:
    """Write the corpus into ``directory``; return file name -> expected outcome."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    base = base_image()
    noise = rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)  # enough entropy-coded data to cut into
    jpeg = encode(noise, "JPEG", quality=90)
    png = encode(noise, "PNG")
    files: dict[str, bytes] = {}
    cases: dict[str, Case] = {}
    sparse: list[str] = []

    def add(name: str, data: bytes, case: Case) -> None:
        files[name] = data
        cases[name] = case

    # -- unreadable ---------------------------------------------------------------------------------
    add("truncated.jpg", jpeg[: len(jpeg) // 2], Case(error="truncated"))
    add("truncated.png", png[: len(png) // 2], Case(error="truncated"))
    corrupt = bytearray(jpeg)
    corrupt[len(jpeg) // 3 : len(jpeg) // 3 + 400] = rng.integers(0, 256, 400, dtype=np.uint8).tobytes()
    add("corrupt.jpg", bytes(corrupt), Case(error="cannot decode"))
    # Cut inside the header of the second frame (the first frame alone encodes to about that length).
    # Only frame 0 is ever read, and it is whole: it scores as that frame (asking is_animated, which
    # walked on into the cut, raised struct.error / IndexError from Pillow's GIF plugin).
    first = Image.fromarray(base).quantize(64)
    gif = encode(first, "GIF", save_all=True, append_images=[Image.fromarray(255 - base).quantize(64)])
    first_rgb = np.asarray(first.convert("RGB"))
    add("truncated_anim.gif", gif[: len(encode(first, "GIF")) + 10], Case(pixels=first_rgb))
    add("empty.jpg", b"", Case(error="empty file"))
    add(
        "random.jpg", rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(), Case(error="not a readable image")
    )
    # A format Pillow decodes but untrusted input may not use (the allowlist in preprocess.FORMATS).
    add("pcx_inside.jpg", encode(base, "PCX"), Case(error="not a readable image"))
    # 20000x20000 1-bit PNG of zeros: 50 KB on disk, 1.6 GB once decoded to RGB.
    bomb_rows = (bytes(2500) for _ in range(20000))
    add("bomb.png", png_bytes(20000, 20000, 1, 0, bomb_rows), Case(error="pixel limit"))
    # 9000x9000 = 81 MP: under Pillow's own bomb threshold (89 MP), over the runtime's 64 MP default.
    add(
        "bomb_81mp.png",
        png_bytes(9000, 9000, 1, 0, (bytes(1125) for _ in range(9000))),
        Case(error="pixel limit"),
    )
    # More than MAX_INPUT_BYTES, as a sparse file: refused from its size, before a byte is read.
    sparse.append("huge_sparse.jpg")
    cases["huge_sparse.jpg"] = Case(error="input limit")

    # -- good, in awkward encodings -------------------------------------------------------------------
    add("plain.png", encode(base, "PNG"), Case(pixels=base))
    add("png_named.jpg", encode(base, "PNG"), Case(pixels=base))
    cmyk = Image.fromarray(base).convert("CMYK")
    add("cmyk.jpg", encode(cmyk, "JPEG", quality=100, subsampling=0), Case(pixels=base, tolerance=0.02))
    grey = base[:, :, 1]
    add(
        "grey16.png",
        encode(Image.fromarray(grey.astype(np.uint16) * 257), "PNG"),
        Case(pixels=_grey_rgb(grey)),
    )
    rgb16 = (base.astype(">u2") * 257).reshape(base.shape[0], -1)
    add(
        "rgb16.png",
        png_bytes(base.shape[1], base.shape[0], 16, 2, (r.tobytes() for r in rgb16)),
        Case(pixels=base),
    )
    alpha = np.linspace(0, 255, base.shape[0] * base.shape[1]).reshape(base.shape[:2]).astype(np.uint8)
    add("rgba.png", encode(np.dstack([base, alpha]), "PNG"), Case(pixels=base))  # alpha is dropped
    palette = Image.fromarray(base).quantize(64)
    palette_rgb = np.asarray(palette.convert("RGB"))
    add("palette.png", encode(palette, "PNG", transparency=0), Case(pixels=palette_rgb))
    frames = [palette, *(Image.fromarray(255 - base).quantize(64) for _ in range(2))]
    add(
        "anim.gif",
        encode(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        Case(pixels=palette_rgb),
    )
    webp_frames = [Image.fromarray(base), Image.fromarray(255 - base)]
    anim_webp = encode(webp_frames[0], "WEBP", save_all=True, append_images=webp_frames[1:], lossless=True)
    add("anim.webp", anim_webp, Case(pixels=base))
    # Orientation 6 ("rotate 90° clockwise to display"): stored sideways, must score as upright.
    exif = Image.Exif()
    exif[0x0112] = 6
    sideways = encode(Image.fromarray(np.rot90(base)), "JPEG", quality=95, exif=exif)
    stored = np.asarray(Image.open(io.BytesIO(sideways)).convert("RGB"))
    add("exif_rotated.jpg", sideways, Case(pixels=np.ascontiguousarray(np.rot90(stored, k=-1))))
    add("one_pixel.png", encode(base[:1, :1], "PNG"), Case(pixels=base[:1, :1]))
    strip = np.repeat(base[:10, :], 209, axis=1)[:, :10000]
    add("strip_10000x10.png", encode(strip, "PNG"), Case(pixels=strip))
    # Elongated far past MAX_ASPECT: center-cropped to 16:1 before the resize, so they give results.
    tall = np.repeat(base[:, :2], 125, axis=0)  # 2 wide, 5000 high
    add("tall_2x5000.png", encode(tall, "PNG"), Case(pixels=tall))
    add(
        "sliver.png",
        png_bytes(5_000_000, 1, 1, 0, [bytes(625_000)]),
        Case(pixels=np.zeros((1, 5_000_000, 3), np.uint8)),
    )

    for name, data in files.items():
        (root / name).write_bytes(data)
    for name in sparse:
        with open(root / name, "wb") as f:
            f.write(b"\xff\xd8\xff")
            f.truncate(MAX_INPUT_BYTES + 1)

    # -- not files ------------------------------------------------------------------------------------
    (root / "folder.jpg").mkdir(exist_ok=True)
    cases["folder.jpg"] = Case(error="is a directory")
    os.symlink(root / "no-such-target.jpg", root / "dangling.jpg")
    cases["dangling.jpg"] = Case(error="cannot read file")
    os.mkfifo(root / "fifo.jpg")  # reading it would block forever: refused before it is opened
    cases["fifo.jpg"] = Case(error="not a regular file")
    if os.geteuid() != 0:  # root reads a chmod-000 file anyway; tests/runtime/test_corpus.py skips that case
        (root / "unreadable.jpg").write_bytes(jpeg)
        (root / "unreadable.jpg").chmod(0)
        cases["unreadable.jpg"] = Case(error="Permission denied")
    return cases


def fuzz_seeds() -> dict[str, bytes]:
    """One valid file per allowed format, plus variants with more structure (EXIF, alpha, animation)."""
    img = base_image(24, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: exif_transpose runs on every mutated JPEG
    return {
        "jpeg": encode(img, "JPEG", quality=80),
        "progressive.jpeg": encode(img, "JPEG", progressive=True),
        "exif.jpeg": encode(img, "JPEG", exif=exif),
        "png": encode(img, "PNG"),
        "rgba.png": encode(np.dstack([img, img[:, :, :1]]), "PNG"),
        "grey16.png": encode(Image.fromarray(img[:, :, 0].astype(np.uint16) * 257), "PNG"),
        "gif": encode(img, "GIF", save_all=True, append_images=[Image.fromarray(255 - img)]),
        "webp": encode(img, "WEBP", quality=80),
        "anim.webp": encode(
            img, "WEBP", save_all=True, append_images=[Image.fromarray(255 - img)], lossless=True
        ),
        "bmp": encode(img, "BMP"),
        "tiff": encode(img, "TIFF", compression="tiff_lzw"),
        "float.tiff": encode(Image.fromarray(img[:, :, 0].astype(np.float32) / 255), "TIFF"),
        "cmyk.jpeg": encode(Image.fromarray(img).convert("CMYK"), "JPEG"),
    }


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """1-8 random edits: bit flips, overwritten/inserted/deleted spans, interesting values, truncation."""
    buf = bytearray(data)
    for _ in range(int(rng.integers(1, 9))):
        if not buf:
            break
        pos = int(rng.integers(0, len(buf)))
        op = rng.integers(0, 6)
        if op == 0:
            buf[pos] ^= 1 << int(rng.integers(0, 8))
        elif op == 1:
            n = int(rng.integers(1, 32))
            buf[pos : pos + n] = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        elif op == 2:
            buf[pos:pos] = rng.integers(0, 256, int(rng.integers(1, 32)), dtype=np.uint8).tobytes()
        elif op == 3:
            del buf[pos : pos + int(rng.integers(1, 128))]
        elif op == 4:  # sizes and counts live in 16/32-bit fields: try the edge values
            value = [0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF][int(rng.integers(0, 9))]
            width = int(rng.choice([1, 2, 4]))
            buf[pos : pos + width] = (value & ((1 << 8 * width) - 1)).to_bytes(
                width, str(rng.choice(["big", "little"]))
            )
        else:
            del buf[max(pos, 1) :]
    return bytes(buf)


def _grey_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[:, :, None], 3, axis=2)
