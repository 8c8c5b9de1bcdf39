"""What kind of accelerator this worker trains on, for the workers page and its heartbeat.

Read from the NVIDIA driver's /proc files, not from torch: asking CUDA in the worker's parent
would initialise it there, and the training child, forked from that parent, could not use it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")


def gpu_class(device: str, gpus_dir: Path = NVIDIA_GPUS) -> str:
    """`cpu` when the worker trains on the CPU (by setting, or no NVIDIA GPU found); else the first
    GPU's model as a short name (`NVIDIA H100 80GB HBM3` -> `h100-80gb-hbm3`, `... RTX 4090` -> `4090`)."""
    if device == "cpu":
        return "cpu"
    try:
        infos = sorted(gpus_dir.glob("*/information"))
        text = infos[0].read_text() if infos else ""
    except OSError:
        text = ""
    match = re.search(r"^Model:\s*(.+)$", text, re.MULTILINE)
    if not match:
        return "cpu"
    # Vendor and line words say nothing a scheduler needs: `NVIDIA GeForce RTX 4090` -> `4090`.
    name = re.sub(r"^((nvidia|geforce|tesla|rtx)\s+)+", "", match.group(1).strip(), flags=re.IGNORECASE)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


@dataclass(frozen=True)
class Capabilities:
    """What a worker offers jobs: its GPU class, how many GPUs one job may use, each one's memory."""

    gpu_class: str
    gpus: int
    memory_gb: float | None


def capabilities(settings, gpus_dir: Path = NVIDIA_GPUS) -> Capabilities:
    """From settings (LORAQ_WORKER_GPU_CLASS / _GPUS / _GPU_MEMORY_GB), else detected: the class
    from the driver's files (above), the count from its GPU folders (1 on the CPU), the memory
    from the class's name when it says it (`a100-80gb` -> 80), else unknown."""
    detected = gpu_class(settings.worker_device, gpus_dir)
    klass = settings.worker_gpu_class or detected
    count = settings.worker_gpus
    if count is None:
        try:
            count = len(list(gpus_dir.glob("*/information"))) if detected != "cpu" else 1
        except OSError:
            count = 1
    memory = settings.worker_gpu_memory_gb
    if memory is None and (match := re.search(r"(?:^|-)(\d+)gb?(?:-|$)", klass)):
        memory = float(match.group(1))
    return Capabilities(klass, max(count, 1), memory)
