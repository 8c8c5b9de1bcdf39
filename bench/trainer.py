"""Trainer benchmark: the shipped loop (latent cache) against the diffusers script's plain loop.

    make bench                     # or: python -m bench.trainer [--steps N] [--resolution R] [--device D]

Both variants train the tiny SD model on the same generated dataset with the same config and
seed; they differ only in `cache_latents`:

* ``cached``: the trainer as shipped (``cache_latents`` unset). With ``center_crop`` every crop
  is fixed, so it encodes each image's VAE posterior and each caption once, up front, and only
  samples the cached posterior on every step.
* ``plain``: ``cache_latents=false``, the script's way: the VAE and the text encoder run on
  every step.

Each run is its own subprocess, so its peak memory is its own. The child reports steady-state
steps/s (first ``--warmup`` steps skipped), wall time of ``train()`` (model load, cache,
training, saving) and peak memory as one JSON line. The variants run in turn, ``--repeats``
times (cached, plain, cached, plain, ...), and each is reported by its best run: on a shared
2-core machine another process's burst slows a run by several times, never speeds it up. The
parent checks that every run's loss curve agrees with the first (the cache samples the same
distribution from the same random stream) and writes the results between
``<!-- bench:trainer -->`` markers in BENCHMARKS.md, leaving the rest of the file as it is.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SECTION = "trainer"
DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"
COMMAND = "make bench"
LOSS_TOLERANCE = 1e-4
# (name, cache_latents option, what it is)
VARIANTS = [
    ("cached", None, "trainer as shipped: latent and text-embedding cache (cache_latents unset)"),
    ("plain", False, "script's loop: VAE and text encoder on every step (cache_latents=false)"),
]


# --------------------------------------------------------------------------------------------
# One variant, in a child process


def run_variant(spec: dict) -> dict:
    """Train once as `spec` says and measure it; returns the JSON-ready result."""
    import torch

    from trainer.config import load_config
    from trainer.loop import train

    config = load_config(spec["config"])
    step_times: list[tuple[int, float]] = []
    start_data: dict = {}

    def on_event(event) -> None:
        if event.type == "step":
            step_times.append((event.step, time.perf_counter()))
        elif event.type == "start":
            start_data.update(event.data or {})

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = train(config, on_event)
    wall_s = time.perf_counter() - started

    device = start_data.get("device", "cpu")
    warmup = min(spec["warmup"], len(step_times) - 2)
    (first_step, first_t), (last_step, last_t) = step_times[warmup], step_times[-1]
    steps_per_s = (last_step - first_step) / (last_t - first_t)
    if device.startswith("cuda"):
        peak_mib, peak_kind = torch.cuda.max_memory_allocated() / 2**20, "CUDA max allocated"
    else:
        # ru_maxrss is in KiB on Linux (bytes on macOS).
        scale = 1 if sys.platform == "darwin" else 1024
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20
        peak_kind = "process max RSS"
    return {
        "variant": spec["variant"],
        "cached": start_data.get("cached"),
        "device": device,
        "steps": result.global_step,
        "measured_steps": last_step - first_step,
        "steps_per_s": steps_per_s,
        "images_per_s": steps_per_s * start_data.get("total_batch_size", config.train_batch_size),
        "wall_s": wall_s,
        "peak_mib": peak_mib,
        "peak_kind": peak_kind,
        "final_loss": result.losses[-1],
        "losses": result.losses,
    }


def spawn_variant(spec: dict) -> dict:
    """Run one variant in a fresh interpreter and return the JSON line it prints last."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.trainer", "--child", json.dumps(spec)],
        capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[1],
    )
    if proc.returncode != 0:  # the library chatter on stderr is shown only when it failed
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"bench: variant {spec['variant']} failed (exit {proc.returncode})")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise SystemExit(f"bench: variant {spec['variant']} printed no result")


# --------------------------------------------------------------------------------------------
# The report


def machine_description(device: str) -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    parts = [f"{os.cpu_count()} CPU cores ({cpu})", f"torch {torch.__version__} "
             f"({torch.get_num_threads()} threads)", f"device {device}"]
    if device.startswith("cuda"):
        parts[-1] += f" ({torch.cuda.get_device_name()})"
    return ", ".join(parts)


def summarize(runs: list[dict]) -> dict:
    """A variant's best run (highest steps/s), with the spread over its runs."""
    best = max(runs, key=lambda r: r["steps_per_s"])
    return {**best, "slowest_steps_per_s": min(r["steps_per_s"] for r in runs),
            "best_wall_s": min(r["wall_s"] for r in runs), "peak_mib": max(r["peak_mib"] for r in runs)}


def loss_agreement(runs: dict[str, list[dict]]) -> tuple[float, bool]:
    """Largest per-step loss difference of any run from the first cached run."""
    reference = runs["cached"][0]["losses"]
    max_diff, same_length = 0.0, True
    for run in (r for variant in runs.values() for r in variant):
        same_length &= len(run["losses"]) == len(reference)
        max_diff = max([max_diff, *(abs(a - b) for a, b in zip(run["losses"], reference))])
    return max_diff, same_length and max_diff <= LOSS_TOLERANCE


def render_section(args: argparse.Namespace, runs: dict[str, list[dict]], command: str) -> tuple[str, bool, float]:
    best = {name: summarize(variant_runs) for name, variant_runs in runs.items()}
    cached, plain = best["cached"], best["plain"]
    max_diff, agree = loss_agreement(runs)
    final_diff = abs(cached["final_loss"] - plain["final_loss"])
    device = cached["device"]
    n = args.repeats

    lines = [
        "## Trainer: latent cache vs. the script's plain loop",
        "",
        f"- Command: `{command}`",
        f"- Date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Machine: {machine_description(device)}",
        f"- Workload: tiny SD model (`python -m trainer tiny-model`), {args.images} generated "
        f"{args.resolution}x{args.resolution} images, resolution {args.resolution}, center_crop, "
        f"train_batch_size {args.batch_size}, {args.steps} steps, seed 0, fp32, no checkpoints "
        f"or validation.",
        f"- Each run in its own process; the variants ran in turn, {n} time{'s' if n > 1 else ''} "
        f"each, and the best run is shown (the range is over all {n}). steps/s and images/s are "
        f"steady state: steps {args.warmup + 1}..{args.steps} (the first {args.warmup} are "
        f"warm-up). Wall time is the whole `train()` call (model load, latent cache when on, "
        f"training, saving the LoRA), best of {n}. Peak memory is the {cached['peak_kind']}.",
        "",
        "| variant | latent cache | steps/s | steps/s range | images/s | peak memory, MiB | wall time, s | final loss |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, _, what in VARIANTS:
        r = best[name]
        lines.append(
            f"| **{name}**: {what} | {'on' if r['cached'] else 'off'} | {r['steps_per_s']:.2f} | "
            f"{r['slowest_steps_per_s']:.2f}-{r['steps_per_s']:.2f} | {r['images_per_s']:.1f} | "
            f"{r['peak_mib']:.0f} | {r['best_wall_s']:.1f} | {r['final_loss']:.6f} |"
        )
    lines.append(
        f"| **cached / plain** | | **{cached['steps_per_s'] / plain['steps_per_s']:.2f}x** | | "
        f"{cached['images_per_s'] / plain['images_per_s']:.2f}x | "
        f"{cached['peak_mib'] / plain['peak_mib']:.2f}x | {cached['best_wall_s'] / plain['best_wall_s']:.2f}x | "
        f"{'agree' if agree else 'DISAGREE'} (Δ {final_diff:.1e}) |"
    )
    lines += [
        "",
        f"Loss curves {'agree' if agree else 'DISAGREE'}: max |loss difference| over all "
        f"{args.steps} steps of all {2 * n} runs = {max_diff:.2e} (tolerance {LOSS_TOLERANCE:.0e}).",
    ]
    return "\n".join(lines), agree, max_diff


def replace_section(path: Path, name: str, body: str) -> None:
    """Put `body` between this benchmark's markers in `path`, keeping everything else."""
    begin, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if path.exists():
        text = path.read_text(encoding="utf-8")
    else:
        text = "# Benchmarks\n\nWritten by `make bench`; each benchmark replaces only its own section.\n"
    if begin in text and end in text and text.index(begin) < text.index(end):
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text, encoding="utf-8")


# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.trainer", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="training steps per run (default 60)")
    parser.add_argument("--resolution", type=int, default=64, help="image and training resolution (default 64)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default auto")
    parser.add_argument("--repeats", type=int, default=3, help="runs per variant, best reported (default 3)")
    parser.add_argument("--images", type=int, default=16, help="dataset size (default 16)")
    parser.add_argument("--batch-size", type=int, default=4, help="train_batch_size (default 4)")
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of steps/s (default 5)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="default BENCHMARKS.md")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: one run's spec as JSON
    args = parser.parse_args(argv)
    if args.steps < args.warmup + 2:
        parser.error(f"--steps must be at least --warmup + 2 ({args.warmup + 2})")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run_variant(json.loads(args.child))), flush=True)
        return 0

    os.environ["HF_HUB_OFFLINE"] = "1"
    from trainer.sample_data import write_sample_dataset
    from trainer.tiny import write_tiny_model

    given = sys.argv[1:] if argv is None else argv
    command = COMMAND if not given else "python -m bench.trainer " + " ".join(given)
    started = time.perf_counter()
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="loraq-bench-") as tmp:
        model = write_tiny_model(Path(tmp, "tiny-sd"))
        dataset = write_sample_dataset(Path(tmp, "data"), n_images=args.images, size=args.resolution)
        for repeat in range(1, args.repeats + 1):
            for name, cache_latents, _ in VARIANTS:
                config = {
                    "pretrained_model_name_or_path": str(model), "train_data_dir": str(dataset),
                    "resolution": args.resolution, "center_crop": True,
                    "train_batch_size": args.batch_size, "max_train_steps": args.steps, "seed": 0,
                    "device": args.device, "checkpointing_steps": 10**9,
                    "output_dir": str(Path(tmp, "runs", f"{name}-{repeat}")),
                }
                if cache_latents is not None:
                    config["cache_latents"] = cache_latents
                r = spawn_variant({"variant": name, "config": config, "warmup": args.warmup})
                runs[name].append(r)
                print(f"bench: {name} {repeat}/{args.repeats}: {r['steps_per_s']:.2f} steps/s, "
                      f"{r['images_per_s']:.1f} images/s, peak {r['peak_mib']:.0f} MiB, "
                      f"wall {r['wall_s']:.1f}s, final loss {r['final_loss']:.6f}", file=sys.stderr, flush=True)

    section, agree, max_diff = render_section(args, runs, command)
    replace_section(args.output, SECTION, section)
    print(section)
    print(f"\nbench: max abs loss difference {max_diff:.2e}; wrote {args.output} "
          f"({time.perf_counter() - started:.0f}s)", file=sys.stderr)
    if not agree:
        print(f"bench: the loss curves differ by more than {LOSS_TOLERANCE:.0e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
