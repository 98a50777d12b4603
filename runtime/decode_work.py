"""Decode work bounded from a file's structure, read from its bytes before Pillow parses anything.

The pixel cap bounds memory, not time: decoding work also grows with how a file is laid out, and a small
file can multiply it. Measured on this machine (Pillow 13, libjpeg-turbo), before these limits:

- a progressive JPEG decodes its coefficient buffer once per scan; a scan of EOB runs covers a 64 MP
  image in ~50 bytes and costs ~4 ms, so 1,000 spliced scans took 4.1 s and a 0.35 MB file minutes;
- Pillow walks JPEG markers before the first scan, PNG chunks, GIF extension blocks and TIFF strip/tile
  offsets in Python: 1M JPEG comment markers took 3.1 s, 1M empty PNG chunks 6.2 s, an IDAT split into
  1-byte chunks ~20 µs a chunk (a 64 MiB file: minutes), 1M TIFF strips 5.9 s.

Each limit is far above what real encoders write (numbers in the constants' comments), so real files pass
and the worst accepted file costs well under a second more than its pixels do. WebP, BMP and AVIF are
parsed by C libraries in time linear in the file; animated GIF, WebP, PNG and TIFF yield their first frame
only, and the rest of the file is never decoded (``preprocess`` never seeks past frame 0).
"""

from __future__ import annotations

import re

# libjpeg's standard progression writes 10 scans (YCbCr), 6 (grey) or 18 (CMYK); mozjpeg's optimised
# scans ~10-20. libjpeg-turbo's own fuzzers and tools cap scans in the hundreds for the same reason.
MAX_JPEG_SCANS = 100
# Markers: a progressive file has ~2 per scan plus a few tables and APPn segments (an ICC profile is at
# most 255 APP2 chunks). Pillow reads the ones before the first scan in Python, ~3 µs each.
MAX_JPEG_SEGMENTS = 4096
MAX_JPEG_EXTRANEOUS = 65536  # stray bytes between markers (libjpeg warns; Pillow skips them byte by byte)
# libpng writes 8 KiB IDAT chunks: a 64 MiB PNG has ~8,200 chunks. Pillow spends ~20 µs a chunk.
MAX_PNG_CHUNKS = 16384
MAX_GIF_EXTENSIONS = 1024  # extension blocks before the first image (real files: 1-4)
MAX_TIFF_BLOCKS = 65536  # strips or tiles of the first image (a 64 MiB file in 1 KiB strips has 65,536)
MAX_TIFF_TAGS = 4096  # entries of the first IFD (real files: 10-100)

# One literal byte first, so the regex engine skips ahead at memchr speed (``\xff+`` was 20x slower):
# fill bytes before a marker match at the last 0xFF of the run.
_JPEG_MARKER = re.compile(rb"\xff([^\x00\xff])")
_JPEG_SCAN_END = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")  # entropy data ends at a marker that is not RSTn
_JPEG_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # TEM, RST0-7: no length field
_JPEG_EOI, _JPEG_SOS = 0xD9, 0xDA
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_TIFF_MAGIC = {
    b"II*\x00": ("<", False),
    b"MM\x00*": (">", False),
    b"II+\x00": ("<", True),
    b"MM\x00+": (">", True),
}


class DecodeWorkError(ValueError):
    """A file whose structure would make decoding take far longer than its pixels justify."""


def check_decode_work(data: bytes) -> None:
    """Raise DecodeWorkError if ``data``'s structure exceeds a limit above; cost is linear in the bytes
    walked and stops at the first limit. Malformed structure is left for the decoder to report."""
    if data[:3] == b"\xff\xd8\xff":
        _check_jpeg(data)
    elif data[:8] == _PNG_SIGNATURE:
        _check_png(data)
    elif data[:6] in (b"GIF87a", b"GIF89a"):
        _check_gif(data)
    elif data[:4] in _TIFF_MAGIC:
        _check_tiff(data)


def _check_jpeg(data: bytes) -> None:
    """Count segments, scans and stray bytes up to the first EOI (an MPO's later pictures are not read)."""
    pos, segments, scans, extraneous = 2, 0, 0, 0
    while (m := _JPEG_MARKER.search(data, pos)) is not None:
        if m.start() > pos:  # fill bytes (0xFF) are allowed; anything else is stray
            extraneous += len(data[pos : m.start()].rstrip(b"\xff"))
        segments += 1
        if extraneous > MAX_JPEG_EXTRANEOUS:
            raise DecodeWorkError(f"JPEG has over {MAX_JPEG_EXTRANEOUS:,} stray bytes between its markers")
        if segments > MAX_JPEG_SEGMENTS:
            raise DecodeWorkError(f"JPEG has over {MAX_JPEG_SEGMENTS:,} markers")
        marker, pos = m.group(1)[0], m.end()
        if marker == _JPEG_EOI:
            return
        if marker in _JPEG_STANDALONE:
            continue
        pos += int.from_bytes(data[pos : pos + 2], "big")
        if marker == _JPEG_SOS:
            scans += 1
            if scans > MAX_JPEG_SCANS:
                raise DecodeWorkError(
                    f"JPEG has over {MAX_JPEG_SCANS} scans (real encoders write at most ~20; each scan is "
                    "another pass over the whole image)"
                )
            end = _JPEG_SCAN_END.search(data, pos)
            if end is None:
                return
            pos = end.start()


def _check_png(data: bytes) -> None:
    pos, chunks = len(_PNG_SIGNATURE), 0
    while pos + 8 <= len(data):
        chunks += 1
        if chunks > MAX_PNG_CHUNKS:
            raise DecodeWorkError(f"PNG has over {MAX_PNG_CHUNKS:,} chunks")
        if data[pos + 4 : pos + 8] == b"IEND":
            return
        pos += 12 + int.from_bytes(data[pos : pos + 4], "big")


def _check_gif(data: bytes) -> None:
    """Extension blocks before the first image (Pillow walks them, and their sub-blocks, in Python)."""
    flags = data[10] if len(data) > 10 else 0
    pos = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)  # after the global colour table
    extensions = 0
    while pos < len(data) and data[pos] == 0x21:
        extensions += 1
        if extensions > MAX_GIF_EXTENSIONS:
            raise DecodeWorkError(f"GIF has over {MAX_GIF_EXTENSIONS:,} extension blocks before its image")
        pos += 2
        while pos < len(data) and data[pos]:
            pos += data[pos] + 1
        pos += 1


def _check_tiff(data: bytes) -> None:
    """The first IFD's entry count and the number of strips or tiles (Pillow lists each in Python)."""
    order, big = _TIFF_MAGIC[data[:4]]
    word, count_size, entry_size = (8, 8, 20) if big else (4, 2, 12)

    def uint(at: int, size: int) -> int:
        return int.from_bytes(data[at : at + size], "little" if order == "<" else "big")

    ifd = uint(8 if big else 4, word)
    entries = uint(ifd, count_size)
    if entries > MAX_TIFF_TAGS:
        raise DecodeWorkError(f"TIFF directory has {entries:,} entries (limit {MAX_TIFF_TAGS:,})")
    for i in range(entries):
        at = ifd + count_size + i * entry_size
        if at + entry_size > len(data):
            return
        if uint(at, 2) in (273, 324):  # StripOffsets, TileOffsets
            blocks = uint(at + 4, word)
            if blocks > MAX_TIFF_BLOCKS:
                raise DecodeWorkError(
                    f"TIFF image is stored in {blocks:,} strips or tiles (limit {MAX_TIFF_BLOCKS:,})"
                )
