"""Progress events: the one interface through which a training run reports what it does.

`train(config, on_event)` calls `on_event(Event)`; the CLI prints each as a JSON line on stdout
and keeps a human-readable log with a progress bar on stderr. The worker reads the JSON lines.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Literal, TextIO

from tqdm import tqdm

# `prepare`: the latent cache's plan and, when it encodes up front, its progress (data: done, total,
# mode "upfront" or "as_you_go"; images_per_s and eta_s while it encodes).
# `validation_loss`: the held-out loss at a step (trainer/validation_loss.py), in `validation_loss`.
EventType = Literal["start", "prepare", "step", "checkpoint", "validation", "validation_loss", "done", "error"]


@dataclass
class Event:
    """One progress event; fields that do not apply stay None and are left out of the JSON."""

    type: EventType
    step: int | None = None
    total_steps: int | None = None
    epoch: int | None = None
    loss: float | None = None
    lr: float | None = None
    grad_norm: float | None = None
    images_per_s: float | None = None
    eta_s: float | None = None
    paths: list[str] | None = None
    message: str | None = None
    data: dict | None = None
    validation_loss: float | None = None
    time: float = field(default_factory=time.time)

    def to_dict(self) -> dict:
        """The event as a JSON-ready dict without empty fields (non-finite floats become None)."""
        out = {}
        for key, value in asdict(self).items():
            if isinstance(value, float) and not math.isfinite(value):
                value = None
            if value is not None:
                out[key] = value
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))


EventSink = Callable[[Event], None]


def ignore_events(event: Event) -> None:
    """An EventSink that drops everything (library use without reporting)."""


class ConsoleReporter:
    """JSON lines on `out` for programs, a progress bar and short log lines on `log` for people."""

    def __init__(self, out: TextIO | None = None, log: TextIO | None = None, bar: bool = True):
        self.out = out or sys.stdout
        self.log = log or sys.stderr
        self.bar_enabled = bar
        self.bar: tqdm | None = None

    def __call__(self, event: Event) -> None:
        self.out.write(event.to_json() + "\n")
        self.out.flush()
        if event.type == "start":
            self._say(f"training {event.total_steps} steps: {event.message or ''}".rstrip(": "))
            if self.bar_enabled:
                self.bar = tqdm(total=event.total_steps, initial=event.step or 0, desc="Steps",
                                file=self.log, dynamic_ncols=True)
        elif event.type == "step" and self.bar is not None:
            self.bar.update((event.step or 0) - self.bar.n)
            self.bar.set_postfix(loss=f"{event.loss:.4g}", lr=f"{event.lr:.3g}", refresh=False)
        elif event.type == "prepare":
            progress = event.data or {}
            if progress.get("mode") != "upfront" or progress.get("done") in (0, progress.get("total")):
                self._say(event.message or "")
            elif self.bar is not None:
                self.bar.set_postfix_str(f"latent cache {progress.get('done')}/{progress.get('total')}")
        elif event.type in ("checkpoint", "validation"):
            self._say(f"{event.type} at step {event.step}: {', '.join(event.paths or [])}")
        elif event.type in ("done", "error"):
            if self.bar is not None:
                self.bar.close()
                self.bar = None
            self._say(f"{event.type}: {event.message or ', '.join(event.paths or [])}")

    def _say(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.log)
        else:
            self.log.write(text + "\n")
            self.log.flush()


class Throughput:
    """Images per second and time left, from the steps since training (re)started."""

    def __init__(self, images_per_step: int, total_steps: int, first_step: int):
        self.images_per_step = images_per_step
        self.total_steps = total_steps
        self.first_step = first_step
        self.started = time.perf_counter()

    def measure(self, step: int) -> tuple[float | None, float | None]:
        done = step - self.first_step
        elapsed = time.perf_counter() - self.started
        if done <= 0 or elapsed <= 0:
            return None, None
        seconds_per_step = elapsed / done
        return self.images_per_step / seconds_per_step, seconds_per_step * (self.total_steps - step)
