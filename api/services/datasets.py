"""Datasets: an upload checked in a staging folder, then moved into place and recorded.

Steps of `create_dataset`: unpack (one zip, or many files flattened to safe names), drop hidden
files, hash the content (`loraq_client.fingerprint`, the definition the client uses too) and,
unless told not to, answer with the owner's dataset of the same content instead of storing a
second copy; else refuse images over the pixel limit from their header alone, decode every image
once with the trainer's own `inspect_folder`, remove the refused files, build the report, move
the folder to `datasets/<id>` and insert the row. Any error leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from PIL import Image
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.deps import visible
from api.schemas import DatasetDetail, DatasetReport, DatasetSummary, DatasetUploaded, RefusedFile
from api.services.dataset_report import build_report, caption_preview
from api.services.quotas import check_storage, check_storage_room, serialize
from api.services.uploads import Upload, UploadedFile
from loraq.auth import Principal
from loraq import object_store, storage
from loraq.errors import BadRequest, Conflict, Invalid, NotFound, TooLarge, UnsupportedMedia
from loraq.models import Dataset, Job, new_id
from loraq.settings import Settings
from loraq_client.fingerprint import combine, file_sha256, folder_members
from trainer.files import (
    IMAGE_EXTENSIONS, METADATA_FILE, DatasetError, Example, extract_zip, inspect_folder, load_rgb,
)

PREVIEW_DIR = ".loraq"  # hidden: the trainer skips it
THUMBNAILS = 4
THUMBNAIL_PX = 256
_UNSAFE = re.compile(r"[^\w.\-]+")


def new_staging_dir(settings: Settings) -> Path:
    return storage.uploads_root(settings) / uuid.uuid4().hex


def thumbnail_path(settings: Settings, dataset_id: str, n: int) -> Path:
    return storage.dataset_dir(settings, dataset_id) / PREVIEW_DIR / "thumbnails" / f"{n}.png"


def create_dataset(session: Session, settings: Settings, owner: str, upload: Upload, staging: Path,
                   dedupe: bool = True) -> tuple[Dataset, bool]:
    """Check the received files in `staging` and record them as a dataset (the caller removes
    staging). Returns (dataset, reused): with `dedupe`, an upload whose content hash matches one of
    `owner`'s datasets is answered with that dataset (the oldest) and nothing new is stored."""
    root, refused, flat = _unpack(upload, staging, settings)
    _remove_hidden(root)
    # Hashed as received (names and bytes), before any file is refused or rewritten: identical
    # uploads give the same hash, and the client can compute it from the folder it sends.
    digests = {name: file_sha256(opener) for name, opener in folder_members(root, descend=False)}
    content = combine(digests.items())
    if dedupe:
        existing = find_reusable(session, settings, owner, content)
        if existing is not None:
            return existing, True
        session.rollback()  # no connection held while every image is decoded
    if flat:
        _rewrite_metadata(root / METADATA_FILE, _flat_row)
    refused += _refuse_oversize(root, settings.max_image_pixels)
    examples, refused, warnings = _inspect(root, refused)
    # Each kept file's digest from above, but for the metadata.jsonl, the one file rewritten since.
    hashes = {}
    for path in _files(root):
        name = path.relative_to(root).as_posix()
        hashes[name] = digests[name] if name in digests and name != METADATA_FILE else storage.sha256_file(path)
    report = build_report(root, examples, hashes, refused, warnings)
    captions = caption_preview(root, examples)
    thumbnails = _write_thumbnails(root, examples)
    dataset_id = new_id()
    final = storage.dataset_dir(settings, dataset_id)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(root, final)
    store = object_store.from_settings(settings)
    try:
        total_bytes = sum(path.stat().st_size for path in _files(final))
        if store is not None:  # the store is the truth; this folder stays as this host's cache
            store.put_folder(final, f"datasets/{dataset_id}")
        dataset = Dataset(
            id=dataset_id, owner=owner, name=upload.name or _default_name(upload, dataset_id),
            image_count=report.image_count, captioned_count=report.captioned_count,
            total_bytes=total_bytes, content_hash=content, storage_path=str(final),
            report={**report.model_dump(mode="json"), "preview": {
                "thumbnails": thumbnails, "captions": [c.model_dump() for c in captions]}},
        )
        session.add(dataset)
        session.flush()
        # Two identical uploads racing past the first look: the owner's uploads are serialized
        # from here to their commit (as for the storage limit), so the later one finds the
        # earlier one's row now, drops its own copy and answers with that one.
        serialize(session, "storage", owner)
        if dedupe and (existing := find_reusable(session, settings, owner, content, exclude=dataset_id)):
            existing_id = existing.id
            session.rollback()
            shutil.rmtree(final, ignore_errors=True)
            object_store.remove(settings, f"datasets/{dataset_id}")
            return session.get(Dataset, existing_id), True
        check_storage(session, settings, owner, total_bytes)
        session.commit()
    except BaseException:
        session.rollback()
        shutil.rmtree(final, ignore_errors=True)
        object_store.remove(settings, f"datasets/{dataset_id}")
        raise
    return dataset, False


def find_reusable(session: Session, settings: Settings, owner: str, content: str,
                  exclude: str | None = None) -> Dataset | None:
    """`owner`'s oldest dataset with this content hash whose files are in place (never another
    owner's, whoever asks: an admin's upload reuses only the admin's own datasets)."""
    query = select(Dataset).where(Dataset.owner == owner, Dataset.content_hash == content)
    if exclude is not None:
        query = query.where(Dataset.id != exclude)
    store = object_store.from_settings(settings)
    for dataset in session.scalars(query.order_by(Dataset.created_at, Dataset.id)):
        stored = store.exists_prefix(f"datasets/{dataset.id}") if store else None
        if stored or (store is None and storage.dataset_dir(settings, dataset.id).is_dir()):
            return dataset
    return None


def check_room(session: Session, settings: Settings, owner: str, content: str | None) -> None:
    """The storage pre-check before an upload's body is read (413 when `owner` is already at the
    limit), skipped when the client says the upload's content hash and `owner` already has that
    dataset: it will be reused and adds nothing. The hash is only a hint: the body's own hash
    decides, and an upload that turns out new meets the exact check after it is received."""
    if content is not None and find_reusable(session, settings, owner, content) is not None:
        session.commit()  # no connection held while the body streams in
        return
    check_storage_room(session, settings, owner)


def _default_name(upload: Upload, dataset_id: str) -> str:
    first = upload.files[0].filename.replace("\\", "/").rsplit("/", 1)[-1]
    if len(upload.files) == 1 and upload.files[0].is_zip and first.lower() != ".zip":
        return (first[:-4] if first.lower().endswith(".zip") else first)[:200]
    return f"dataset-{dataset_id[:8]}"


# --------------------------------------------------------------------------------------------
# Unpacking


def _unpack(upload: Upload, staging: Path, settings: Settings) -> tuple[Path, list[RefusedFile], bool]:
    """The folder holding the upload's files, the files refused while placing them, and whether
    they were flattened (a metadata.jsonl's names then need the same mapping)."""
    files = upload.files
    if not files:
        raise Invalid("no files uploaded: send a zip, or images with .txt captions or a "
                      f"{METADATA_FILE}, in the form field 'files'")
    data = staging / "data"
    data.mkdir(parents=True)
    if len(files) == 1 and files[0].is_zip:
        return _extract(files[0], data, settings), [], False
    zips = [file.filename for file in files if file.is_zip]
    if zips:
        raise BadRequest(f"send one zip file on its own, or images and captions without a zip (got {zips[0]} "
                         f"among {len(files)} files)")
    if len(files) == 1 and PurePosixPath(files[0].filename).suffix.lower() not in IMAGE_EXTENSIONS:
        raise UnsupportedMedia(f"{files[0].filename}: expected a zip archive or an image (PNG, JPEG or WebP)")
    return data, _place_files(files, data), True


def _extract(file: UploadedFile, data: Path, settings: Settings) -> Path:
    if not zipfile.is_zipfile(file.path):
        raise UnsupportedMedia(f"{file.filename}: not a zip archive")
    try:
        with zipfile.ZipFile(file.path) as archive:
            entries = [info for info in archive.infolist() if not info.is_dir()]
        if len(entries) > settings.max_upload_files:
            raise TooLarge(f"{file.filename} holds {len(entries)} files; the limit is {settings.max_upload_files}")
        expanded = sum(info.file_size for info in entries)
        if expanded > settings.max_upload_bytes:
            raise TooLarge(f"{file.filename} expands to {expanded} bytes; the limit is {settings.max_upload_bytes}")
        _check_entries(file.filename, entries, expanded, settings)
        extract_zip(file.path, data)
    except DatasetError as error:  # an entry with ../, an absolute path or a link
        raise BadRequest(str(error)) from None
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError, ValueError) as error:
        raise Invalid(f"{file.filename}: cannot be extracted ({error})") from None
    file.path.unlink()
    entries = [path for path in data.iterdir() if not _hidden(path.name)]
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else data


def _check_entries(archive: str, entries: list[zipfile.ZipInfo], expanded: int, settings: Settings) -> None:
    """Refuse a zip with one entry over the single-file limit, or that inflates past the ratio
    limit (read from the headers, before anything is extracted; sizes that lie fail the CRC)."""
    largest = max(entries, key=lambda info: info.file_size, default=None)
    if largest is not None and largest.file_size > settings.max_file_bytes:
        raise TooLarge(f"{archive}: entry {largest.filename!r} is {largest.file_size} bytes; the limit for one "
                       f"file is {settings.max_file_bytes} (LORAQ_MAX_FILE_BYTES)")
    compressed = sum(info.compress_size for info in entries)
    ratio = expanded / max(compressed, 1)
    if ratio > settings.max_compression_ratio:
        raise TooLarge(f"{archive}: compression ratio {ratio:.0f}:1 is over the limit of "
                       f"{settings.max_compression_ratio:g}:1 (LORAQ_MAX_COMPRESSION_RATIO); is it a zip bomb?")


def flat_name(name: str) -> str | None:
    """A flat, safe file name for an uploaded `dir/a b.png` (`dir_a_b.png`); None for hidden files."""
    parts = [part for part in name.replace("\\", "/").split("/") if part not in ("", ".")]
    if not parts or any(_hidden(part) for part in parts):
        return None
    joined = PurePosixPath(_UNSAFE.sub("_", "_".join(parts)))
    return joined.stem[:120] + joined.suffix[:20]


def _place_files(files: list[UploadedFile], data: Path) -> list[RefusedFile]:
    """Move each received file to its flat name (the caller maps metadata.jsonl's names the same
    way, once the upload is hashed)."""
    refused = []
    for file in files:
        name = flat_name(file.filename)
        if name is None:
            file.path.unlink()
            continue
        if (data / name).exists():
            refused.append(RefusedFile(file=file.filename, reason=f"same name as another file ({name})"))
            file.path.unlink()
            continue
        os.replace(file.path, data / name)
    return refused


def _flat_row(row: dict) -> dict | None:
    name = flat_name(str(row["file_name"]))
    return {**row, "file_name": name} if name else None


def _rewrite_metadata(path: Path, change) -> None:
    """Apply `change` to every row of a metadata.jsonl (None drops the row); bad lines stay as they are."""
    if not path.is_file():
        return
    lines = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
            row = change(row)
        except (json.JSONDecodeError, KeyError, TypeError):
            lines.append(line)
            continue
        if row is not None:
            lines.append(json.dumps(row, ensure_ascii=False))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------
# Checking


def _hidden(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


def _remove_hidden(root: Path) -> None:
    for path in sorted(root.rglob("*"), reverse=True):
        if _hidden(path.name):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()


def _files(root: Path) -> list[Path]:
    return sorted(path for path in root.rglob("*") if path.is_file()
                  and not any(_hidden(part) for part in path.relative_to(root).parts))


def _refuse_oversize(root: Path, max_pixels: int) -> list[RefusedFile]:
    """Remove images whose header says they are over `max_pixels`, without decoding them."""
    refused = []
    for path in _files(root):
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        try:
            with Image.open(path) as image:  # reads the header only
                width, height = image.size
        except Image.DecompressionBombError:
            width = height = max_pixels + 1
        except Exception:  # noqa: BLE001 - unreadable: inspect_folder reports it with its reason
            continue
        if width * height > max_pixels:
            refused.append(RefusedFile(file=path.relative_to(root).as_posix(),
                                       reason=f"{width}x{height} pixels is over the limit of {max_pixels}"))
            path.unlink()
    return refused


def _inspect(root: Path, refused: list[RefusedFile]) -> tuple[list[Example], list[RefusedFile], list[str]]:
    """Decode every image once; remove refused files and keep metadata rows of accepted images only."""
    try:
        examples, problems = inspect_folder(root, missing_captions="empty")
    except DatasetError as error:  # a malformed metadata.jsonl
        raise Invalid(str(error)) from None
    warnings = []
    for problem in problems:
        name, _, reason = problem.partition(": ")
        if name == METADATA_FILE:
            warnings.append(problem)
        else:
            refused.append(RefusedFile(file=name, reason=reason))
            (root / name).unlink(missing_ok=True)
    if not examples:
        listed = "; ".join(f"{r.file}: {r.reason}" for r in refused[:20])
        if refused:
            raise Invalid(f"no usable images: {len(refused)} file(s) refused: {listed}")
        raise Invalid("no images found: the upload holds no PNG, JPEG or WebP files")
    refused_names = {r.file for r in refused}
    warnings = [w for w in warnings if w.split(": ")[1] not in refused_names]
    accepted = {example.path.relative_to(root).as_posix() for example in examples}
    _rewrite_metadata(root / METADATA_FILE,
                      lambda row: row if PurePosixPath(row["file_name"]).as_posix() in accepted else None)
    return examples, refused, warnings


def _write_thumbnails(root: Path, examples: list[Example]) -> int:
    folder = root / PREVIEW_DIR / "thumbnails"
    folder.mkdir(parents=True)
    for n, example in enumerate(examples[:THUMBNAILS]):
        image = load_rgb(example.path)
        image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
        image.save(folder / f"{n}.png")
    return min(len(examples), THUMBNAILS)


# --------------------------------------------------------------------------------------------
# Reading and deleting


def list_datasets(session: Session, principal: Principal, limit: int, offset: int,
                  content_hash: str | None = None) -> tuple[list[Dataset], int]:
    query = select(Dataset).where(visible(Dataset, principal))
    if content_hash is not None:
        query = query.where(Dataset.content_hash == content_hash)
    total = session.scalar(select(func.count()).select_from(query.subquery()))
    items = session.scalars(query.order_by(Dataset.created_at.desc(), Dataset.id).limit(limit).offset(offset))
    return list(items), total


def delete_dataset(session: Session, settings: Settings, dataset: Dataset) -> None:
    """Delete the row and files; 409 while any job (finished ones too) refers to the dataset."""
    jobs = session.scalar(select(func.count()).select_from(Job).where(Job.dataset_id == dataset.id))
    if jobs:
        raise Conflict(f"dataset {dataset.name!r} ({dataset.id}) is used by {jobs} job(s); delete those jobs "
                       f"first (GET /v1/jobs?dataset_id={dataset.id} lists them)")
    session.delete(dataset)
    try:
        session.commit()
    except IntegrityError as error:  # a job was created meanwhile (foreign key)
        session.rollback()
        raise Conflict(f"dataset {dataset.id} could not be deleted: it is in use") from error
    shutil.rmtree(storage.dataset_dir(settings, dataset.id), ignore_errors=True)
    object_store.remove(settings, f"datasets/{dataset.id}")


def require_thumbnail(settings: Settings, dataset: Dataset, n: int) -> Path:
    path = thumbnail_path(settings, dataset.id, n)
    store = object_store.from_settings(settings)
    if store is not None and not path.is_file() and n < dataset.report.get("preview", {}).get("thumbnails", 0):
        # Uploaded through another API host: fetch it into this host's cache once.
        store.get_file(object_store.relative(settings, path), path)
    if not path.is_file():
        raise NotFound(f"dataset {dataset.id} has no thumbnail {n}")
    return path


def dataset_detail(dataset: Dataset, reused: bool | None = None) -> DatasetDetail:
    """The dataset as GET shows it; as an upload's answer (`reused` given) with that flag."""
    preview = dataset.report.get("preview", {})
    extra = {} if reused is None else {"reused": reused}
    return (DatasetDetail if reused is None else DatasetUploaded)(
        **extra,
        **DatasetSummary.model_validate(dataset, from_attributes=True).model_dump(),
        report=DatasetReport.model_validate(dataset.report),
        thumbnails=[f"/v1/datasets/{dataset.id}/thumbnails/{n}" for n in range(preview.get("thumbnails", 0))],
        captions=preview.get("captions", []),
    )
