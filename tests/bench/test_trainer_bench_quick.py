"""The trainer benchmark runs end to end in its quick mode and writes a sane report (no timings
are asserted: speed belongs to `make bench`, not to tests)."""

from __future__ import annotations

import os
import re

os.environ["HF_HUB_OFFLINE"] = "1"


def test_quick_trainer_benchmark_writes_every_section(tmp_path):
    from bench import trainer as bench

    output = tmp_path / "BENCHMARKS.md"
    output.write_text("# Benchmarks\n\nkept as it is\n", encoding="utf-8")
    assert bench.main(["--quick", "--output", str(output)]) == 0, "loss curves must agree with the uncached runs"

    text = output.read_text(encoding="utf-8")
    assert text.startswith("# Benchmarks\n\nkept as it is\n")
    section = text.split("<!-- bench:trainer -->", 1)[1].split("<!-- /bench:trainer -->", 1)[0]
    for heading in ("### Cache as you go", "### Many epochs", "### Memory", "### A 2x2 sweep", "### The trainer's step"):
        assert heading in section
    assert "Loss curves agree" in section
    ratio = float(re.search(r"default / plain wall time: ([0-9.]+)x", section).group(1))
    assert ratio > 0
    assert re.search(r"\| tiny, 32 px, batch 2 \| fp32 \| [0-9.]+ \| [0-9.]+ \| \*\*[0-9.]+x\*\*", section)
    # The sweep shares one cache: its segments hold each (image, orientation) at most once.
    entries = int(re.search(r"segments hold (\d+) image entries", section).group(1))
    assert 0 < entries <= 8 * 2
