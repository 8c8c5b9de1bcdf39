"""Hostile clients, in one place: upload payloads the API must refuse, and request races.

Every builder returns plain bytes, so the same payload goes through the in-process TestClient
(tests/api) and through a real uvicorn (tests/faults). `hostile_uploads(limits)` lists each
hostile upload with the status and the words its refusal must carry.
"""

from __future__ import annotations

import io
import random
import stat
import struct
import threading
import zipfile
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from PIL import Image

BOUNDARY = "loraqtestboundary"


# --------------------------------------------------------------------------------------------
# Building blocks


def png(width: int = 32, height: int = 32, color=(200, 30, 30), fmt: str = "PNG") -> bytes:
    """A small real image (PNG unless `fmt` says otherwise)."""
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, fmt)
    return buffer.getvalue()


def noise_png(size: int = 64) -> bytes:
    """A PNG of random pixels: it does not compress, so it holds over size*size*3 bytes."""
    buffer = io.BytesIO()
    Image.frombytes("RGB", (size, size), random.Random(size).randbytes(size * size * 3)).save(buffer, "PNG")
    return buffer.getvalue()


def zip_of(entries: dict[str, bytes | str], compression: int = zipfile.ZIP_STORED) -> bytes:
    """A zip archive of {name: data}; names are kept exactly as given (`..`, `/abs`, `C:`)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in entries.items():
            archive.writestr(zipfile.ZipInfo(name), data, compress_type=compression)
    return buffer.getvalue()


def multipart(parts: list[tuple[str, str | None, bytes]], boundary: str = BOUNDARY,
              part_headers: dict[str, str] | None = None) -> tuple[bytes, dict[str, str]]:
    """A hand-made multipart body from (field, filename or None, data), sent as it is (no name
    cleaning); `part_headers` go on every part. Returns (body, request headers)."""
    extra = "".join(f"{key}: {value}\r\n" for key, value in (part_headers or {}).items())
    body = b""
    for field_name, filename, data in parts:
        disposition = f'form-data; name="{field_name}"' + (f'; filename="{filename}"' if filename is not None else "")
        body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n{extra}\r\n".encode() + data + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def file_part(name: str, data: bytes, content_type: str) -> tuple[bytes, dict[str, str]]:
    """One file in the field 'files' with its own Content-Type header (a lie, if need be)."""
    return multipart([("files", name, data)], part_headers={"Content-Type": content_type})


# --------------------------------------------------------------------------------------------
# Hostile payloads


def special_entry_zip(name: str, mode: int, data: bytes | str = b"") -> bytes:
    """A zip whose entry `name` claims a Unix file type (`stat.S_IFLNK`, `S_IFCHR`, `S_IFIFO`...)
    in its external attributes, as `zip --symlinks` or a crafted archive records it."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        info = zipfile.ZipInfo(name)
        info.create_system = 3  # Unix: the attributes' high 16 bits are st_mode
        info.external_attr = (mode | 0o777) << 16
        archive.writestr(info, data)
    return buffer.getvalue()


def symlink_zip(name: str = "link.png", target: str = "/etc/passwd") -> bytes:
    return special_entry_zip(name, stat.S_IFLNK, target)


def pixel_bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A few hundred bytes whose PNG header declares `width` x `height` pixels (decoding it would
    need width*height*3 bytes of memory)."""
    data = bytearray(png(1, 1))
    # The IHDR chunk: length at 8, type at 12, width and height at 16 and 20, CRC after 13 bytes.
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def zip_bomb(expanded: int, name: str = "zeros.png") -> bytes:
    """About a thousandth of `expanded` bytes that inflate to `expanded` zero bytes."""
    return zip_of({name: b"\0" * expanded}, zipfile.ZIP_DEFLATED)


def lying_size_zip(real: int = 1_000_000, declared: int = 100) -> bytes:
    """A valid image beside `zeros.txt`, which holds `real` bytes but declares `declared` in both
    of its headers (so a check of the declared sizes alone lets it through)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("a.png", png())
        archive.writestr("a.txt", "a caption")
        archive.writestr("zeros.txt", b"\0" * real, compress_type=zipfile.ZIP_DEFLATED)
    data = buffer.getvalue()
    true_size, lie = struct.pack("<I", real), struct.pack("<I", declared)
    assert data.count(true_size) == 2, "the size must appear once per header"
    return data.replace(true_size, lie)



def many_files_zip(count: int) -> bytes:
    return zip_of({f"{n:05d}.png": png(4, 4, (n % 256, 0, 0)) for n in range(count)})


# --------------------------------------------------------------------------------------------
# The hostile uploads


@dataclass(frozen=True)
class Limits:
    """The upload limits a test service runs with (LORAQ_MAX_UPLOAD_BYTES and so on)."""

    max_upload_bytes: int = 64_000
    max_upload_files: int = 8
    max_file_bytes: int = 40_000
    max_compression_ratio: float = 20.0
    max_image_pixels: int = 1_000_000

    def settings(self) -> dict:
        return {"max_upload_bytes": self.max_upload_bytes, "max_upload_files": self.max_upload_files,
                "max_file_bytes": self.max_file_bytes, "max_compression_ratio": self.max_compression_ratio,
                "max_image_pixels": self.max_image_pixels}

    def environ(self) -> dict[str, str]:
        return {f"LORAQ_{key.upper()}": str(value) for key, value in self.settings().items()}


LIMITS = Limits()


@dataclass(frozen=True)
class HostileUpload:
    """One POST /v1/datasets that must be refused with `status` and a message holding `message`."""

    name: str
    body: bytes
    headers: dict[str, str]
    status: int
    message: str
    chunked: bool = False  # sent without Content-Length, so only counting while reading catches it

    def request(self) -> dict:
        """Keyword arguments for `client.post("/v1/datasets", **upload.request())`."""
        content = self.body
        if self.chunked:
            content = _chunks(self.body)
        return {"content": content, "headers": self.headers}


def _chunks(body: bytes, size: int = 4096) -> Iterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start:start + size]


def _zip_upload(name: str, archive: bytes, status: int, message: str, **extra) -> HostileUpload:
    body, headers = file_part("data.zip", archive, "application/zip")
    return HostileUpload(name, body, headers, status, message, **extra)


def _files_upload(name: str, files: list[tuple[str, bytes]], status: int, message: str, **extra) -> HostileUpload:
    body, headers = multipart([("files", filename, data) for filename, data in files])
    return HostileUpload(name, body, headers, status, message, **extra)


def hostile_uploads(limits: Limits = LIMITS) -> list[HostileUpload]:
    """Every hostile upload, for a service running with `limits`."""
    # Two files, each under the one-file limit, together over the body limit
    half = noise_png(int((limits.max_upload_bytes / 6) ** 0.5) + 8)
    assert limits.max_upload_bytes < 2 * len(half) and len(half) < limits.max_file_bytes
    body_too_big, multipart_headers = multipart([("files", "big-1.png", half), ("files", "big-2.png", half)])
    one_big = noise_png(int((limits.max_file_bytes / 3) ** 0.5) + 8)
    assert limits.max_file_bytes < len(one_big) < limits.max_upload_bytes
    headers_bomb, _ = multipart([("files", "a.png", png())], part_headers={"X-Pad": "x" * 17_000})
    truncated, _ = multipart([("files", "a.png", png())])
    gif = png(8, 8, fmt="GIF")
    max_pixels = limits.max_image_pixels
    return [
        # Archive entries that would land outside the dataset folder
        _zip_upload("zip entry with ..", zip_of({"../evil.png": png()}), 400, "'../evil.png' points outside the archive"),
        _zip_upload("zip entry with ..\\", zip_of({"..\\evil.png": png()}), 400, "points outside the archive"),
        _zip_upload("zip entry with an absolute path", zip_of({"/etc/evil.png": png()}), 400,
                    "'/etc/evil.png' points outside the archive"),
        _zip_upload("zip entry with a drive letter", zip_of({"C:/evil.png": png()}), 400, "points outside the archive"),
        # Entries that are not regular files
        _zip_upload("zip symlink entry", symlink_zip(), 400, "'link.png' is a symbolic link"),
        _zip_upload("zip character-device entry", special_entry_zip("tty.png", stat.S_IFCHR, png()), 400,
                    "entry 'tty.png' is a character device, not a regular file"),
        _zip_upload("zip fifo entry", special_entry_zip("pipe.png", stat.S_IFIFO, png()), 400,
                    "entry 'pipe.png' is a FIFO, not a regular file"),
        # Sizes and counts
        _zip_upload("zip bomb (expands past the byte limit)", zip_bomb(limits.max_upload_bytes * 16), 413,
                    f"expands to {limits.max_upload_bytes * 16} bytes; the limit is {limits.max_upload_bytes}"),
        _zip_upload("zip whose headers under-declare its sizes", lying_size_zip(), 422, "cannot be extracted"),
        _zip_upload("zip over the compression ratio limit",
                    zip_of({"a.png": png(), "a.txt": "x", "pad.txt": b"\0" * (limits.max_upload_bytes // 2)},
                           zipfile.ZIP_DEFLATED), 413,
                    f"over the limit of {limits.max_compression_ratio:g}:1 (LORAQ_MAX_COMPRESSION_RATIO)"),
        _zip_upload("zip entry over the one-file limit", zip_of({"a.png": png(), "big.png": one_big}), 413,
                    f"entry 'big.png' is {len(one_big)} bytes; the limit for one file is {limits.max_file_bytes}"),
        _files_upload("file over the one-file limit", [("big.png", one_big)], 413,
                      f"big.png: over the limit for one file of {limits.max_file_bytes} bytes"),
        _zip_upload("zip with too many files", many_files_zip(limits.max_upload_files + 1), 413,
                    f"holds {limits.max_upload_files + 1} files; the limit is {limits.max_upload_files}"),
        _files_upload("too many files", [(f"{n}.png", png(4, 4)) for n in range(limits.max_upload_files + 1)],
                      413, f"more than {limits.max_upload_files} files in one upload"),
        HostileUpload("body over the byte limit (Content-Length)", body_too_big, multipart_headers, 413,
                      f"over the limit of {limits.max_upload_bytes} bytes"),
        HostileUpload("body over the byte limit (chunked)", body_too_big, multipart_headers, 413,
                      f"over the limit of {limits.max_upload_bytes} bytes", chunked=True),
        # Pixel bombs: refused from the header, never decoded
        _zip_upload("pixel bomb in a zip", zip_of({"bomb.png": pixel_bomb_png()}), 422,
                    f"pixels is over the limit of {max_pixels}"),
        _files_upload("pixel bomb as an image", [("bomb.png", pixel_bomb_png(5000, 5000))], 422,
                      f"bomb.png: 5000x5000 pixels is over the limit of {max_pixels}"),
        # Content that lies about its type
        _files_upload("zip named .png", [("photo.png", zip_of({"a.png": png()}))], 422, "photo.png: not a readable image"),
        _files_upload("png named .zip", [("data.zip", png())], 415, "data.zip: not a zip archive"),
        HostileUpload("png sent as application/zip", *file_part("a.png", png(), "application/zip"), 415,
                      "a.png: not a zip archive"),
        _files_upload("gif named .png", [("anim.png", gif)], 422, "unsupported image format GIF"),
        _files_upload("html named .png", [("page.png", b"<html><script>alert(1)</script></html>")], 422,
                      "page.png: not a readable image"),
        # Names of uploaded files
        _files_upload("file name with ..", [("../a.png", png()), ("b.png", png())], 400, "'..' is not allowed"),
        _files_upload("absolute file name", [("/etc/a.png", png())], 400, "absolute paths are not allowed"),
        _files_upload("file name with a drive letter", [("C:/Windows/a.png", png())], 400,
                      "absolute paths are not allowed"),
        _files_upload("control character in a file name", [("a\x01.png", png())], 400,
                      "control characters are not allowed"),
        # Malformed bodies
        HostileUpload("part headers over 16 KiB", headers_bomb, multipart_headers, 400, "header size exceeded"),
        HostileUpload("body cut before its closing boundary", truncated[:-30], multipart_headers, 400,
                      "closing boundary"),
    ]


# --------------------------------------------------------------------------------------------
# Request races


def same_time(count: int, send: Callable[[int], object]) -> list:
    """`send(i)` for i in range(count), all released at once from `count` threads; the results."""
    barrier = threading.Barrier(count)

    def one(index: int):
        barrier.wait(timeout=30)
        return send(index)

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


def assert_one_created(responses) -> str:
    """Replays of one Idempotency-Key: exactly one 201, the rest 200, all the same job. Its id."""
    statuses = sorted(response.status_code for response in responses)
    assert statuses.count(201) == 1 and statuses.count(200) == len(responses) - 1, \
        [(r.status_code, r.text[:200]) for r in responses if r.status_code not in (200, 201)] or statuses
    ids = {response.json()["id"] for response in responses}
    assert len(ids) == 1, ids
    return ids.pop()
