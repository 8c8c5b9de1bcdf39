"""The flow benchmark runs end to end in its quick mode and writes its section (no timings are
asserted: speed belongs to `make bench`, not to tests)."""

from __future__ import annotations

import os
import re

os.environ["HF_HUB_OFFLINE"] = "1"


def test_quick_flow_benchmark_writes_its_section(tmp_path):
    from bench import flow as bench

    output = tmp_path / "BENCHMARKS.md"
    output.write_text("# Benchmarks\n\nkept as it is\n", encoding="utf-8")
    assert bench.main(["--quick", "--output", str(output)]) == 0

    text = output.read_text(encoding="utf-8")
    assert text.startswith("# Benchmarks\n\nkept as it is\n")
    section = text.split("<!-- bench:flow -->", 1)[1].split("<!-- /bench:flow -->", 1)[0]
    assert "transformer 0." in section  # the tiny model's size, from its files
    for run in ("trainer, cached (text encoders freed)", "trainer, uncached (encoders every step)", "floor (paired"):
        assert run in section
    step_ms = [float(m) for m in re.findall(r"\| ([0-9.]+) \| [0-9.]+x \| [0-9]+ \|", section)]
    assert len(step_ms) == 3 and all(ms > 0 for ms in step_ms)
    assert "diffusers script | not run" in section  # quick mode leaves the script out, and says so
