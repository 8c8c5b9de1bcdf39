"""Trainer benchmark: the latent cache against the plain loop, memory past RAM, a sweep sharing
one cache, and the trainer's step against its floor (SD, and a mid-size SDXL shape).

    make bench                     # or: python -m bench.trainer [--only cache,epochs,rss,sweep,floor,sdxl]
    python -m bench.trainer --quick --output /tmp/B.md   # seconds; what `make test` runs once

Every workload trains the tiny SD model (`python -m trainer tiny-model`) on generated images
(256 px unless said otherwise, resized to `resolution` 64, center_crop, random_flip, batch 4,
seed 0, fp32, no checkpoints or validation). Each run is its own subprocess, so its peak memory
is its own; runs of the variants alternate and each variant is reported by its best run (on a
shared machine another process's burst slows a run, never speeds it up). Each part reports
the 1-minute load average during its runs (sampled every second).

* ``cache``: 2,000 images, 20 steps. ``default`` (the cache as shipped: as you go, since the run
  reads 80 of 2,000 images) against ``plain`` (``cache_latents=false``). Wall time of `train()`.
* ``epochs``: 64 images, 10 epochs (160 steps). The cache chooses its up-front pass here;
  steady-state steps/s (first 5 steps left out) and wall time against ``plain``: 5 runs an arm,
  alternating, each arm's best, and each adjacent pair's ratio.
* ``rss``: peak RSS of a run over 10,000 images against one over 100, each with the cache filled
  completely up front (both orientations of every image: the most a run can hold), with the
  default RAM budget and with `cache_ram_mb=16` (the rest spills to disk).
* ``sweep``: four jobs (learning rate x rank) over one 64-image dataset, 2 epochs each, with
  one shared `cache_dir` (as the worker runs them) against four private caches; counts what each
  job found missing and what the shared cache holds.
* ``floor``: the trainer's steady step against the floor, the UNet forward and backward on
  cached inputs plus the LoRA optimizer step (same process, same prepared models), fp32 and
  bf16, on the tiny model (resolution 64, batch 4) and on an SD-1.5-shaped UNet at half width
  (128 px, batch 2; about 2 s a step here, a few minutes in all; ``--no-sd15-half`` leaves it out).
* ``sdxl``: the same paired timing, fp32 and bf16, on an SDXL-shaped pipeline at half SDXL's
  widths (`write_sdxl_mid`: the tiny SDXL's builder, its UNet and text encoders rebuilt bigger;
  370M UNet parameters, random weights), 256 px, batch 1: a few seconds a step here.

Every variant's loss curve must agree with its reference (``plain``, or the first run) to 1e-4:
the cache samples the same posterior from the same random stream. Results go between
``<!-- bench:trainer -->`` markers in BENCHMARKS.md, leaving the rest of the file as it is.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

SECTION = "trainer"
DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"
COMMAND = "make bench"
LOSS_TOLERANCE = 1e-4
SCENARIOS = ("cache", "epochs", "rss", "sweep", "floor", "sdxl")
# torch threads per run (--threads). One by default: the figures are ratios, and on a small shared
# machine a second OpenMP thread spins against other processes (a 20-step run took 67 s with two
# threads at load 9 on 2 cores, 6 s with one).
THREADS = 1

FULL = {
    "cache": {"images": 2000, "steps": 20, "repeats": 5},
    # 5 runs an arm: each takes about 20 s, and the speed-up was 1.29x at load 9, 1.65x when quiet
    "epochs": {"images": 64, "epochs": 10, "repeats": 5},
    "rss": {"small": 100, "large": 10_000, "steps": 5},
    "sweep": {"images": 64, "steps": 32},
    "floor": {"steps": 40, "warmup": 5},
    # about 2.5 s a step in fp32, 2 s in bf16, with its paired floor step twice that
    "sdxl": {"width": 0.5, "resolution": 256, "batch": 1, "steps": 12, "warmup": 2, "repeats": 1},
    "repeats": 3, "image_size": 256, "resolution": 64, "batch": 4,
}
QUICK = {
    "cache": {"images": 24, "steps": 4},
    "epochs": {"images": 8, "epochs": 3},
    "rss": {"small": 8, "large": 24, "steps": 2},
    "sweep": {"images": 8, "steps": 4},
    "floor": {"steps": 6, "warmup": 2},
    "sdxl": {"width": 0.125, "resolution": 64, "batch": 1, "steps": 4, "warmup": 1, "repeats": 1},
    "repeats": 1, "image_size": 64, "resolution": 32, "batch": 2,
}


# --------------------------------------------------------------------------------------------
# One run, in a child process (or inline in quick mode)


def peak_rss_mib() -> float:
    """This process's peak resident memory. On Linux its memory map's high-water mark (VmHWM):
    ru_maxrss survives exec, so a run started from a bench process that once held a large model
    (the SDXL part builds one) would report that process's peak, not its own (measured: a child
    of an 800 MiB parent reads 811 MiB from ru_maxrss, 11 MiB from VmHWM)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration, ValueError):
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: KiB on Linux, bytes on macOS
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def run_train(spec: dict) -> dict:
    """Train once as `spec` says; wall time, steady steps/s, peak RSS, losses, cache figures."""
    from trainer.config import load_config
    from trainer.loop import train

    config = load_config(spec["config"])
    step_times: list[tuple[int, float]] = []
    # The process's CPU time at each step (one torch thread, data loading in this process): what
    # the step costs apart from the time other processes on a shared machine hold the core.
    step_cpu: list[float] = []
    prepare: list[dict] = []
    started = time.perf_counter()

    def on_event(event) -> None:
        if event.type == "step":
            step_times.append((event.step, time.perf_counter()))
            step_cpu.append(time.process_time())
        elif event.type == "prepare":
            prepare.append({**(event.data or {}), "t": time.perf_counter() - started})

    result = train(config, on_event)
    wall_s = time.perf_counter() - started
    warmup = max(0, min(spec.get("warmup", 5), len(step_times) - 2))
    (first_step, first_t), (last_step, last_t) = step_times[warmup], step_times[-1]
    deltas = [b[1] - a[1] for a, b in zip(step_times[warmup:], step_times[warmup + 1:])]
    cpu = [b - a for a, b in zip(step_cpu[warmup:], step_cpu[warmup + 1:])]
    return {
        "wall_s": wall_s, "steps": result.global_step,
        "steps_per_s": (last_step - first_step) / (last_t - first_t) if last_t > first_t else 0.0,
        "median_step_s": statistics.median(deltas) if deltas else None,
        "median_cpu_s": statistics.median(cpu) if cpu else None,
        "peak_mib": peak_rss_mib(), "losses": result.losses, "final_loss": result.losses[-1],
        "prepare": prepare[0] if prepare else None, "prepare_end": prepare[-1] if prepare else None,
        "first_step_s": step_times[0][1] - started if step_times else None,
    }


def paired_step_times(run, floor_step, train_in) -> tuple[list[float], list[float]]:
    """Train `run`, timing each trainer step and, right after it, one `floor_step()` (which times
    itself), so both are measured under the same load; the floor is warmed once first."""
    floor_step()  # warm
    trainer_s, floor_s, last = [], [], [None]

    def on_event(event) -> None:
        if event.type != "step":
            return
        now = time.perf_counter()
        if last[0] is not None:
            trainer_s.append(now - last[0])
            floor_s.append(floor_step())
        last[0] = time.perf_counter()

    train_in(run, on_event)
    return trainer_s, floor_s


def run_floor(spec: dict) -> dict:
    """The trainer's step and its floor, paired: after each step event of a fully cached run, one
    floor step on the same prepared models, timed apart from the trainer's. The floor is the
    UNet's forward and backward on one batch of cached inputs plus the LoRA optimizer step (with
    zero_grad), nothing else. Pairing keeps both under the same load on a shared machine."""
    import torch

    from trainer import data
    from trainer.config import load_config
    from trainer.loop import _train_in, draw_inputs, setup

    config = load_config(spec["config"])
    with data.dataset_folder(config.train_data_dir) as folder:
        run = setup(config, folder)
        batch = next(iter(run.dataloader))
        with torch.no_grad():
            latents, noise, timesteps, conditioning = draw_inputs(run, batch)
        scheduler, optimizer = run.components.noise_scheduler, getattr(run.optimizer, "optimizer", run.optimizer)
        device = latents.device

        def floor_step() -> float:
            begin = time.perf_counter()
            noisy = scheduler.add_noise(latents, noise, timesteps)
            prediction = run.family.predict(run.unet, noisy, timesteps, conditioning)
            loss = torch.nn.functional.mse_loss(prediction.float(), noise.float())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if device.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - begin

        trainer_s, floor_s = paired_step_times(run, floor_step, _train_in)
    warmup = spec["warmup"]
    trainer_s, floor_s = trainer_s[warmup:], floor_s[warmup:]
    ratios = [t / f for t, f in zip(trainer_s, floor_s)]
    return {"floor_s": statistics.median(floor_s), "trainer_s": statistics.median(trainer_s),
            "ratio": statistics.median(ratios), "peak_mib": peak_rss_mib()}


def execute(spec: dict, inline: bool) -> dict:
    """Run one spec in a fresh interpreter (or here, in quick mode) and return its result."""
    spec = {**spec, "threads": THREADS}
    if inline:
        # The same torch threads as a child run gets: on a loaded 2-core machine a second OpenMP
        # thread spins against other processes (a quick SDXL floor step took 8 s with two, at load 9).
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(spec["threads"])
        try:
            return (run_floor if spec["kind"] == "floor" else run_train)(spec)
        finally:
            torch.set_num_threads(threads)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(spec["threads"])}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.trainer", "--child", json.dumps(spec)],
        capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[1],
    )
    if proc.returncode != 0:  # the library chatter on stderr is shown only when it failed
        sys.stderr.write(proc.stdout[-5000:] + proc.stderr[-5000:])
        raise SystemExit(f"bench: {spec['name']} failed (exit {proc.returncode})")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise SystemExit(f"bench: {spec['name']} printed no result")


# --------------------------------------------------------------------------------------------
# Workloads


def make_dataset(folder: Path, count: int, size: int) -> Path:
    """`count` images: the generator's distinct ones (captions repeat past 168 anyway), copied
    under new names past 200, which keeps a 10,000-image set quick to write. Each copy carries a
    text chunk naming it: the same pixels, other bytes, so the cache (keyed by a file's content)
    sees `count` distinct images, as in a real dataset, not 200 shared ones."""
    from trainer.sample_data import write_sample_dataset

    write_sample_dataset(folder, n_images=min(count, 200), size=size)
    for i in range(200, count):
        source = folder / f"{i % 200:04d}"
        png = source.with_suffix(".png").read_bytes()
        text = b"Comment\0loraq bench copy %d" % i
        chunk = struct.pack(">I", len(text)) + b"tEXt" + text + struct.pack(">I", zlib.crc32(b"tEXt" + text))
        (folder / f"{i:05d}.png").write_bytes(png[:-12] + chunk + png[-12:])  # before the 12-byte IEND
        shutil.copyfile(source.with_suffix(".txt"), folder / f"{i:05d}.txt")
    return folder


def write_sd15_half(folder: Path) -> Path:
    """The tiny pipeline with an SD-1.5-shaped UNet at half width (160-320-640-640, 2 layers a
    block, cross-attention 768) and a one-layer 768-wide text encoder, random weights."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from trainer.tiny import write_tiny_model

    write_tiny_model(folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        UNet2DConditionModel(sample_size=16, block_out_channels=(160, 320, 640, 640), layers_per_block=2,
                             cross_attention_dim=768, attention_head_dim=8).save_pretrained(folder / "unet")
        tiny = json.loads((folder / "text_encoder" / "config.json").read_text())
        CLIPTextModel(CLIPTextConfig(
            vocab_size=tiny["vocab_size"], hidden_size=768, intermediate_size=1024, num_hidden_layers=1,
            num_attention_heads=12, max_position_embeddings=77, bos_token_id=tiny["bos_token_id"],
            eos_token_id=tiny["eos_token_id"], pad_token_id=tiny.get("pad_token_id"),
        )).save_pretrained(folder / "text_encoder")
    return folder


# The SD-1.5 half-width floor: about 2 s a step in fp32 with one torch thread (and as much again for
# its paired floor step), so about two minutes a run.
SD15_HALF = {"steps": 20, "warmup": 3, "repeats": 2}


def safetensors_parameters(folder: Path) -> int:
    """The number of parameters in a model folder's safetensors files, read from their headers."""
    total = 0
    for file in folder.glob("*.safetensors"):
        with open(file, "rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        for name, entry in header.items():
            if name != "__metadata__":
                count = 1
                for n in entry["shape"]:
                    count *= n
                total += count
    return total


# SDXL's UNet (stabilityai/stable-diffusion-xl-base-1.0) and text encoders (CLIP ViT-L, OpenCLIP
# bigG): the mid-size shape scales their widths by one factor, keeping the number of heads.
SDXL_UNET = {"block_out_channels": (320, 640, 1280), "transformer_layers_per_block": (1, 2, 10),
             "attention_head_dim": (5, 10, 20), "layers_per_block": 2, "norm_num_groups": 32,
             "addition_time_embed_dim": 256, "text_widths": (768, 1280)}


def sdxl_shape(width: float) -> dict:
    """SDXL's dimensions at `width` times its widths: channels, the text encoders' widths (so the
    cross-attention width, their concatenation), the pooled embedding and the time embedding
    scale with it; the transformer layers a block scale too (at least one), heads stay."""
    unet = SDXL_UNET
    return {
        "block_out_channels": tuple(round(c * width) for c in unet["block_out_channels"]),
        "transformer_layers_per_block": tuple(max(1, round(n * width)) for n in unet["transformer_layers_per_block"]),
        "attention_head_dim": unet["attention_head_dim"], "layers_per_block": unet["layers_per_block"],
        # SDXL's 10 channels a group
        "norm_num_groups": round(unet["norm_num_groups"] * width),
        "addition_time_embed_dim": round(unet["addition_time_embed_dim"] * width),
        "text_widths": tuple(round(w * width) for w in unet["text_widths"]),
    }


def write_sdxl_mid(folder: Path, width: float = 0.25) -> Path:
    """The tiny SDXL pipeline (trainer.tiny: tokenizers, VAE, scheduler, the UNet's text-time
    conditioning) with its UNet and both text encoders rebuilt at SDXL's shape scaled by `width`
    (three levels, 2 resnets a level, cross-attention on the two lower ones), random weights. The
    text encoders keep two layers: with their embeddings cached they never run in a step."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from trainer.tiny import write_tiny_model

    shape = sdxl_shape(width)
    write_tiny_model(folder, family="sdxl")
    unet = json.loads((folder / "unet" / "config.json").read_text())
    text_1, text_2 = shape["text_widths"]
    unet.update(
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=shape["block_out_channels"], layers_per_block=shape["layers_per_block"],
        transformer_layers_per_block=shape["transformer_layers_per_block"],
        attention_head_dim=shape["attention_head_dim"], norm_num_groups=shape["norm_num_groups"],
        cross_attention_dim=text_1 + text_2, addition_time_embed_dim=shape["addition_time_embed_dim"],
        projection_class_embeddings_input_dim=6 * shape["addition_time_embed_dim"] + text_2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        UNet2DConditionModel.from_config(unet).save_pretrained(folder / "unet")
        for name, cls, hidden, extra in (("text_encoder", CLIPTextModel, text_1, {}),
                                         ("text_encoder_2", CLIPTextModelWithProjection, text_2,
                                          {"projection_dim": text_2})):
            tiny = json.loads((folder / name / "config.json").read_text())
            cls(CLIPTextConfig(
                vocab_size=tiny["vocab_size"], hidden_size=hidden, intermediate_size=4 * hidden,
                num_hidden_layers=2, num_attention_heads=hidden // 64, max_position_embeddings=77,
                bos_token_id=tiny["bos_token_id"], eos_token_id=tiny["eos_token_id"],
                pad_token_id=tiny.get("pad_token_id"), **extra,
            )).save_pretrained(folder / name)
    return folder


class LoadSampler:
    """The 1-minute load average, read every second in a thread while the bench runs, so each part
    reports the load it ran under (the machine may be shared; this bench's own run counts as 1)."""

    def __init__(self, interval: float = 1.0):
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    def _run(self, interval: float) -> None:
        while True:
            self.samples.append((time.monotonic(), os.getloadavg()[0]))
            if self._stop.wait(interval):
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def describe(self, since: float) -> str:
        loads = [load for t, load in self.samples if t >= since] or [os.getloadavg()[0]]
        return (f"load average (1 min) during these runs: mean {statistics.fmean(loads):.1f}, "
                f"{min(loads):.1f}-{max(loads):.1f} ({os.cpu_count()} cores)")


class Bench:
    def __init__(self, args: argparse.Namespace, tmp: Path):
        self.args = args
        self.sizes = QUICK if args.quick else FULL
        self.tmp = tmp
        self.inline = args.quick
        self.model: Path | None = None
        self.datasets: dict[int, Path] = {}
        self.counter = 0
        self.loads = LoadSampler()

    def tiny_model(self) -> Path:
        if self.model is None:
            from trainer.tiny import write_tiny_model
            self.model = write_tiny_model(self.tmp / "tiny-sd")
        return self.model

    def dataset(self, count: int) -> Path:
        if count not in self.datasets:
            self.datasets[count] = make_dataset(self.tmp / f"data-{count}", count, self.sizes["image_size"])
        return self.datasets[count]

    def config(self, images: int, **options) -> dict:
        self.counter += 1
        s = self.sizes
        return {"pretrained_model_name_or_path": str(self.tiny_model()), "train_data_dir": str(self.dataset(images)),
                "resolution": s["resolution"], "center_crop": True, "random_flip": True,
                "train_batch_size": s["batch"], "seed": 0, "device": self.args.device,
                "checkpointing_steps": 10**9, "output_dir": str(self.tmp / "runs" / str(self.counter)), **options}

    def train(self, name: str, config: dict, warmup: int = 5) -> dict:
        load_before = os.getloadavg()[0]
        result = execute({"kind": "train", "name": name, "config": config, "warmup": warmup}, self.inline)
        median = f"{result['median_step_s'] * 1000:.1f}" if result["median_step_s"] else "-"
        print(f"bench: {name}: wall {result['wall_s']:.2f}s, {result['steps_per_s']:.2f} steps/s, "
              f"median step {median} ms, peak {result['peak_mib']:.0f} MiB, final loss {result['final_loss']:.6f} "
              f"(load {load_before:.1f} -> {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)
        return result

    def alternate(self, variants: dict[str, dict], warmup: int = 5, repeats: int | None = None) -> dict[str, list[dict]]:
        runs = {name: [] for name in variants}
        for repeat in range(repeats or self.sizes["repeats"]):
            for name, options in variants.items():
                runs[name].append(self.train(f"{name} {repeat + 1}", self.config(**options), warmup))
        return runs


def best(runs: list[dict], key: str = "wall_s", high: bool = False) -> dict:
    return (max if high else min)(runs, key=lambda r: r[key])


def max_loss_diff(reference: list[float], runs: list[dict]) -> float:
    diff = 0.0
    for run in runs:
        if len(run["losses"]) != len(reference):
            return float("inf")
        diff = max([diff, *(abs(a - b) for a, b in zip(run["losses"], reference))])
    return diff


# --------------------------------------------------------------------------------------------
# Scenarios: each returns (markdown lines, figures for the caller, losses agree)


def scenario_cache(bench: Bench) -> tuple[list[str], dict, bool]:
    s = bench.sizes["cache"]
    runs = bench.alternate({"default": {"images": s["images"], "max_train_steps": s["steps"]},
                            "plain": {"images": s["images"], "max_train_steps": s["steps"], "cache_latents": False}},
                           repeats=s.get("repeats"))
    d, p = best(runs["default"]), best(runs["plain"])
    diff = max_loss_diff(runs["plain"][0]["losses"], runs["default"] + runs["plain"])
    ratio = d["wall_s"] / p["wall_s"]
    lines = [
        f"### Cache as you go: {s['images']} images, {s['steps']} steps",
        "",
        "| variant | wall time, s (best) | range, s | first step at, s | cache plan | peak RSS, MiB | final loss |",
        "| --- | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for name, r, rs in (("default (cache as shipped)", d, runs["default"]), ("plain (cache_latents=false)", p, runs["plain"])):
        plan = r["prepare"]
        plan_text = f"{plan['mode']}, {plan['done']}/{plan['total']} cached at start" if plan else "off"
        lines.append(f"| {name} | {r['wall_s']:.2f} | {min(x['wall_s'] for x in rs):.2f}-{max(x['wall_s'] for x in rs):.2f} | "
                     f"{r['first_step_s']:.2f} | {plan_text} | {r['peak_mib']:.0f} | {r['final_loss']:.6f} |")
    pairs = pair_ratios(runs["default"], runs["plain"], "wall_s")
    lines += ["", f"**default / plain wall time: {ratio:.3f}x** (best of each; target at most 1.05x); side by "
              f"side, run after run: {', '.join(f'{x:.3f}x' for x in pairs)}; max |loss difference| {diff:.1e}."]
    return lines, {"cache_ratio": ratio}, diff <= LOSS_TOLERANCE


def pair_ratios(slow: list[dict], fast: list[dict], key: str) -> list[float]:
    """slow / fast for each repeat's two runs, which ran one right after the other (the arms
    alternate), so each ratio compares runs under about the same load."""
    return [a[key] / b[key] for a, b in zip(slow, fast)]


def scenario_epochs(bench: Bench) -> tuple[list[str], dict, bool]:
    s = bench.sizes["epochs"]
    common = {"images": s["images"], "num_train_epochs": s["epochs"]}
    runs = bench.alternate({"default": common, "plain": {**common, "cache_latents": False}},
                           warmup=bench.sizes["floor"]["warmup"], repeats=s.get("repeats"))
    d, p = best(runs["default"], "median_step_s"), best(runs["plain"], "median_step_s")
    dc, pc = best(runs["default"], "median_cpu_s"), best(runs["plain"], "median_cpu_s")
    dw, pw = best(runs["default"]), best(runs["plain"])
    diff = max_loss_diff(runs["plain"][0]["losses"], runs["default"] + runs["plain"])
    plan = d["prepare_end"] or {}
    pairs = pair_ratios(runs["plain"], runs["default"], "median_step_s")
    speedup = p["median_step_s"] / d["median_step_s"]
    cpu_speedup = pc["median_cpu_s"] / dc["median_cpu_s"]
    lines = [
        f"### Many epochs of a small dataset: {s['images']} images, {s['epochs']} epochs ({d['steps']} steps)",
        "",
        f"The two variants alternate (default, plain, default, ...), {len(runs['default'])} runs each; "
        "each is shown by its best run. Step: the median time between step events after the warm-up "
        "(a load burst moves a mean, not a median); CPU: the median CPU time of the run's process a "
        "step (one torch thread), which the time other processes hold the core does not inflate.",
        "",
        "| variant | median step, ms (best) | range, ms | steps/s | CPU a step, ms (best) | range, ms | "
        "wall time, s (best) | cache plan | final loss |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for name, r, c, w, rs, text in (
            ("default (cache as shipped)", d, dc, dw, runs["default"],
             f"{plan.get('mode', 'off')}, {plan.get('total', 0)} entries encoded before step 1"),
            ("plain", p, pc, pw, runs["plain"], "off")):
        steps_ms = [x["median_step_s"] * 1000 for x in rs]
        cpu_ms = [x["median_cpu_s"] * 1000 for x in rs]
        lines.append(f"| {name} | {r['median_step_s'] * 1000:.1f} | {min(steps_ms):.1f}-{max(steps_ms):.1f} | "
                     f"{1 / r['median_step_s']:.2f} | {c['median_cpu_s'] * 1000:.1f} | "
                     f"{min(cpu_ms):.1f}-{max(cpu_ms):.1f} | {w['wall_s']:.2f} | {text} | {r['final_loss']:.6f} |")
    lines += [
        "",
        f"**default / plain: {speedup:.2f}x steps/s** (each arm's best median step); side by side, run after "
        f"run: {', '.join(f'{x:.2f}x' for x in pairs)} (median {statistics.median(pairs):.2f}x); "
        f"**{cpu_speedup:.2f}x by CPU time a step**; {pw['wall_s'] / dw['wall_s']:.2f}x faster wall time; "
        f"max |loss difference| {diff:.1e}.",
    ]
    return (lines, {"epochs_speedup": speedup, "epochs_speedup_pairs": statistics.median(pairs),
                    "epochs_speedup_cpu": cpu_speedup}, diff <= LOSS_TOLERANCE)


def scenario_rss(bench: Bench) -> tuple[list[str], dict, bool]:
    s = bench.sizes["rss"]
    rows, figures = [], {}
    common = {"max_train_steps": s["steps"], "cache_upfront": True}
    results = {}
    for images in (s["small"], s["large"]):
        for budget in (None, 16):
            options = {**common, **({"cache_ram_mb": budget} if budget is not None else {})}
            label = f"{images} images, {'cache_ram_mb=16' if budget else 'default RAM budget'}"
            results[(images, budget)] = best([bench.train(f"rss {label} {i + 1}", bench.config(images, **options))
                                             for i in range(1 if bench.args.quick else 1)], "peak_mib")
            r = results[(images, budget)]
            rows.append(f"| {label} | {r['peak_mib']:.0f} | {r['prepare_end']['total']} | "
                        f"{r['prepare_end']['t']:.1f} | {r['wall_s']:.1f} |")
    growth = {budget: results[(s["large"], budget)]["peak_mib"] - results[(s["small"], budget)]["peak_mib"]
              for budget in (None, 16)}
    lines = [
        f"### Memory: {s['large']:,} images against {s['small']}, every entry cached",
        "",
        "Each run fills the cache completely before its first step (`cache_upfront`: both "
        "orientations of every image and every caption), then trains "
        f"{s['steps']} steps.",
        "",
        "| run | peak RSS, MiB | entries | cache filled at, s | wall time, s |",
        "| --- | ---: | ---: | ---: | ---: |",
        *rows,
        "",
        f"**Peak RSS growth from {s['small']} to {s['large']:,} images: {growth[None]:.0f} MiB with the default "
        f"budget, {growth[16]:.0f} MiB with cache_ram_mb=16** (target: within 300 MB).",
    ]
    figures["rss_growth_mib"] = growth[None]
    figures["rss_growth_spill_mib"] = growth[16]
    return lines, figures, True


def scenario_sweep(bench: Bench) -> tuple[list[str], dict, bool]:
    s = bench.sizes["sweep"]
    grid = [(1e-4, 4), (1e-4, 8), (5e-4, 4), (5e-4, 8)]
    totals, encoded, agree = {}, {}, True
    for mode in ("shared", "private") * (1 if bench.args.quick else 2):
        root = bench.tmp / f"sweep-cache-{mode}-{len(totals.get(mode, []))}"
        wall, enc = 0.0, []
        for lr, rank in grid:
            options = {"images": s["images"], "max_train_steps": s["steps"], "learning_rate": lr, "rank": rank,
                       "random_flip": False}
            if mode == "shared":
                options["cache_dir"] = str(root)
            r = bench.train(f"sweep {mode} lr={lr} rank={rank}", bench.config(**options))
            wall += r["wall_s"]
            plan = r["prepare"] or {}
            enc.append(plan.get("total", 0) - plan.get("done", 0))
        totals.setdefault(mode, []).append(wall)
        encoded[mode] = enc
    totals = {mode: min(walls) for mode, walls in totals.items()}
    segments = sorted((bench.tmp / "sweep-cache-shared-0").glob("v1/*/seg-*"))
    entries = sum(len(json.loads((seg / "index.json").read_text())["entries"].get("latent", {})) for seg in segments)
    lines = [
        f"### A 2x2 sweep over one dataset: {s['images']} images, 4 jobs of {s['steps']} steps",
        "",
        "Learning rate x rank, without random_flip (so every entry a job needs is drawn in its first "
        "epoch; with flips an orientation is encoded the first time any job of the sweep draws it).",
        "",
        "| caches | total wall time of the 4 jobs, s (best sweep) | entries each job found missing at its start |",
        "| --- | ---: | --- |",
        f"| one shared `cache_dir` (as the worker runs them) | {totals['shared']:.1f} | {', '.join(map(str, encoded['shared']))} |",
        f"| a private cache per job | {totals['private']:.1f} | {', '.join(map(str, encoded['private']))} |",
        "",
        f"Shared: the published segments hold {entries} image entries (each (image, orientation) once, "
        f"{len(segments)} segment(s)): the sweep encoded the dataset once.",
    ]
    return lines, {"sweep_entries": entries, "sweep_missing": encoded["shared"]}, agree


FLOOR_METHOD = (
    "Floor: the UNet's forward and backward on one batch of cached inputs plus the LoRA optimizer "
    "step. Trainer: the time from one step event to the next of a fully cached run "
    "(`cache_upfront`): data loading, sampling the posterior, noise, loss, clipping, the "
    "scheduler and the step event included. The two are paired: after each step event one floor "
    "step runs on the same prepared models (timed apart), so both see the same load on a shared "
    "machine; trainer / floor is the median of the paired ratios, warm-up left out, best of the "
    "repeats (range over them).")
FLOOR_TABLE = ["| shape | precision | trainer step, ms | floor, ms | trainer / floor | range |",
               "| --- | --- | ---: | ---: | ---: | ---: |"]


def floor_rows(bench: Bench, shapes: list[dict], precisions: tuple[str, ...]) -> tuple[list[str], dict]:
    """Time each shape's trainer step against its floor (run_floor) in each precision; one table
    row a (shape, precision), its best repeat by paired ratio. A shape: name, model, family,
    resolution, batch, steps, warmup, repeats, and its key in the figures."""
    rows, figures = [], {}
    for shape in shapes:
        name = shape["name"]
        for precision in precisions:
            results = []
            for repeat in range(shape["repeats"]):
                config = bench.config(16, max_train_steps=shape["steps"], cache_upfront=True,
                                      mixed_precision=precision, pretrained_model_name_or_path=str(shape["model"]),
                                      resolution=shape["resolution"], train_batch_size=shape["batch"],
                                      **({"family": shape["family"]} if shape["family"] != "sd" else {}))
                load_before = os.getloadavg()[0]
                results.append(execute({"kind": "floor", "name": f"floor {name} {precision}", "config": config,
                                        "warmup": shape["warmup"]}, bench.inline))
                r = results[-1]
                print(f"bench: floor {name} {precision} {repeat + 1}: trainer {r['trainer_s'] * 1000:.1f} ms, "
                      f"floor {r['floor_s'] * 1000:.1f} ms, paired ratio {r['ratio']:.3f} "
                      f"(load {load_before:.1f} -> {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)
            ratios = [r["ratio"] for r in results]
            r = min(results, key=lambda r: r["ratio"])
            label = "fp32" if precision == "no" else precision
            figures[f"floor_{shape['key']}_{label}"] = r["ratio"]
            rows.append(f"| {name}, {shape['resolution']} px, batch {shape['batch']} | {label} | "
                        f"{r['trainer_s'] * 1000:.1f} | {r['floor_s'] * 1000:.1f} | **{r['ratio']:.2f}x** | "
                        f"{min(ratios):.2f}-{max(ratios):.2f} |")
    return rows, figures


def scenario_floor(bench: Bench) -> tuple[list[str], dict, bool]:
    s, sizes = bench.sizes["floor"], bench.sizes
    shapes = [{"name": "tiny", "key": "tiny", "model": bench.tiny_model(), "family": "sd", "resolution": sizes["resolution"],
               "batch": sizes["batch"], "steps": s["steps"], "warmup": s["warmup"], "repeats": sizes["repeats"]}]
    if bench.args.sd15_half and not bench.args.quick:
        shapes.append({"name": "SD-1.5 half width", "key": "sd15_half", "model": write_sd15_half(bench.tmp / "sd15-half"),
                       "family": "sd", "resolution": 128, "batch": 2, **SD15_HALF})
    rows, figures = floor_rows(bench, shapes, ("no",) if bench.args.quick else ("no", "bf16"))
    lines = ["### The trainer's step against its floor", "", FLOOR_METHOD, "", *FLOOR_TABLE, *rows]
    if bench.args.sd15_half and not bench.args.quick:
        lines += ["", f"SD-1.5 half width: {SD15_HALF['steps']} steps a run, the first {SD15_HALF['warmup']} "
                  f"left out, {SD15_HALF['repeats']} run(s) a precision."]
    else:
        lines += ["", "The SD-1.5 half-width shape was left out (`--no-sd15-half`, or quick mode)."]
    return lines, figures, True


def scenario_sdxl(bench: Bench) -> tuple[list[str], dict, bool]:
    s = bench.sizes["sdxl"]
    model = write_sdxl_mid(bench.tmp / "sdxl-mid", s["width"])
    shape = sdxl_shape(s["width"])
    parameters = safetensors_parameters(model / "unet")
    shapes = [{"name": f"SDXL at {s['width']:g} width", "key": "sdxl", "model": model, "family": "sdxl", **s}]
    rows, figures = floor_rows(bench, shapes, ("no", "bf16"))
    lines = [
        "### SDXL: the trainer's step against its floor",
        "",
        f"A mid-size SDXL-shaped pipeline, random weights, built here (`bench.trainer.write_sdxl_mid`: "
        f"`python -m trainer tiny-model --family sdxl` with its UNet and text encoders rebuilt at "
        f"{s['width']:g} of SDXL's widths): UNet blocks {'-'.join(map(str, shape['block_out_channels']))} "
        f"(SDXL 320-640-1280), transformer layers a block "
        f"{'-'.join(map(str, shape['transformer_layers_per_block']))} (SDXL 1-2-10), "
        f"{'-'.join(map(str, shape['attention_head_dim']))} heads, 2 resnets a level, cross-attention "
        f"{sum(shape['text_widths'])} wide (the two encoders' {shape['text_widths'][0]} + "
        f"{shape['text_widths'][1]}; SDXL 2048), text-time conditioning (time embedding "
        f"{shape['addition_time_embed_dim']}, pooled {shape['text_widths'][1]}): "
        f"{parameters / 1e6:.0f}M UNet parameters (SDXL 2,567M). {s['resolution']} px, batch {s['batch']}, "
        f"{s['steps']} steps a run, the first {s['warmup']} left out, {s['repeats']} run(s) a precision; "
        "the time ids from each image's recorded size and crop, both encoders' embeddings cached.",
        "",
        FLOOR_METHOD,
        "",
        *FLOOR_TABLE,
        *rows,
    ]
    return lines, figures, True


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
    parts = [f"{os.cpu_count()} CPU cores ({cpu})", f"torch {torch.__version__} ({THREADS} thread{'s' if THREADS > 1 else ''} a run)",
             f"device {device}"]
    if device == "cuda" and torch.cuda.is_available():
        parts[-1] += f" ({torch.cuda.get_device_name()})"
    return ", ".join(parts)


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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.trainer", description=__doc__.split("\n")[0])
    parser.add_argument("--only", default=",".join(SCENARIOS), help=f"comma-separated subset of {','.join(SCENARIOS)}")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat, runs inline (for make test)")
    parser.add_argument("--no-sd15-half", dest="sd15_half", action="store_false",
                        help="leave the SD-1.5 half-width shape out of the floor part (a few minutes)")
    # the default now; kept so older command lines still run
    parser.add_argument("--sd15-half", dest="sd15_half", action="store_true", default=True, help=argparse.SUPPRESS)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default auto")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="default BENCHMARKS.md")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: one run's spec as JSON
    args = parser.parse_args(argv)
    args.scenarios = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(args.scenarios) - set(SCENARIOS))
    if unknown:
        parser.error(f"--only: unknown scenario(s) {', '.join(unknown)} (choose from {', '.join(SCENARIOS)})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps((run_floor if spec["kind"] == "floor" else run_train)(spec)), flush=True)
        return 0

    os.environ["HF_HUB_OFFLINE"] = "1"
    global THREADS
    THREADS = args.threads
    given = sys.argv[1:] if argv is None else argv
    command = COMMAND if not given else "python -m bench.trainer " + " ".join(given)
    started = time.perf_counter()
    sections, figures, agree = {}, {}, True
    functions = {"cache": scenario_cache, "epochs": scenario_epochs, "rss": scenario_rss,
                 "sweep": scenario_sweep, "floor": scenario_floor, "sdxl": scenario_sdxl}
    sizes = QUICK if args.quick else FULL

    def report(load: str, done: bool) -> str:
        header = [
            "## Trainer: the latent cache, memory, a shared sweep, and the step against its floor (SD, SDXL)",
            "",
            f"- Command: `{command}`",
            f"- Date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
            f"- Machine: {machine_description(args.device)}; {load} (the machine is shared: ratios compare "
            "runs made side by side, never figures from different runs)",
            f"- Workload: tiny SD model, generated {sizes['image_size']} px images, resolution {sizes['resolution']}, "
            f"center_crop, random_flip, batch {sizes['batch']}, seed 0, fp32 unless said, no checkpoints or "
            f"validation; each run in its own process{' (quick mode: inline)' if args.quick else ''}, variants "
            f"alternating, best of {sizes['repeats']} shown unless said; the SDXL part says its own workload.",
            f"- Loss curves {'agree' if agree else 'DISAGREE'} with the uncached runs (tolerance {LOSS_TOLERANCE:.0e}).",
            "",
        ]
        if not done:
            header.insert(-1, "- Unfinished: the parts not shown had not run when this was written.")
        # In SCENARIOS order, whatever order they ran in.
        return "\n".join(header + [line for name in SCENARIOS for line in sections.get(name, [])])

    with tempfile.TemporaryDirectory(prefix="loraq-bench-") as tmp:
        bench = Bench(args, Path(tmp))
        for index, name in enumerate(args.scenarios):
            since = time.monotonic()
            lines, found, ok = functions[name](bench)
            sections[name] = lines + ["", f"Load: {bench.loads.describe(since)}.", ""]
            figures.update(found)
            agree &= ok
            if index < len(args.scenarios) - 1 and not args.quick:
                # What a long bench measured so far survives it being stopped.
                replace_section(args.output, SECTION, report(bench.loads.describe(0.0), done=False))
        bench.loads.stop()
        body = report(bench.loads.describe(0.0), done=True)
    replace_section(args.output, SECTION, body)
    print(body)
    print(f"\nbench: wrote {args.output} ({time.perf_counter() - started:.0f}s); figures {json.dumps(figures)}",
          file=sys.stderr)
    if not agree:
        print(f"bench: the loss curves differ by more than {LOSS_TOLERANCE:.0e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
