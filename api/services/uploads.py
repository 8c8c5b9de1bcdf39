"""Receiving a multipart upload straight to disk, counting bytes and files as they arrive.

Starlette's own form parser spools every file with no cap on the total (RELIABILITY.md A16), so
the upload route reads the raw body here instead: each file part goes to its own file in the
staging folder in chunks, and the upload stops with 413 as soon as it passes the limits.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
import anyio
from python_multipart import MultipartParser
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import parse_options_header
from starlette.requests import Request

from loraq.errors import BadRequest, Invalid, TooLarge, UnsupportedMedia
from loraq.settings import Settings

FILES_FIELD = "files"
NAME_FIELD = "name"
MAX_NAME_CHARS = 200  # the `name` field, as the OpenAPI schema documents it
MAX_FIELD_BYTES = 1000  # ... and its bytes while it streams in
MAX_HEADER_BYTES = 16 * 1024  # all headers of one part
FLUSH_BYTES = 1 << 20  # buffered file data written in a worker thread past this
_DRIVE = re.compile(r"^[A-Za-z]:")
ZIP_TYPES = {"application/zip", "application/x-zip-compressed"}


@dataclass
class UploadedFile:
    filename: str  # as the client named it (checked by `check_name`)
    path: Path  # where its bytes are
    content_type: str = ""
    size: int = 0

    @property
    def is_zip(self) -> bool:
        """Sent as a zip (by name or type); whether it really is one is checked when it is opened."""
        return self.filename.lower().endswith(".zip") or self.content_type in ZIP_TYPES


@dataclass
class Upload:
    files: list[UploadedFile] = field(default_factory=list)
    name: str | None = None


def check_name(name: str) -> str:
    """Refuse an uploaded file name that is absolute or climbs out with `..`."""
    posix = name.replace("\\", "/")
    if posix.startswith("/") or _DRIVE.match(posix):
        raise BadRequest(f"file name {name!r}: absolute paths are not allowed")
    if ".." in posix.split("/"):
        raise BadRequest(f"file name {name!r}: '..' is not allowed")
    if any(ord(char) < 32 for char in posix):
        raise BadRequest(f"file name {name!r}: control characters are not allowed")
    return name


def check_content_length(request: Request, settings: Settings) -> None:
    """Refuse a body announced as too large before reading any of it."""
    length = request.headers.get("content-length")
    if length is None:
        return
    if not length.isdigit():
        raise BadRequest(f"Content-Length {length!r} is not a byte count")
    if int(length) > settings.max_upload_bytes:
        raise TooLarge(f"upload of {int(length)} bytes is over the limit of {settings.max_upload_bytes} bytes")


class _Receiver:
    """python-multipart callbacks that write file parts to `folder` and keep the `name` field."""

    def __init__(self, folder: Path, max_files: int, max_file_bytes: int):
        self.folder = folder
        self.max_files = max_files
        self.max_file_bytes = max_file_bytes
        self.upload = Upload()
        self.ended = False
        self._headers: dict[bytes, bytes] = {}
        self._header_name = b""
        self._header_value = b""
        self._header_bytes = 0
        self._field: bytearray | None = None
        self._file: UploadedFile | None = None
        # File data waits here for `flush`, which opens, appends and closes each file in a thread:
        # no descriptor stays open between flushes, however many small files one chunk holds.
        self._pending: list[tuple[Path, bytes]] = []
        self._pending_bytes = 0

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self.on_part_begin, "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end, "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value, "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished, "on_end": self.on_end,
        }

    def on_part_begin(self) -> None:
        self._headers, self._header_bytes = {}, 0
        self._field, self._file = None, None

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._count_header(end - start)
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._count_header(end - start)
        self._header_value += data[start:end]

    def _count_header(self, size: int) -> None:
        self._header_bytes += size
        if self._header_bytes > MAX_HEADER_BYTES:
            raise BadRequest("a multipart part has over 16 KiB of headers")

    def on_header_end(self) -> None:
        self._headers[self._header_name.strip().lower()] = self._header_value.strip()
        self._header_name, self._header_value = b"", b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        if b"name" not in options:
            raise BadRequest("a multipart part has no field name")
        field_name = _decode(options[b"name"])
        if b"filename" not in options:
            if field_name == FILES_FIELD:
                raise Invalid(f"{FILES_FIELD}: a part without a filename (send files, not text)")
            if field_name != NAME_FIELD:
                raise Invalid(f"{field_name}: unknown form field (expected '{FILES_FIELD}' and '{NAME_FIELD}')")
            self._field = bytearray()
            return
        if field_name != FILES_FIELD:
            raise Invalid(f"{field_name}: files go in the form field '{FILES_FIELD}'")
        filename = _decode(options[b"filename"])
        if not filename:  # an empty file input in a browser form
            return
        if len(self.upload.files) >= self.max_files:
            raise TooLarge(f"more than {self.max_files} files in one upload")
        self._file = UploadedFile(check_name(filename), self.folder / f"{len(self.upload.files):06d}",
                                  content_type=_decode(self._headers.get(b"content-type", b"")).lower())
        self._pending.append((self._file.path, b""))  # an empty file is still a file
        self.upload.files.append(self._file)

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._field is not None:
            self._field += data[start:end]
            if len(self._field) > MAX_FIELD_BYTES:
                raise Invalid(f"{NAME_FIELD}: longer than {MAX_FIELD_BYTES} bytes")
        elif self._file is not None:
            self._pending.append((self._file.path, data[start:end]))
            self._pending_bytes += end - start
            self._file.size += end - start
            # A zip is a whole dataset: its entries get the one-file limit when it is opened.
            if self._file.size > self.max_file_bytes and not self._file.is_zip:
                raise TooLarge(f"{self._file.filename}: over the limit for one file of {self.max_file_bytes} bytes "
                               "(LORAQ_MAX_FILE_BYTES)")

    def on_part_end(self) -> None:
        if self._field is not None:
            name = _decode(bytes(self._field))
            if len(name) > MAX_NAME_CHARS:
                raise Invalid(f"{NAME_FIELD}: longer than {MAX_NAME_CHARS} characters")
            name = name.strip()
            if any(ord(char) < 32 or ord(char) == 127 for char in name):
                raise Invalid(f"{NAME_FIELD}: control characters are not allowed")
            self.upload.name = name or None

    def on_end(self) -> None:
        self.ended = True

    @property
    def should_flush(self) -> bool:
        return self._pending_bytes >= FLUSH_BYTES

    def flush(self) -> None:
        """Append the buffered data to its files (blocking: run it in a thread)."""
        handle, current = None, None
        try:
            for path, data in self._pending:
                if path != current:
                    if handle is not None:
                        handle.close()
                    handle, current = open(path, "ab"), path  # noqa: SIM115 - closed here
                handle.write(data)
        finally:
            if handle is not None:
                handle.close()
        self._pending, self._pending_bytes = [], 0


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


async def receive_upload(request: Request, folder: Path, settings: Settings) -> Upload:
    """Stream the multipart body into `folder`: one file per part, the `name` field kept.

    Raises TooLarge past `max_upload_bytes` (body bytes), `max_upload_files` or `max_file_bytes`
    (one file's bytes), BadRequest on a
    bad file name or a malformed or truncated body, UnsupportedMedia if it is not multipart.
    """
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data":
        raise UnsupportedMedia("send multipart/form-data with the files in the form field 'files'")
    if not params.get(b"boundary"):
        raise BadRequest("multipart/form-data without a boundary")
    check_content_length(request, settings)
    folder.mkdir(parents=True, exist_ok=True)
    receiver = _Receiver(folder, settings.max_upload_files, settings.max_file_bytes)
    parser = MultipartParser(params[b"boundary"], receiver.callbacks())
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > settings.max_upload_bytes:
                raise TooLarge(f"upload is over the limit of {settings.max_upload_bytes} bytes")
            parser.write(chunk)
            if receiver.should_flush:
                await anyio.to_thread.run_sync(receiver.flush)
        parser.finalize()
        await anyio.to_thread.run_sync(receiver.flush)
    except FormParserError as error:
        raise BadRequest(f"malformed multipart body: {error}") from None
    if not receiver.ended:
        raise BadRequest("the multipart body ended before its closing boundary (interrupted upload?)")
    return receiver.upload
