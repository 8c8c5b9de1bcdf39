"""The latent cache: VAE posteriors and text conditioning, kept so later uses skip the encoders.

What it holds. Per image and orientation (plain, mirrored) the VAE's posterior *parameters*
(mean and log-variance, not a sample: the loop samples them anew each step with the same random
draws as the uncached loop); per caption the text conditioning (SD: `encoder_hidden_states`).
With aspect-ratio buckets each bucket size is a kind of its own (`latent-{w}x{h}`): a kind's
records share one layout, and each bucket's latents have their own shape.

When it fills. As the loop goes: an image is encoded the first time a batch needs it (the
uncached loop's work, no more), later uses read it. Where an up-front pass pays (see
`choose_upfront`) every missing entry is encoded before the first step, reported by `prepare`
events.

Where it lives. In RAM up to a budget (`cache_ram_mb`); past it entries go to a record file on
disk, read back with `pread` (not a memory map, so pages read never count against the process's
resident memory). Without `cache_dir` that file is private (in the run's
output folder, since /tmp may be RAM) and removed at the end. With
`cache_dir` (the worker passes one shared root) the cache is kept for later runs:

    {cache_dir}/v1/{key}/seg-{time_ns}-{id}/   published segments, immutable, each complete
        index.json    layouts and entry -> record number, per kind ("latent", "text")
        latent.bin    fixed-size records (raw bytes of each tensor, in the layout's order)
        text.bin
        COMPLETE      written last; a segment without it is never read
    {cache_dir}/v1/{key}/.tmp-{host}-{pid}-{id}/   a segment being written (never read)
    {cache_dir}/.lock                           flock for eviction

`key` hashes everything the entries depend on besides the image itself: the model's encoders
(the files' sizes and modification times, their configs' content), resolution, crop,
interpolation, dtype, device type and the family. An image entry's own key is the sha256 of the
file's bytes plus the orientation, a caption's the sha256 of its text: an edited image is a new
entry whatever its name, size and modification time; the same images anywhere (a sweep over one
dataset, a second upload, a copy) share every entry. Each file is read and hashed once per run.

Safety. A run writes new entries to its own temporary segment and publishes it by renaming it
(atomic) after writing `COMPLETE`, at each checkpoint and at a clean end; a crashed run leaves a
`.tmp-` folder that is never read and is removed later. Two runs writing the same key write
different segments; where both hold an entry the first published wins. A size limit
(`cache_max_bytes`) evicts whole segments, least recently used first (a run touches the segments
it loads); a reader keeps its segment files open, so an eviction under it does no harm.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

logger = logging.getLogger("trainer")

FORMAT = "v1"
LATENT, TEXT = "latent", "text"
COMPLETE = "COMPLETE"
STALE_TMP_S = 24 * 3600  # a temporary segment this old is a crashed writer's, whoever it was
# The up-front rule (see choose_upfront).
UPFRONT_MAX_SHARE = 0.25
UPFRONT_MAX_ENCODES = 4096

_DTYPES = {str(d).removeprefix("torch."): d for d in
           (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32)}


# --------------------------------------------------------------------------------------------
# Keys


def file_stamp(path: Path) -> str:
    stat = path.stat()
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def file_digest(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes (reading and hashing costs far less than decoding it)."""
    with open(path, "rb", buffering=0) as file:
        if os.fstat(file.fileno()).st_size <= 2**22:  # one read (file_digest's 256 KiB buffer per call
            return hashlib.sha256(file.read()).hexdigest()  # costs more than a small image's hash)
        return hashlib.file_digest(file, "sha256").hexdigest()


def image_keys(folder: Path, paths: Iterable[Path], train_data_dir: str | Path | None = None,
               memo: dict[tuple[str, int, int], str] | None = None) -> list[str]:
    """One key per image: the sha256 of its bytes (the first 128 bits).

    The content, not the path: where the images sit, what they are called and when they were
    written determine nothing an entry holds, and keying by them let two datasets with a file of
    the same name, size and modification time but different pixels (copied with `cp -a`, then
    edited in place; extracted with their timestamps kept) share latents, while two uploads of the
    same images never did. `folder` and `train_data_dir` (a zip, already extracted into `folder`)
    no longer enter the key.

    Each file is read and hashed once per run: `memo` maps (path, size, mtime_ns) to its key for
    the run that passes it (by default this call). It must not outlive the run: a file edited in
    place keeping its size and modification time would keep its old key.
    """
    memo = {} if memo is None else memo
    keys = []
    for path in paths:
        text = os.fspath(path)
        stat = os.stat(text)
        stamp = (text, stat.st_size, stat.st_mtime_ns)
        key = memo.get(stamp)
        if key is None:
            key = memo[stamp] = file_digest(text)[:32]
        keys.append(key)
    return keys


def text_key(caption: str) -> str:
    return hashlib.sha256(caption.encode()).hexdigest()[:32]


def latent_key(image_key: str, flip: bool) -> str:
    return image_key + ("m" if flip else "p")


def latent_kind(bucket: tuple[int, int] | None) -> str:
    """The kind latents are stored under: one per aspect-ratio bucket (width x height of the
    crop), since a kind's records have one fixed layout and each bucket's latents its own shape;
    "latent" without buckets (every crop the same square)."""
    return LATENT if bucket is None else f"{LATENT}-{bucket[0]}x{bucket[1]}"


def model_identity(source: str, revision: str | None = None, variant: str | None = None,
                   parts: Iterable[str] = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")) -> str:
    """What identifies the encoders of a model: config files' content, weight files' sizes and
    modification times (hashing gigabytes of weights per run would cost more than it saves)."""
    path = Path(source)
    digest = hashlib.sha256(f"{revision}\0{variant}".encode())
    if path.is_file():
        digest.update(f"file\0{path.resolve()}\0{file_stamp(path)}".encode())
    elif path.is_dir():
        files = [path / "model_index.json"] + sorted(
            p for part in parts if (path / part).is_dir() for p in (path / part).rglob("*") if p.is_file())
        for file in files:
            if not file.is_file():
                continue
            rel = file.relative_to(path).as_posix()
            if file.suffix in (".json", ".txt") and file.stat().st_size < 16 * 2**20:
                digest.update(f"{rel}\0".encode() + file.read_bytes())
            else:
                digest.update(f"{rel}\0{file_stamp(file)}".encode())
    else:  # a hub id, resolved offline: its name and revision are what we know
        digest.update(f"hub\0{source}".encode())
    return digest.hexdigest()


# How entries inside a key's folder are keyed; part of the folder's key, so segments keyed
# otherwise (images by path, size and mtime, before) live apart, are never loaded, and age out.
ENTRY_KEYS = "sha256-of-content"


def cache_key(fields: dict) -> str:
    fields = {**fields, "entry_keys": ENTRY_KEYS}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:40]


# --------------------------------------------------------------------------------------------
# Records: a kind's tensors as one fixed-size run of bytes


@dataclass(frozen=True)
class Layout:
    """Names, shapes and dtypes of one entry's tensors; an entry is their bytes in this order."""

    fields: tuple[tuple[str, tuple[int, ...], str], ...]

    @classmethod
    def of(cls, tensors: dict[str, torch.Tensor]) -> Layout:
        return cls(tuple((name, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in tensors.items()))

    @classmethod
    def from_json(cls, value) -> Layout:
        return cls(tuple((name, tuple(shape), dtype) for name, shape, dtype in value))

    def to_json(self) -> list:
        return [[name, list(shape), dtype] for name, shape, dtype in self.fields]

    @property
    def sizes(self) -> list[int]:
        return [math.prod(shape) * _DTYPES[dtype].itemsize for _, shape, dtype in self.fields]

    @property
    def nbytes(self) -> int:
        return sum(self.sizes)

    def pack(self, tensors: dict[str, torch.Tensor]) -> bytes:
        return b"".join(tensors[name].contiguous().view(torch.uint8).numpy().tobytes() for name, _, _ in self.fields)

    def unpack(self, buffer: bytes | bytearray) -> dict[str, torch.Tensor]:
        flat = torch.frombuffer(bytearray(buffer), dtype=torch.uint8)
        out, offset = {}, 0
        for (name, shape, dtype), size in zip(self.fields, self.sizes):
            part = flat[offset:offset + size]
            if offset % _DTYPES[dtype].itemsize:  # a view needs an aligned start
                part = part.clone()
            out[name] = part.view(_DTYPES[dtype]).view(shape)
            offset += size
        return out


class _SegmentFiles:
    """Record files of one segment opened for reading (published) or writing (temporary)."""

    def __init__(self, path: Path, layouts: dict[str, Layout], entries: dict[str, dict[str, int]], writable: bool):
        self.path = path
        self.layouts = layouts
        self.entries = entries
        self.writable = writable
        self.fds: dict[str, int] = {}
        if not writable:
            for kind in entries:
                self.fds[kind] = os.open(path / f"{kind}.bin", os.O_RDONLY)

    def read(self, kind: str, key: str) -> dict[str, torch.Tensor] | None:
        record = self.entries.get(kind, {}).get(key)
        if record is None:
            return None
        layout = self.layouts[kind]
        buffer = os.pread(self._fd(kind), layout.nbytes, record * layout.nbytes)
        if len(buffer) != layout.nbytes:
            return None
        return layout.unpack(buffer)

    def write(self, kind: str, key: str, tensors: dict[str, torch.Tensor]) -> None:
        layout = self.layouts.setdefault(kind, Layout.of(tensors))
        if Layout.of(tensors) != layout:
            raise ValueError(f"latent cache: {kind} entry {key} does not match the layout {layout}")
        records = self.entries.setdefault(kind, {})
        payload = layout.pack(tensors)
        record = len(records)
        written = os.pwrite(self._fd(kind), payload, record * layout.nbytes)
        if written != len(payload):
            raise OSError(f"short write to {self.path / (kind + '.bin')}")
        records[key] = record  # only a fully written record is listed

    def _fd(self, kind: str) -> int:
        if kind not in self.fds:
            flags = (os.O_RDWR | os.O_CREAT) if self.writable else os.O_RDONLY
            self.fds[kind] = os.open(self.path / f"{kind}.bin", flags, 0o644)
        return self.fds[kind]

    def count(self) -> int:
        return sum(len(records) for records in self.entries.values())

    def close(self) -> None:
        for fd in self.fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()


def _open_published(path: Path) -> _SegmentFiles | None:
    """A published segment, or None when it is not complete or not readable (being evicted)."""
    try:
        if not (path / COMPLETE).is_file():
            return None
        index = json.loads((path / "index.json").read_text(encoding="utf-8"))
        layouts = {kind: Layout.from_json(value) for kind, value in index["layouts"].items()}
        segment = _SegmentFiles(path, layouts, index["entries"], writable=False)
        segment.memory_format = index.get("memory_format")
        return segment
    except (OSError, ValueError, KeyError, TypeError) as error:
        logger.warning("latent cache: skipping segment %s (%s)", path, error)
        return None


# --------------------------------------------------------------------------------------------
# The cache


@dataclass
class CacheStats:
    encoded_images: int = 0  # latent entries this run encoded
    encoded_texts: int = 0
    ram_hits: int = 0
    disk_hits: int = 0
    published_segments: int = 0


@dataclass
class LatentCache:
    """Entries by (kind, key): in RAM up to `ram_bytes`, else on disk; shared under `root`."""

    ram_bytes: int
    root: Path | None = None  # shared cache root; None: private, removed at close
    key: str = "private"
    max_bytes: int | None = None
    spill_dir: Path | None = None  # where a private cache spills (default: the system's temp folder)
    stats: CacheStats = field(default_factory=CacheStats)

    def __post_init__(self):
        self._ram: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
        self._ram_used = 0
        self._writer: _SegmentFiles | None = None
        self._private_dir: Path | None = None
        self._published: dict[str, dict[str, _SegmentFiles]] = {}  # kind -> key -> segment
        self._segments: list[_SegmentFiles] = []
        self._disk_failed = False
        self.memory_format: str | None = None
        self.batch_layouts: dict[tuple[int, ...], str] = {}  # params' shape -> the VAE's layout for it
        if self.root is not None:
            self.key_dir.mkdir(parents=True, exist_ok=True)
            self._load_published()

    # ---- reading and writing entries

    @property
    def key_dir(self) -> Path:
        assert self.root is not None
        return Path(self.root) / FORMAT / self.key

    def get(self, kind: str, key: str) -> dict[str, torch.Tensor] | None:
        tensors = self._ram.get((kind, key))
        if tensors is not None:
            self.stats.ram_hits += 1
            return tensors
        for source in (self._writer, self._published.get(kind, {}).get(key)):
            if source is not None and key in source.entries.get(kind, {}):
                tensors = source.read(kind, key)
                if tensors is not None:
                    self.stats.disk_hits += 1
                    self._keep_in_ram(kind, key, tensors)
                    return tensors
        return None

    def has(self, kind: str, key: str) -> bool:
        return ((kind, key) in self._ram
                or (self._writer is not None and key in self._writer.entries.get(kind, {}))
                or key in self._published.get(kind, {}))

    def put(self, kind: str, key: str, tensors: dict[str, torch.Tensor]) -> None:
        """Keep a newly encoded entry (CPU copies; the caller's tensors may live on a GPU)."""
        if self.has(kind, key):
            return
        tensors = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in tensors.items()}
        if kind.startswith(LATENT):
            self.stats.encoded_images += 1
        else:
            self.stats.encoded_texts += 1
        kept = self._keep_in_ram(kind, key, tensors)
        if self.root is not None or not kept:  # shared: every entry is published; private: spill
            self._write(kind, key, tensors)

    def _keep_in_ram(self, kind: str, key: str, tensors: dict[str, torch.Tensor]) -> bool:
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if self._ram_used + size > self.ram_bytes:
            return False
        self._ram[(kind, key)] = tensors
        self._ram_used += size
        return True

    def _write(self, kind: str, key: str, tensors: dict[str, torch.Tensor]) -> None:
        if self._disk_failed:
            return
        try:
            if self._writer is None:
                self._writer = _SegmentFiles(self._new_segment_dir(), {}, {}, writable=True)
            self._writer.write(kind, key, tensors)
        except OSError as error:  # disk full or gone: keep training, without caching on disk
            logger.warning("latent cache: writing to disk failed (%s); going on without it", error)
            self._disk_failed = True
            if self._writer is not None:
                self._discard_writer()

    def _new_segment_dir(self) -> Path:
        if self.root is None:
            if self._private_dir is None:
                if self.spill_dir is not None:
                    Path(self.spill_dir).mkdir(parents=True, exist_ok=True)
                self._private_dir = Path(tempfile.mkdtemp(prefix=".loraq-latents-", dir=self.spill_dir))
            path = self._private_dir / uuid.uuid4().hex
        else:
            path = self.key_dir / f".tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        path.mkdir(parents=True)
        return path

    @property
    def ram_used(self) -> int:
        return self._ram_used

    # ---- sharing

    def _load_published(self) -> None:
        """Open every complete segment of this key; where two hold an entry, the older wins."""
        try:
            names = sorted(p.name for p in self.key_dir.iterdir() if p.name.startswith("seg-"))
        except OSError:
            names = []
        for name in names:
            segment = _open_published(self.key_dir / name)
            if segment is None:
                continue
            self._segments.append(segment)
            with contextlib.suppress(OSError):
                os.utime(segment.path)  # least recently used is what eviction removes first
            if self.memory_format is None:
                self.memory_format = getattr(segment, "memory_format", None)
            for kind, entries in segment.entries.items():
                table = self._published.setdefault(kind, {})
                for key in entries:
                    table.setdefault(key, segment)

    def count_published(self, kind: str) -> int:
        return len(self._published.get(kind, {}))

    def publish(self) -> None:
        """Make this run's new entries available to other runs (shared caches only)."""
        if self.root is None or self._writer is None or self._writer.count() == 0:
            return
        writer, self._writer = self._writer, None
        try:
            index = {"layouts": {k: v.to_json() for k, v in writer.layouts.items()},
                     "entries": writer.entries, "memory_format": self.memory_format}
            writer.close()
            (writer.path / "index.json").write_text(json.dumps(index), encoding="utf-8")
            for name in [f"{kind}.bin" for kind in writer.entries] + ["index.json"]:
                _fsync(writer.path / name)
            (writer.path / COMPLETE).write_text("", encoding="utf-8")
            _fsync(writer.path / COMPLETE)
            final = self.key_dir / f"seg-{time.time_ns():020d}-{uuid.uuid4().hex[:12]}"
            os.rename(writer.path, final)
            _fsync_dir(self.key_dir)
        except OSError as error:
            logger.warning("latent cache: publishing failed (%s); this run's entries are not kept", error)
            shutil.rmtree(writer.path, ignore_errors=True)
            return
        self.stats.published_segments += 1
        segment = _open_published(final)
        if segment is not None:  # this run reads its entries back from the published copy
            self._segments.append(segment)
            for kind, entries in segment.entries.items():
                table = self._published.setdefault(kind, {})
                for key in entries:
                    table.setdefault(key, segment)
        if self.max_bytes is not None:
            evict(Path(self.root), self.max_bytes)

    def close(self, publish: bool) -> None:
        """Publish (after a clean run) or drop this run's unpublished entries, and let go."""
        if publish:
            self.publish()
        self._discard_writer()
        for segment in self._segments:
            segment.close()
        self._segments.clear()
        self._published.clear()
        self._ram.clear()
        self._ram_used = 0
        if self._private_dir is not None:
            shutil.rmtree(self._private_dir, ignore_errors=True)
            self._private_dir = None

    def _discard_writer(self) -> None:
        if self._writer is not None:
            self._writer.close()
            shutil.rmtree(self._writer.path, ignore_errors=True)
            self._writer = None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        _fsync(path)


def _dir_bytes(path: Path) -> int:
    total = 0
    for child in path.iterdir():
        with contextlib.suppress(OSError):
            total += child.stat().st_size
    return total


def _writer_alive(name: str) -> bool:
    """Whether a `.tmp-{host}-{pid}-{id}` folder's writer may still run."""
    try:
        host, pid = name.removeprefix(".tmp-").rsplit("-", 2)[:2]
        if host != socket.gethostname():
            return True  # another machine's: only its age tells
        os.kill(int(pid), 0)
        return True
    except ProcessLookupError:
        return False
    except (ValueError, PermissionError):
        return True


def evict(root: Path, max_bytes: int) -> list[Path]:
    """Remove crashed writers' leftovers, then whole segments, least recently used first, until
    the published segments under `root` take at most `max_bytes`. Returns what was removed."""
    removed: list[Path] = []
    base = root / FORMAT
    if not base.is_dir():
        return removed
    with open(root / ".lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        segments = []
        now = time.time()
        for key_dir in base.iterdir():
            if not key_dir.is_dir():
                continue
            for path in key_dir.iterdir():
                try:
                    if path.name.startswith(".tmp-"):
                        if not _writer_alive(path.name) or now - path.stat().st_mtime > STALE_TMP_S:
                            removed.append(_remove(path))
                    elif path.name.startswith(".trash-"):
                        shutil.rmtree(path, ignore_errors=True)
                    elif path.name.startswith("seg-"):
                        segments.append((path.stat().st_mtime, path, _dir_bytes(path)))
                except OSError:
                    continue
        total = sum(size for _, _, size in segments)
        for _, path, size in sorted(segments):
            if total <= max_bytes:
                break
            removed.append(_remove(path))
            total -= size
    return removed


def _remove(path: Path) -> Path:
    """Rename out of sight first (readers list `seg-*` only), then delete."""
    trash = path.with_name(f".trash-{uuid.uuid4().hex[:12]}")
    try:
        os.rename(path, trash)
    except OSError:
        return path
    shutil.rmtree(trash, ignore_errors=True)
    return path


# --------------------------------------------------------------------------------------------
# Filling a batch, and the up-front pass


def choose_upfront(num_images: int, orientations: int, images_read: int, missing: int) -> bool:
    """Whether to encode every missing entry before the first step.

    As the loop goes, an (image, orientation) is encoded the first time it is drawn, so a run
    that reads each image E times encodes N·F·(1 − (1 − 1/F)^E) entries, never more than an
    up-front pass (N·F) and exactly as many once E is large. Up front is worth it only where it
    costs nearly nothing extra and buys a run whose every step is a cached step (full-batch
    encodes, a true steady pace and ETA from the first step): when the pass is at most a quarter
    of the images the run reads (E ≥ 4F, so at most 0.5^8 of it is waste with flips) and small
    enough (4096 encodes: seconds on a GPU) that the wait before the first step stays short.
    """
    if missing == 0:
        return False
    needed = num_images * orientations
    return needed <= UPFRONT_MAX_SHARE * images_read and missing <= UPFRONT_MAX_ENCODES


def memory_format_of(tensor: torch.Tensor) -> str:
    if tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last) and not tensor.is_contiguous():
        return "channels_last"
    return "contiguous"


MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


def _merge(count: int, cached: torch.Tensor | None, cached_rows, fresh: torch.Tensor | None, fresh_rows) -> torch.Tensor:
    """Rows of one batch from two sources, in batch order."""
    if cached is None:
        return fresh
    if fresh is None:
        return cached
    out = fresh.new_empty((count, *fresh.shape[1:]))
    out[_rows(cached_rows, count)] = cached.to(out.device, out.dtype)
    out[_rows(fresh_rows, count)] = fresh
    return out


def _rows(rows, count: int):
    return slice(None) if rows is None else rows


RESERVED = frozenset({"index", "flip", "pixel_values", "latent_params"})


def record_keys(batch: dict, count: int, exclude: Iterable[str]) -> list[str]:
    """The family's per-image records in a batch (SDXL: original size, crop): kept with each
    latent entry, since a cached item has no pixels to derive them from."""
    skip = RESERVED | set(exclude)
    return [k for k, v in batch.items() if k not in skip and not k.endswith("_rows")
            and isinstance(v, torch.Tensor) and v.shape[:1] == (count,)]


@torch.no_grad()
def batch_latent_params(
    cache: LatentCache, batch: dict, image_keys: list[str], encode_image_params: Callable[[torch.Tensor], torch.Tensor],
    device, exclude: Iterable[str] = (), kinds: list[str] | None = None,
) -> torch.Tensor:
    """The batch's posterior parameters in the VAE's own memory layout: cached rows as stored,
    the others encoded now (and kept, with the family's per-image records, under each image's
    kind: `kinds[index]` with buckets, else LATENT)."""
    count = len(batch["index"])
    fresh = None
    if "pixel_values" in batch:
        fresh = encode_image_params(batch["pixel_values"].to(device))
        if cache.memory_format is None:
            cache.memory_format = memory_format_of(fresh)
        rows = batch.get("pixel_values_rows")
        positions = range(count) if rows is None else rows.tolist()
        indices, flips = batch["index"].tolist(), batch["flip"].tolist()
        records = record_keys(batch, count, exclude)
        for j, position in enumerate(positions):
            entry = {"params": fresh[j], **{key: batch[key][position] for key in records}}
            kind = LATENT if kinds is None else kinds[indices[position]]
            cache.put(kind, latent_key(image_keys[indices[position]], bool(flips[position])), entry)
    cached = batch.get("latent_params")
    if cached is not None:
        cached = cached.to(device, fresh.dtype if fresh is not None else cached.dtype)
    params = _merge(count, cached, batch.get("latent_params_rows"), fresh, batch.get("pixel_values_rows"))
    # The layout the VAE gives a batch of this shape (the uncached loop's): on some CPUs it
    # depends on the shape (a batch of one may come back contiguous, one of two channels-last),
    # and so it does across buckets and a bucket's short batch. Learnt once per shape: from a
    # batch encoded whole, else from encoding zeros of that shape (no random draws).
    shape = tuple(params.shape)
    layout = cache.batch_layouts.get(shape)
    if layout is None:
        if fresh is not None and batch.get("pixel_values_rows") is None:
            layout = memory_format_of(fresh)
        else:
            _, _, height, width = shape
            if "pixel_values" in batch:
                height, width = (side // 8 for side in batch["pixel_values"].shape[-2:])
            probe = torch.zeros((count, 3, height * 8, width * 8), device=device, dtype=params.dtype)
            layout = memory_format_of(encode_image_params(probe))
        cache.batch_layouts[shape] = layout
    return params.contiguous(memory_format=MEMORY_FORMATS[layout])


@torch.no_grad()
def batch_text(
    cache: LatentCache, batch: dict, text_keys: list[str], token_keys: Iterable[str], text_names: Iterable[str],
    encode_text: Callable[[dict], dict[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """The batch's text conditioning by the family's names: cached rows as stored, the others
    encoded now from their token ids (and kept)."""
    count = len(batch["index"])
    token_keys = list(token_keys)
    fresh, fresh_rows = None, batch.get(f"{token_keys[0]}_rows")
    if token_keys[0] in batch:
        fresh = encode_text({key: batch[key] for key in token_keys})
        positions = range(count) if fresh_rows is None else fresh_rows.tolist()
        indices = batch["index"].tolist()
        for j, position in enumerate(positions):
            cache.put(TEXT, text_keys[indices[position]], {name: t[j] for name, t in fresh.items()})
    return {name: _merge(count, batch.get(name), batch.get(f"{name}_rows"),
                         None if fresh is None else fresh[name], fresh_rows)
            for name in text_names}


@torch.no_grad()
def prepare_upfront(
    cache: LatentCache, examples: list, transform, image_keys: list[str], text_keys: list[str] | None,
    encode_image_params: Callable[[torch.Tensor], torch.Tensor], encode_text: Callable[[dict], dict] | None,
    tokenize_captions: Callable[[list[str]], dict[str, torch.Tensor]], batch_size: int, device,
    on_progress: Callable[[int, int], None], kinds: list[str] | None = None,
) -> None:
    """Encode every missing (image, orientation) and caption before the first step, in batches of
    `batch_size` (with buckets: of one bucket each, `kinds` per image), calling
    `on_progress(done, total)` after each. Draws no random numbers."""
    from trainer.data import load_rgb

    kinds = [LATENT] * len(examples) if kinds is None else kinds
    flips = (False, True) if getattr(transform, "random_flip", False) else (False,)
    todo = [(i, flip) for i in range(len(examples)) for flip in flips
            if not cache.has(kinds[i], latent_key(image_keys[i], flip))]
    by_kind: dict[str, list[tuple[int, bool]]] = {}
    for i, flip in todo:  # the pixels of one encode must stack: one bucket at a time
        by_kind.setdefault(kinds[i], []).append((i, flip))
    chunks = [group[start:start + batch_size] for group in by_kind.values()
              for start in range(0, len(group), batch_size)]
    texts: dict[str, int] = {}
    if text_keys is not None:
        for i, key in enumerate(text_keys):
            if key not in texts and not cache.has(TEXT, key):
                texts[key] = i
    total, done = len(todo) + len(texts), 0
    on_progress(0, total)
    for chunk in chunks:
        items = []
        for i, flip in chunk:
            item = transform(load_rgb(examples[i].path), flip=flip)
            items.append(item if isinstance(item, dict) else {"pixel_values": item})
        params = encode_image_params(torch.stack([item.pop("pixel_values") for item in items]).to(device))
        if cache.memory_format is None:
            cache.memory_format = memory_format_of(params)
        for j, (i, flip) in enumerate(chunk):
            cache.put(kinds[i], latent_key(image_keys[i], flip), {"params": params[j], **items[j]})
        done += len(chunk)
        on_progress(done, total)
    pending = list(texts.items())
    for start in range(0, len(pending), batch_size):
        chunk = pending[start:start + batch_size]
        tokens = tokenize_captions([examples[i].caption for _, i in chunk])
        encoded = encode_text({key: ids.to(device) for key, ids in tokens.items()})
        for j, (key, _) in enumerate(chunk):
            cache.put(TEXT, key, {name: t[j] for name, t in encoded.items()})
        done += len(chunk)
        on_progress(done, total)


class Progress:
    """done/total with images/s and ETA for `prepare` events, at most every `every_s` seconds."""

    def __init__(self, report: Callable[[int, int, float | None, float | None], None], every_s: float = 1.0):
        self.report = report
        self.every_s = every_s
        self.started = time.perf_counter()
        self.last = -math.inf

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if done not in (0, total) and now - self.last < self.every_s:
            return
        self.last = now
        elapsed = now - self.started
        rate = done / elapsed if done and elapsed > 0 else None
        eta = (total - done) / rate if rate else None
        self.report(done, total, rate, eta)


@dataclass
class CachePlan:
    """What the loop needs to use a cache: the cache, each example's keys, and how it fills."""

    cache: LatentCache
    image_keys: list[str]
    text_keys: list[str] | None  # None: the text encoder trains, so text is never cached
    orientations: int
    upfront: bool
    missing: int  # entries still to encode when the run set up (0: all came from earlier runs)
    total: int
    latent_kinds: list[str] | None = None  # each image's latent kind with buckets (latent_kind)

    def describe(self) -> dict:
        return {"mode": "upfront" if self.upfront else "as_you_go", "total": self.total,
                "cached": self.total - self.missing, "ram_mb": round(self.cache.ram_bytes / 2**20),
                "shared": self.cache.root is not None}
