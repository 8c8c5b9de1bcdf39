"""Flow-matching benchmark: the Flux family's training step against its floor and against
diffusers' own Flux LoRA script, and peak memory with and without caching (which frees the text
encoders).

    make bench                     # or: python -m bench.flow [--only tiny,mid] [--no-script]
    python -m bench.flow --quick --output /tmp/B.md   # seconds; what `make test` runs once

Two Flux-shaped pipelines with random weights: the tiny demo model (`python -m trainer
tiny-model --family flux`: dev-like, guidance embedding) at 32 px, and a mid-size one built here
(a 6-head x 64 transformer, 2 double and 4 single blocks, ~20M parameters; T5 of width 384 and 6
layers, ~14M) at 256 px, sized for seconds a step on a CPU. Per shape, each in its own process:

* ``cached``: the trainer as shipped: latents and text embeddings cached up front, the text
  encoders freed before the first step (`cache_latents` on, `cache_upfront`).
* ``uncached``: `cache_latents=false`: VAE and both text encoders run every step, as the script.
* ``floor``: the transformer's forward and backward on one batch of cached inputs plus the LoRA
  optimizer step, paired step by step with a cached run's steps (as bench.trainer's floor).
* ``script``: diffusers' `examples/dreambooth/train_dreambooth_lora_flux.py`, unmodified, on the
  same model and captioned images (`--dataset_name` an imagefolder, `--caption_column text`, so
  it encodes prompts and images every step). It needs a diffusers checkout (`--diffusers`,
  default the fetched mirror) and torchvision + datasets (`--script-deps`, a folder appended to
  sys.path), neither of which the project installs; left out (and said so) when missing.
  Its step times come from a global optimizer-step hook registered before the script runs.

Step time: the median time between optimizer steps after the warm-up. Peak memory: the
process's peak RSS (CPU). All runs: fp32, batch 2 (tiny) / 1 (mid), rank 4, seed 0, one torch
thread, no checkpoints or validation, `max_sequence_length` 32 (tiny) / 128 (mid).
Results go between ``<!-- bench:flow -->`` markers in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.trainer import paired_step_times, peak_rss_mib

SECTION = "flow"
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = ROOT / "BENCHMARKS.md"
DEFAULT_DIFFUSERS = Path("/work/.mirror/huggingface+diffusers/repo")
DEFAULT_SCRIPT_DEPS = Path("/tmp/flowdeps")
SCRIPT_PATH = "examples/dreambooth/train_dreambooth_lora_flux.py"
SHAPES = ("tiny", "mid")
THREADS = 1

# repeats: the runs of a shape alternate (cached, uncached, floor, script, cached, ...) and each is
# reported by its fastest repeat: on a shared machine another process's burst slows a run, never
# speeds it up (one tiny run measured 3x slower beside a browser test).
FULL = {"tiny": {"resolution": 32, "batch": 2, "steps": 20, "warmup": 4, "tokens": 32, "images": 8, "repeats": 3},
        "mid": {"resolution": 256, "batch": 1, "steps": 8, "warmup": 2, "tokens": 128, "images": 8, "repeats": 1}}
QUICK = {"tiny": {"resolution": 32, "batch": 2, "steps": 4, "warmup": 1, "tokens": 16, "images": 4, "repeats": 1}}


def _median_step(times: list[float], warmup: int) -> float | None:
    deltas = [b - a for a, b in zip(times, times[1:])][warmup:]
    return statistics.median(deltas) if deltas else None


# --------------------------------------------------------------------------------------------
# One run each, in a child process (or inline in quick mode)


def run_train(spec: dict) -> dict:
    from trainer.config import load_config
    from trainer.loop import train

    config = load_config(spec["config"], family="flux")
    times: list[float] = []
    started = time.perf_counter()
    result = train(config, lambda e: times.append(time.perf_counter()) if e.type == "step" else None)
    return {"wall_s": time.perf_counter() - started, "step_s": _median_step(times, spec["warmup"]),
            "peak_mib": peak_rss_mib(), "losses": result.losses}


def run_floor(spec: dict) -> dict:
    """After each step event of a fully cached run, one floor step on the same prepared models."""
    import torch

    from trainer import data
    from trainer.config import load_config
    from trainer.loop import _train_in, draw_inputs, setup

    config = load_config(spec["config"], family="flux")
    with data.dataset_folder(config.train_data_dir) as folder:
        run = setup(config, folder)
        batch = next(iter(run.dataloader))
        with torch.no_grad():
            latents, noise, timesteps, conditioning = draw_inputs(run, batch)
        objective, optimizer = run.objective, getattr(run.optimizer, "optimizer", run.optimizer)

        def floor_step() -> float:
            begin = time.perf_counter()
            noisy = objective.noisy_input(latents, noise, timesteps)
            target = objective.target(latents, noise, timesteps)
            prediction = objective.prediction(run.family.predict(run.unet, noisy, timesteps, conditioning),
                                              noisy, timesteps)
            objective.loss(prediction, target, timesteps).backward()
            optimizer.step()
            optimizer.zero_grad()
            return time.perf_counter() - begin

        trainer_s, floor_s = paired_step_times(run, floor_step, _train_in)
    warmup = spec["warmup"]
    trainer_s, floor_s = trainer_s[warmup:] or trainer_s, floor_s[warmup:] or floor_s
    return {"trainer_s": statistics.median(trainer_s), "floor_s": statistics.median(floor_s),
            "ratio": statistics.median(t / f for t, f in zip(trainer_s, floor_s)), "peak_mib": peak_rss_mib()}


def run_script(spec: dict) -> dict:
    """The unmodified diffusers script in this process, timed by a global optimizer-step hook."""
    import runpy

    from torch.optim.optimizer import register_optimizer_step_post_hook

    sys.path.append(spec["deps"])  # torchvision, datasets: after the venv's own packages
    times: list[float] = []
    register_optimizer_step_post_hook(lambda *args: times.append(time.perf_counter()))
    sys.argv = [spec["script"], *spec["args"]]
    started = time.perf_counter()
    runpy.run_path(spec["script"], run_name="__main__")
    return {"wall_s": time.perf_counter() - started, "step_s": _median_step(times, spec["warmup"]),
            "peak_mib": peak_rss_mib(), "steps": len(times)}


KINDS = {"train": run_train, "floor": run_floor, "script": run_script}


def execute(spec: dict, inline: bool) -> dict:
    if inline:
        return KINDS[spec["kind"]](spec)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(THREADS), "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-m", "bench.flow", "--child", json.dumps(spec)],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-5000:] + proc.stderr[-5000:])
        raise SystemExit(f"bench.flow: {spec['name']} failed (exit {proc.returncode})")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise SystemExit(f"bench.flow: {spec['name']} printed no result")


# --------------------------------------------------------------------------------------------
# Models and data


def write_mid_flux(folder: Path) -> Path:
    """A mid-size Flux-dev-shaped pipeline (random weights; see the module docstring)."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    from trainer.tiny import _tiny_text_config, build_tokenizer
    from trainer.tiny_flow import _FLUX_VAE, _tiny_flow_vae, build_t5_tokenizer

    tokenizer, tokenizer_2 = build_tokenizer(), build_t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=64,
            num_attention_heads=6, joint_attention_dim=384, pooled_projection_dim=128, guidance_embeds=True,
            axes_dims_rope=(8, 28, 28))
        text_encoder = CLIPTextModel(_tiny_text_config(tokenizer, hidden_size=128))
        text_encoder_2 = T5EncoderModel(T5Config(
            vocab_size=len(tokenizer_2), d_model=384, d_kv=64, d_ff=1536, num_layers=6, num_heads=6,
            feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
            decoder_start_token_id=0))
        vae = _tiny_flow_vae(**_FLUX_VAE)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096)
    FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                 text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
                 transformer=transformer).save_pretrained(folder, safe_serialization=True)
    return folder


def parameter_counts(model: Path) -> dict[str, float]:
    from safetensors import safe_open

    counts = {}
    for part in ("transformer", "text_encoder_2", "text_encoder", "vae"):
        total = 0
        for file in (model / part).glob("*.safetensors"):
            with safe_open(str(file), "pt") as f:
                total += sum(_numel(f.get_slice(key).get_shape()) for key in f.keys())
        counts[part] = total / 1e6
    return counts


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def find_script(diffusers: Path, tmp: Path) -> Path | None:
    """The Flux script from a diffusers work tree, or read out of a bare clone (the fetched
    mirror) into `tmp` as it is; it imports nothing from its own folder."""
    if (diffusers / SCRIPT_PATH).is_file():
        return diffusers / SCRIPT_PATH
    out = tmp / Path(SCRIPT_PATH).name
    if out.is_file():
        return out
    proc = subprocess.run(["git", "--git-dir", str(diffusers), "show", f"HEAD:{SCRIPT_PATH}"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return None
    out.write_text(proc.stdout, encoding="utf-8")
    return out


def script_commit(diffusers: Path) -> str:
    proc = subprocess.run(["git", "--git-dir", str(diffusers), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        proc = subprocess.run(["git", "-C", str(diffusers), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True)
    return proc.stdout.strip() or "unknown"


def make_dataset(folder: Path, count: int, size: int) -> Path:
    """Captioned images with sidecar .txt files (the trainer), and beside them in
    `<folder>-imagefolder` the same images with a metadata.jsonl (the script's `datasets`
    imagefolder; .txt files there would make it a text dataset), the same captions in both."""
    from trainer.sample_data import write_sample_dataset

    write_sample_dataset(folder, n_images=count, size=size)
    imagefolder = script_dataset(folder)
    imagefolder.mkdir()
    with open(imagefolder / "metadata.jsonl", "w", encoding="utf-8") as out:
        for image in sorted(p for p in folder.iterdir() if p.suffix == ".png"):
            caption = image.with_suffix(".txt").read_text(encoding="utf-8").strip()
            (imagefolder / image.name).write_bytes(image.read_bytes())
            out.write(json.dumps({"file_name": image.name, "text": caption}) + "\n")
    return folder


def script_dataset(folder: Path) -> Path:
    return folder.with_name(folder.name + "-imagefolder")


# --------------------------------------------------------------------------------------------
# The benchmark


def trainer_config(model: Path, data: Path, out: Path, sizes: dict, **options) -> dict:
    return {"pretrained_model_name_or_path": str(model), "train_data_dir": str(data), "output_dir": str(out),
            "resolution": sizes["resolution"], "train_batch_size": sizes["batch"], "max_train_steps": sizes["steps"],
            "max_sequence_length": sizes["tokens"], "seed": 0, "rank": 4, "learning_rate": 1e-4,
            "lr_warmup_steps": 0, "checkpointing_steps": 10_000, "mixed_precision": "no", **options}


def script_args(model: Path, data: Path, out: Path, sizes: dict) -> list[str]:
    return ["--pretrained_model_name_or_path", str(model), "--dataset_name", str(script_dataset(data)),
            "--caption_column", "text",
            "--instance_prompt", "a photo", "--output_dir", str(out), "--resolution", str(sizes["resolution"]),
            "--train_batch_size", str(sizes["batch"]), "--max_train_steps", str(sizes["steps"]),
            "--max_sequence_length", str(sizes["tokens"]), "--seed", "0", "--rank", "4", "--learning_rate", "1e-4",
            "--lr_warmup_steps", "0", "--checkpointing_steps", "10000", "--mixed_precision", "no",
            "--guidance_scale", "3.5", "--center_crop", "--report_to", "tensorboard",
            "--dataloader_num_workers", "0"]


def bench_shape(name: str, args, tmp: Path, sizes: dict) -> tuple[list[str], dict]:
    inline = args.quick
    if name == "tiny":
        from trainer.tiny import write_tiny_model

        model = write_tiny_model(tmp / "tiny-flux", family="flux")
    else:
        model = write_mid_flux(tmp / "mid-flux")
    data = make_dataset(tmp / f"data-{name}", sizes["images"], max(64, sizes["resolution"]))
    specs = {}
    for variant, options in (("cached", {"cache_latents": True, "cache_upfront": True}),
                             ("uncached", {"cache_latents": False})):
        config = trainer_config(model, data, tmp / f"out-{name}-{variant}", sizes, **options)
        specs[variant] = {"kind": "train", "name": f"{name} {variant}", "config": config, "warmup": sizes["warmup"]}
    config = trainer_config(model, data, tmp / f"out-{name}-floor", sizes, cache_latents=True, cache_upfront=True)
    specs["floor"] = {"kind": "floor", "name": f"{name} floor", "config": config, "warmup": sizes["warmup"]}
    script, why_not = None, None
    diffusers_script = find_script(args.diffusers, tmp)
    if args.no_script or args.quick:
        why_not = "not run (--no-script or --quick)"
    elif diffusers_script is None:
        why_not = f"not run: no diffusers checkout at {args.diffusers} (--diffusers)"
    elif not (args.script_deps / "torchvision").is_dir() or not (args.script_deps / "datasets").is_dir():
        why_not = f"not run: torchvision and datasets not found in {args.script_deps} (--script-deps)"
    else:
        specs["script"] = {"kind": "script", "name": f"{name} script", "script": str(diffusers_script),
                           "deps": str(args.script_deps), "warmup": sizes["warmup"],
                           "args": script_args(model, data, tmp / f"out-{name}-script", sizes)}
    runs: dict[str, list[dict]] = {variant: [] for variant in specs}
    for repeat in range(sizes["repeats"]):
        for variant, spec in specs.items():
            r = execute(spec, inline)
            runs[variant].append(r)
            shown = f"trainer {r['trainer_s'] * 1000:.1f} ms, floor {r['floor_s'] * 1000:.1f} ms" if variant == "floor" \
                else f"{r['step_s'] * 1000:.1f} ms/step"
            print(f"bench.flow: {name} {variant} {repeat + 1}: {shown}, {r['peak_mib']:.0f} MiB", file=sys.stderr,
                  flush=True)
    results = {variant: min(runs[variant], key=lambda r: r["step_s"]) for variant in ("cached", "uncached")}
    floor = min(runs["floor"], key=lambda r: r["floor_s"])
    script = min(runs["script"], key=lambda r: r["step_s"]) if "script" in runs else None
    params = parameter_counts(model)
    label = (f"{name}: {sizes['resolution']} px, batch {sizes['batch']}, transformer {params['transformer']:.2f}M, "
             f"T5 {params['text_encoder_2']:.2f}M, CLIP {params['text_encoder']:.2f}M, VAE {params['vae']:.2f}M parameters")
    rows = [f"| {label.split(':')[0]} | trainer, cached (text encoders freed) | {results['cached']['step_s'] * 1000:.1f} "
            f"| {results['cached']['step_s'] / floor['floor_s']:.2f}x | {results['cached']['peak_mib']:.0f} |",
            f"| | trainer, uncached (encoders every step) | {results['uncached']['step_s'] * 1000:.1f} | "
            f"{results['uncached']['step_s'] / floor['floor_s']:.2f}x | {results['uncached']['peak_mib']:.0f} |",
            f"| | floor (paired with a cached run: trainer {floor['trainer_s'] * 1000:.1f} ms, "
            f"**{floor['ratio']:.2f}x**) | {floor['floor_s'] * 1000:.1f} | 1.00x | {floor['peak_mib']:.0f} |"]
    if script:
        rows.append(f"| | diffusers script, unmodified (at {script_commit(args.diffusers)}) | {script['step_s'] * 1000:.1f} | "
                    f"{script['step_s'] / floor['floor_s']:.2f}x | {script['peak_mib']:.0f} |")
    else:
        rows.append(f"| | diffusers script | {why_not} | | |")
    figures = {f"{name}_cached_ms": results["cached"]["step_s"] * 1000,
               f"{name}_uncached_ms": results["uncached"]["step_s"] * 1000,
               f"{name}_floor_ms": floor["floor_s"] * 1000, f"{name}_paired_ratio": floor["ratio"],
               f"{name}_cached_mib": results["cached"]["peak_mib"], f"{name}_uncached_mib": results["uncached"]["peak_mib"]}
    if script:
        figures[f"{name}_script_ms"] = script["step_s"] * 1000
        figures[f"{name}_script_mib"] = script["peak_mib"]
    return [f"- {label}"], rows, figures


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench.flow", description=__doc__.split("\n")[0])
    parser.add_argument("--only", default=",".join(SHAPES), help=f"comma-separated subset of {','.join(SHAPES)}")
    parser.add_argument("--quick", action="store_true", help="the tiny shape, a few steps, inline, no script")
    parser.add_argument("--no-script", action="store_true", help="leave out diffusers' script")
    parser.add_argument("--diffusers", type=Path, default=DEFAULT_DIFFUSERS, help="a diffusers checkout (work tree)")
    parser.add_argument("--script-deps", type=Path, default=DEFAULT_SCRIPT_DEPS,
                        help="a folder with torchvision and datasets for the script")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.shapes = [s.strip() for s in args.only.split(",") if s.strip()]
    if set(args.shapes) - set(SHAPES):
        parser.error(f"--only: choose from {', '.join(SHAPES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(KINDS[spec["kind"]](spec)), flush=True)
        return 0
    from bench.trainer import machine_description, replace_section

    os.environ["HF_HUB_OFFLINE"] = "1"
    given = sys.argv[1:] if argv is None else argv
    command = "make bench" if not given else "python -m bench.flow " + " ".join(given)
    sizes = QUICK if args.quick else FULL
    labels, rows, figures = [], [], {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="loraq-bench-flow-") as tmp:
        for shape in args.shapes:
            if shape not in sizes:
                continue
            label, shape_rows, found = bench_shape(shape, args, Path(tmp), sizes[shape])
            labels += label
            rows += shape_rows
            figures.update(found)
    repeats = ", ".join(f"{shape}: {sizes[shape]['repeats']}" for shape in args.shapes if shape in sizes)
    body = "\n".join([
        "## Flow matching (Flux): the step against its floor and diffusers' script, and memory",
        "",
        f"- Command: `{command}`",
        f"- Date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Machine: {machine_description('cpu')}",
        "- Models (random weights, Flux.1-dev-shaped):", *[f"  {line}" for line in labels],
        "- fp32, rank 4, seed 0, captioned generated images, each run in its own process"
        f"{' (quick mode: inline)' if args.quick else ''}, the runs of a shape alternating, each shown by its "
        f"fastest of its repeats ({repeats}); "
        "step time = median time between optimizer steps after the warm-up; peak memory = the process's "
        "peak RSS (about 420 MiB of it is torch and diffusers imported).",
        "",
        "| shape | run | step, ms | / floor | peak RSS, MiB |",
        "| --- | --- | ---: | ---: | ---: |",
        *rows,
        "",
        "Floor: the transformer's forward and backward on one batch of cached inputs (latents, T5 and "
        "pooled CLIP embeddings, guidance) plus the LoRA optimizer step; the paired ratio times a "
        "cached run's steps against floor steps interleaved with them, so both see the same load. "
        "`cached` caches latents and text embeddings up front and frees both text encoders before the "
        "first step; `uncached` keeps them and runs VAE, CLIP and T5 every step, as the script does "
        "with per-image captions.",
    ])
    replace_section(args.output, SECTION, body)
    print(body)
    print(f"\nbench.flow: wrote {args.output} ({time.perf_counter() - started:.0f}s); figures {json.dumps(figures)}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
