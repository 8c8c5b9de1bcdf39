"""A dataset's content hash: the one definition the server records and the client computes.

The server stores it as a dataset's `content_hash` and reuses an owner's dataset with the same
hash instead of storing a second copy; `loraq batch` finds a dataset by it and derives its jobs'
Idempotency-Keys from it. Both sides import this module (standard library only), so they cannot
drift apart.

The hash covers the files of an upload as the server unpacks it, before any checking:

- a folder or a zip: every file, named by its path relative to the dataset's root (posix
  separators), where the root is the one top-level folder when everything sits in a single
  folder (as the server descends into it); a zip's names are read as the server's extraction
  writes them (backslashes are separators, empty and `.` parts dropped, a later entry with the
  same name wins);
- many files (a multipart upload without a zip): the flat names the server gives them;
- hidden files (a part starting with `.`, or `__MACOSX`) are left out everywhere.

It is the sha256 over one line per file, sorted by name: `name NUL sha256-of-its-bytes LF`
(per-file digests, so the server reuses them for its report instead of reading the files twice).
"""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

CHUNK = 1 << 20

Opener = Callable[[], BinaryIO]


def hidden(part: str) -> bool:
    return part.startswith(".") or part == "__MACOSX"


def file_sha256(opener: Opener) -> str:
    digest = hashlib.sha256()
    with opener() as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def combine(digests: Iterable[tuple[str, str]]) -> str:
    """The content hash from (relative posix name, sha256 hex of its bytes) of every file."""
    digest = hashlib.sha256()
    for name, file_digest in sorted(digests):
        digest.update(name.encode("utf-8", "surrogateescape") + b"\0" + file_digest.encode() + b"\n")
    return digest.hexdigest()


def content_hash(members: Iterable[tuple[str, Opener]]) -> str:
    """The content hash of (relative posix name, opener) of every file."""
    return combine((name, file_sha256(opener)) for name, opener in members)


def _strip_single_root(names: list[str], dirs: Iterable[str] = ()) -> str:
    """The prefix ("top/") to drop when every visible entry lives under one top-level folder."""
    tops = {name.split("/", 1)[0] for name in [*names, *dirs]}
    if len(tops) != 1:
        return ""
    top = next(iter(tops))
    if any(name == top for name in names):  # a file, not a folder
        return ""
    return top + "/"


def folder_members(folder: str | Path, descend: bool = True) -> list[tuple[str, Opener]]:
    """(name, opener) of a folder's visible files, named relative to the dataset's root: the
    folder itself, or with `descend` its one sub-folder when that holds everything (a local
    folder is uploaded as a zip of its visible files, and the server descends so into it)."""
    folder = Path(folder)
    files = []
    for path in folder.rglob("*"):
        rel = path.relative_to(folder)
        if path.is_file() and not any(hidden(part) for part in rel.parts):
            files.append((rel.as_posix(), path))
    prefix = _strip_single_root([name for name, _ in files]) if descend else ""
    return [(name[len(prefix):], (lambda path=path: open(path, "rb"))) for name, path in files]


def _zip_name(raw: str) -> str:
    return "/".join(part for part in raw.replace("\\", "/").split("/") if part not in ("", "."))


def zip_members(archive: zipfile.ZipFile) -> list[tuple[str, Opener]]:
    """(name, opener) of a zip's visible files, named as the server's extraction places them."""
    files: dict[str, zipfile.ZipInfo] = {}
    dirs: set[str] = set()
    for info in archive.infolist():
        name = _zip_name(info.filename)
        if not name or hidden(name.split("/", 1)[0]):
            continue
        if "/" in name or info.is_dir():  # the server sees this top-level folder, even if only
            dirs.add(name.split("/", 1)[0])  # hidden files sit in it
        if not info.is_dir() and not any(hidden(part) for part in name.split("/")):
            files[name] = info  # a later entry overwrites an earlier one, as extraction does
    prefix = _strip_single_root(list(files), dirs)
    return [(name[len(prefix):], (lambda info=info: archive.open(info))) for name, info in files.items()]


def dataset_fingerprint(path: str | Path) -> str:
    """The content hash of a local folder or zip: what the server records when it is uploaded."""
    path = Path(path)
    if path.is_dir():
        return content_hash(folder_members(path))
    with zipfile.ZipFile(path) as archive:
        return content_hash(zip_members(archive))


def legacy_content_hash(path: str | Path) -> str:
    """The `content_hash` servers recorded before this definition (sha256 over the sorted sha256s
    of the files' bytes, names left out), for finding datasets uploaded before it."""
    path = Path(path)
    if path.is_dir():
        hashes = [file_sha256(opener) for _name, opener in folder_members(path)]
    else:
        with zipfile.ZipFile(path) as archive:
            hashes = [file_sha256(opener) for _name, opener in zip_members(archive)]
    return hashlib.sha256("\n".join(sorted(hashes)).encode()).hexdigest()
