"""Training metadata in both LoRA files, the way kohya's sd-scripts (`ss_*`) and the Stability
model spec (`modelspec.*`, https://github.com/Stability-AI/ModelSpec) write it, so sites and tools
that read those keys (AUTOMATIC1111's LoRA card, civitai, ComfyUI) show how a LoRA was made.

A run is recorded with `recording(config)` around `train()`, fed its events (`recorder(event)`):
the LoRA writers in trainer/model.py ask `for_file(output_dir)` for the keys at each save, so
the final files and every checkpoint's file carry them. Outside `recording` they get none.
Hashes: the base model's is a SHA-256 over its weight files (each file's own SHA-256 with its
relative name, sorted: `name NUL digest LF`), cached by path, size and mtime under
`~/.cache/loraq/model-hashes.json`; the dataset's is the same over every file of the data folder the trainer reads (hidden ones left out).
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import os
import re
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

TRAINER_VERSION = "loraq-trainer 0.1.0"
ARCHITECTURES = {"sd": "stable-diffusion-v1", "sdxl": "stable-diffusion-xl-v1-base", "flux": "flux-1-dev",
                 "sd3": "stable-diffusion-v3-medium"}
BASE_VERSIONS = {"sd": "sd_v1", "sdxl": "sdxl_base_v1-0", "flux": "flux1", "sd3": "sd3"}
# Flow-matching families have no DDPM prediction type: they predict the velocity `noise - x`.
FLOW_FAMILIES = frozenset({"flux", "sd3"})
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}

_current: contextvars.ContextVar[MetadataRecorder | None] = contextvars.ContextVar("loraq_metadata", default=None)


class MetadataRecorder:
    """What a run's files should say: the config, plus what its events tell (steps, epochs)."""

    def __init__(self, config):
        self.config = config
        self.started_at = time.time()
        self.total_steps: int | None = config.max_train_steps
        self.step = 0
        self.epoch = 0
        self._dataset: dict[str, str] | None = None

    def __call__(self, event) -> None:
        if event.total_steps:
            self.total_steps = event.total_steps
        if event.step is not None:
            self.step = max(self.step, event.step)
        if event.epoch is not None:
            self.epoch = max(self.epoch, event.epoch + 1)

    def build(self, output_dir: str | Path) -> dict[str, str]:
        config = self.config
        family = getattr(config, "family", "sd")
        checkpoint = re.fullmatch(r"checkpoint-(\d+)", Path(output_dir).name)
        steps = int(checkpoint.group(1)) if checkpoint else (self.step or self.total_steps or 0)
        base = config.pretrained_model_name_or_path
        base_name = Path(base).name if Path(base).exists() else base
        prediction = "flow" if family in FLOW_FAMILIES else (getattr(config, "prediction_type", None) or "epsilon")
        alpha = getattr(config, "effective_lora_alpha", None) or config.lora_alpha or config.rank
        resolution = config.resolution
        from trainer.optimizers import describe as describe_optimizer  # torch; loaded on use

        now = time.time()
        arch = ARCHITECTURES.get(family, family)
        meta = {
            # kohya's sd-scripts
            "ss_network_module": "networks.lora", "ss_network_dim": str(config.rank),
            "ss_network_alpha": str(alpha), "ss_base_model_version": BASE_VERSIONS.get(family, family),
            "ss_sd_model_name": base_name, "ss_new_sd_model_hash": model_hash(base),
            "ss_resolution": f"({resolution}, {resolution})", "ss_steps": str(steps),
            "ss_max_train_steps": str(self.total_steps or steps), "ss_epoch": str(self.epoch),
            "ss_num_epochs": str(self.epoch), "ss_learning_rate": str(config.learning_rate),
            "ss_unet_lr": str(config.learning_rate),
            "ss_text_encoder_lr": str(config.text_encoder_rate(config.learning_rate) if config.train_text_encoder else 0),
            "ss_lr_scheduler": config.lr_scheduler, "ss_lr_warmup_steps": str(config.lr_warmup_steps),
            "ss_optimizer": describe_optimizer(config),
            "ss_batch_size_per_device": str(config.train_batch_size),
            "ss_gradient_accumulation_steps": str(config.gradient_accumulation_steps),
            "ss_mixed_precision": config.mixed_precision, "ss_seed": str(config.seed),
            "ss_noise_offset": str(getattr(config, "noise_offset", None)),
            "ss_min_snr_gamma": str(getattr(config, "snr_gamma", None)),
            "ss_v2": str(False), "ss_v_parameterization": str(prediction == "v_prediction"),
            "ss_prediction_type": prediction, "ss_training_started_at": str(self.started_at),
            "ss_training_finished_at": str(now), "ss_training_comment": TRAINER_VERSION,
            **_bucket_metadata(config),
            **self.dataset(),
            # the Stability model spec
            "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": f"{arch}/lora",
            "modelspec.implementation": "https://github.com/huggingface/diffusers",
            "modelspec.title": f"{base_name} LoRA ({Path(config.output_dir).name})",
            "modelspec.resolution": f"{resolution}x{resolution}",
            "modelspec.prediction_type": {"v_prediction": "v"}.get(prediction, prediction),
            "modelspec.date": datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="seconds"),
            "modelspec.trainer": TRAINER_VERSION,
        }
        return meta

    def dataset(self) -> dict[str, str]:
        """The data folder's hash, image count and caption tag frequency (computed once)."""
        if self._dataset is None:
            folder = Path(self.config.train_data_dir)
            captions = _captions(folder, self.config.caption_column)
            tags = Counter(tag.strip() for caption in captions.values() for tag in caption.split(",") if tag.strip())
            name = folder.name or "data"
            self._dataset = {
                "ss_dataset_hash": tree_hash(folder, lambda p: not _hidden(p.relative_to(folder).as_posix()))
                if folder.is_dir() else "",
                "ss_num_train_images": str(len(captions)),
                "ss_tag_frequency": json.dumps({name: dict(tags.most_common())}, ensure_ascii=False),
                "ss_dataset_dirs": json.dumps({name: {"n_repeats": 1, "img_count": len(captions)}}),
            }
        return self._dataset


@contextlib.contextmanager
def recording(config, recorder: MetadataRecorder | None = None) -> Iterator[MetadataRecorder]:
    """Record this run's metadata for the LoRA files it writes; feed the recorder its events."""
    recorder = recorder or MetadataRecorder(config)
    token = _current.set(recorder)
    try:
        yield recorder
    finally:
        _current.reset(token)


def for_file(output_dir: str | Path) -> dict[str, str]:
    """The metadata a LoRA file written to `output_dir` now carries ({} outside `recording`)."""
    recorder = _current.get()
    return recorder.build(output_dir) if recorder is not None else {}


# --------------------------------------------------------------------------------------------
# Hashes


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def tree_hash(folder: Path, keep) -> str:
    """SHA-256 over `name NUL sha256 LF` of the kept files under `folder`, sorted by name."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and keep(p)):
        name = path.relative_to(folder).as_posix()
        digest.update(f"{name}\0{_file_sha256(path)}\n".encode())
    return digest.hexdigest()


def model_hash(source: str) -> str:
    """The base model's weights hash (a folder's weight files, or a single file), cached; "" when
    it is no local path (a hub id: the trainer resolves it in the cache, the name says which)."""
    path = Path(source)
    if not path.exists():
        return ""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES]
    stamp = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(files)]
    key = hashlib.sha256(json.dumps(stamp).encode()).hexdigest()
    cache_file = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "loraq" / "model-hashes.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return cache[key]
    value = _file_sha256(path) if path.is_file() else tree_hash(path, lambda p: p.suffix in WEIGHT_SUFFIXES)
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        cache[key] = value
        partial = cache_file.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps(cache))
        partial.replace(cache_file)
    except OSError:  # no writable home: hash again next time
        pass
    return value


def _hidden(name: str) -> bool:
    """What the trainer leaves out of a data folder (trainer/files.py): dot files and folders."""
    return any(part.startswith(".") or part == "__MACOSX" for part in name.split("/"))


def _captions(folder: Path, caption_column: str) -> dict[str, str]:
    """Each image's caption text (several captions joined), as metadata.jsonl or .txt files give it."""
    from trainer.files import _read_metadata

    if not folder.is_dir():
        return {}
    try:
        listed = _read_metadata(folder, caption_column)
    except Exception:  # noqa: BLE001 - a broken metadata.jsonl: the .txt captions still count
        listed = {}
    captions = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
        name = path.relative_to(folder).as_posix()
        if _hidden(name):
            continue
        caption = listed.get(name)
        if caption is None and path.with_suffix(".txt").is_file():
            caption = path.with_suffix(".txt").read_text(encoding="utf-8", errors="replace").strip()
        captions[name] = ", ".join(caption) if isinstance(caption, tuple) else (caption or "")
    return captions


def _bucket_metadata(config) -> dict[str, str]:
    """kohya's bucket keys: whether aspect-ratio buckets were on and their limits."""
    if not getattr(config, "enable_bucket", False):
        return {"ss_enable_bucket": "False"}
    low, high = config.bucket_limits
    return {"ss_enable_bucket": "True", "ss_min_bucket_reso": str(low), "ss_max_bucket_reso": str(high),
            "ss_bucket_no_upscale": str(config.bucket_no_upscale)}
