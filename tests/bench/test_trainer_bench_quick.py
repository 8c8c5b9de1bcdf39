"""The trainer benchmark runs end to end in its quick mode and writes a sane report (no timings
are asserted: speed belongs to `make bench`, not to tests)."""

from __future__ import annotations

import json
import os
import re

os.environ["HF_HUB_OFFLINE"] = "1"

ROW = r"\| {shape} \| {precision} \| ([0-9.]+) \| ([0-9.]+) \| \*\*([0-9.]+)x\*\* \| ([0-9.]+)-([0-9.]+) \|"


def test_quick_trainer_benchmark_writes_every_section(tmp_path):
    from bench import trainer as bench

    output = tmp_path / "BENCHMARKS.md"
    output.write_text("# Benchmarks\n\nkept as it is\n", encoding="utf-8")
    assert bench.main(["--quick", "--output", str(output)]) == 0, "loss curves must agree with the uncached runs"

    text = output.read_text(encoding="utf-8")
    assert text.startswith("# Benchmarks\n\nkept as it is\n")
    section = text.split("<!-- bench:trainer -->", 1)[1].split("<!-- /bench:trainer -->", 1)[0]
    for heading in ("### Cache as you go", "### Many epochs", "### Memory", "### A 2x2 sweep", "### The trainer's step",
                    "### SDXL: the trainer's step against its floor"):
        assert heading in section
    assert "Loss curves agree" in section
    ratio = float(re.search(r"default / plain wall time: ([0-9.]+)x", section).group(1))
    assert ratio > 0
    # Each arm's best, and each adjacent pair's ratio (one pair in quick mode).
    assert re.search(r"default / plain: [0-9.]+x steps/s\*\* .*run after run: [0-9.]+x \(median [0-9.]+x\)", section)
    cpu = float(re.search(r"\*\*([0-9.]+)x by CPU time a step\*\*", section).group(1))
    assert cpu > 0
    assert re.search(r"\| tiny, 32 px, batch 2 \| fp32 \| [0-9.]+ \| [0-9.]+ \| \*\*[0-9.]+x\*\*", section)
    # The SDXL shape, fp32 and bf16: trainer and floor both measured, the ratio theirs.
    for precision in ("fp32", "bf16"):
        row = re.search(ROW.format(shape=r"SDXL at 0\.125 width, 64 px, batch 1", precision=precision), section)
        assert row, f"no SDXL {precision} row in:\n{section}"
        trainer_ms, floor_ms, ratio, low, high = map(float, row.groups())
        assert trainer_ms > 0 and floor_ms > 0 and low <= ratio <= high
        assert abs(ratio - trainer_ms / floor_ms) < 0.5  # a median of ratios, near the ratio of medians
    assert "UNet blocks 40-80-160 (SDXL 320-640-1280)" in section
    # Every part says the load it ran under.
    assert section.count("Load: load average (1 min) during these runs: mean") == len(bench.SCENARIOS)
    # The sweep shares one cache: its segments hold each (image, orientation) at most once.
    entries = int(re.search(r"segments hold (\d+) image entries", section).group(1))
    assert 0 < entries <= 8 * 2


def test_mid_size_sdxl_is_shaped_as_sdxl(tmp_path):
    """The SDXL bench model is what the trainer detects as SDXL, with SDXL's conditioning widths:
    cross-attention over both encoders' states concatenated, the added embedding fed six time
    ids and the second encoder's projected pooled output."""
    from bench.trainer import sdxl_shape, write_sdxl_mid
    from trainer.detect import detect_family

    model = write_sdxl_mid(tmp_path / "sdxl", width=0.125)
    assert detect_family(str(model)) == "sdxl"
    unet = json.loads((model / "unet" / "config.json").read_text())
    text_1 = json.loads((model / "text_encoder" / "config.json").read_text())
    text_2 = json.loads((model / "text_encoder_2" / "config.json").read_text())
    shape = sdxl_shape(0.125)
    assert unet["addition_embed_type"] == "text_time"
    assert unet["block_out_channels"] == [40, 80, 160] == list(shape["block_out_channels"])
    assert unet["down_block_types"] == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    assert unet["cross_attention_dim"] == text_1["hidden_size"] + text_2["hidden_size"] == 256
    assert text_2["architectures"] == ["CLIPTextModelWithProjection"]
    assert unet["projection_class_embeddings_input_dim"] == 6 * unet["addition_time_embed_dim"] + text_2["projection_dim"]
    # At half width the deep block keeps half of SDXL's ten transformer layers.
    assert sdxl_shape(0.5)["transformer_layers_per_block"] == (1, 1, 5)
    assert sdxl_shape(0.5)["block_out_channels"] == (160, 320, 640)
