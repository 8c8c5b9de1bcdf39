"""Whether an allowed base model is on this machine (a local folder, or in the hub cache)."""

from __future__ import annotations

from pathlib import Path

MODEL_INDEX = "model_index.json"


def is_available(source: str) -> bool:
    path = Path(source)
    if path.is_dir():
        return (path / MODEL_INDEX).is_file()
    if source.startswith(("/", ".")):
        return False
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(source, MODEL_INDEX), str)
    except Exception:  # noqa: BLE001 - not a valid hub id, or no cache: not available
        return False
