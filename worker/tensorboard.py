"""Each job's scalars as TensorBoard event files, written by the training child from its events.

The trainer knows nothing of TensorBoard: the child feeds every event it forwards to the worker
to a `TensorBoardSink` as well, which writes `train/loss`, `train/lr`, `train/grad_norm` (and
`validation/loss` when an event carries one) per optimizer step into
`<job>/tensorboard/attempt-N/`, with the event's own wall time. `tensorboard --logdir
var/jobs/<id>/tensorboard` shows a job live (each attempt a run); once an attempt ends the worker records the files as the job's `tensorboard/...`
artifacts, downloadable one by one or as `tensorboard.zip`. Writing them can never fail a
training: an error disables the sink and is logged once.
"""

from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from loraq import object_store, storage
from loraq.models import Artifact
from loraq.settings import Settings

log = logging.getLogger("loraq.worker.tensorboard")

FOLDER = "tensorboard"
KIND = "tensorboard"
# Per step event field -> scalar tag.
SCALARS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm"}
VALIDATION_LOSS_KEYS = ("validation_loss", "val_loss")


def tensorboard_dir(attempt_dir: Path) -> Path:
    """`<job>/tensorboard/attempt-N` for `<job>/attempt-N`: beside the attempts, not in them (an
    attempt's folder holds what the trainer wrote), and one TensorBoard run per attempt."""
    return attempt_dir.parent / FOLDER / attempt_dir.name


class TensorBoardSink:
    """Write a training's step scalars under `logdir` (made on the first scalar)."""

    def __init__(self, logdir: Path, flush_secs: int = 5):
        self.logdir = Path(logdir)
        self.flush_secs = flush_secs
        self._writer = None
        self._broken = False

    def __call__(self, event) -> None:
        if self._broken:
            return
        try:
            self._write(event)
        except Exception:  # noqa: BLE001 - a TensorBoard file is never worth a training
            self._broken = True
            log.exception("tensorboard.write_failed logdir=%s: no more scalars for this attempt", self.logdir)

    def _write(self, event) -> None:
        if event.step is None:
            return
        data = event.data or {}
        values = {tag: getattr(event, field) for field, tag in SCALARS.items()} if event.type == "step" else {}
        for key in VALIDATION_LOSS_KEYS:
            value = data.get(key, getattr(event, key, None))
            if value is not None:
                values["validation/loss"] = value
        values = {tag: float(v) for tag, v in values.items() if v is not None}
        if not values:
            return
        writer = self._open()
        for tag, value in values.items():
            writer.add_scalar(tag, value, global_step=event.step, walltime=event.time)
        if event.step == event.total_steps:
            writer.flush()

    def _open(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.logdir), flush_secs=self.flush_secs)
        return self._writer

    def close(self) -> None:
        if self._writer is not None:
            try:
                self._writer.close()
            except Exception:  # noqa: BLE001
                log.exception("tensorboard.close_failed logdir=%s", self.logdir)


def record_artifacts(settings: Settings, sessions: sessionmaker[Session], job_id: str, attempt: int) -> int:
    """Record the attempt's event files as the job's artifacts (after the attempt ended; a file
    recorded before is left as it is). Returns how many rows were added."""
    folder = tensorboard_dir(storage.attempt_dir(settings, job_id, attempt))
    files = sorted(p for p in folder.glob("*") if p.is_file()) if folder.is_dir() else []
    if not files:
        return 0
    added = 0
    with sessions.begin() as session:
        known = set(session.scalars(select(Artifact.name).where(Artifact.job_id == job_id,
                                                                Artifact.kind == KIND)))
        for path in files:
            name = f"{FOLDER}/attempt-{attempt}/{path.name}"
            if name in known:
                continue
            object_store.push(settings, path)  # no-op on the local data directory
            session.add(Artifact(job_id=job_id, kind=KIND, name=name, path=str(path.resolve()),
                                 size=path.stat().st_size, sha256=storage.sha256_file(path), step=None))
            added += 1
    return added
