"""`python -m trainer train` end to end, and its option parsing.

A training subprocess spends seconds importing torch and diffusers, so only the acceptance run
(and a cheap config error) go through a real `python -m trainer` process, started in the
background at the first test; the other runs call the same `main` in this process meanwhile.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from trainer.cli import build_config, main, make_parser, parse_overrides, read_config_file
from trainer.config import ConfigError
from trainer.sample_data import write_sample_dataset

REPO_ROOT = Path(__file__).resolve().parents[2]
LORA_FILE = "pytorch_lora_weights.safetensors"
EXIT_BAD_INPUT = 2


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str

    @property
    def events(self) -> list[dict]:
        """Every stdout line, each of which must be one JSON event."""
        events = []
        for line in self.stdout.splitlines():
            event = json.loads(line)  # fails the test on any non-JSON output
            assert isinstance(event, dict) and "type" in event, line
            events.append(event)
        return events

    def describe(self) -> str:
        return f"exit {self.returncode}\n--- stdout\n{self.stdout[-3000:]}\n--- stderr\n{self.stderr[-3000:]}"


class Launched:
    """A CLI run started in the background; `result()` waits for it."""

    def __init__(self, *args: str):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT),
               # The runs share the machine: one thread each avoids oversubscribing it.
               "OMP_NUM_THREADS": "1", "LORAQ_LOG_LEVEL": "WARNING"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "trainer", "train", *args], cwd=REPO_ROOT, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self._result: Finished | None = None

    def result(self) -> Finished:
        if self._result is None:
            stdout, stderr = self.process.communicate(timeout=300)
            self._result = Finished(self.process.returncode, stdout, stderr)
        return self._result

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate()


@pytest.fixture(scope="module")
def launched(tiny_model, tmp_path_factory):
    """The subprocess runs, started together at the first test that needs one."""
    root = tmp_path_factory.mktemp("cli")
    data = write_sample_dataset(root / "data", n_images=4, size=40)
    model_and_data = ["--pretrained_model_name_or_path", str(tiny_model), "--train_data_dir", str(data)]
    runs = {
        "bad_value": Launched(*model_and_data, "--output_dir", str(root / "out-bad"), "--resolution", "30"),
        # The acceptance command, plus a small batch and a seed.
        "acceptance": Launched(*model_and_data, "--output_dir", str(root / "out"), "--max_train_steps", "30",
                               "--resolution", "32", "--train_batch_size", "2", "--seed", "0", "--no-progress"),
    }
    yield root, runs
    for run in runs.values():
        run.stop()


def run_in_process(argv: list[str], capsys) -> Finished:
    """`python -m trainer train ...` in this process: the same `main`, without the import cost."""
    code = main(["train", *argv])
    captured = capsys.readouterr()
    return Finished(code, captured.out, captured.err)


# Kept first in the file so that the acceptance run trains while the in-process tests below run.
def test_bad_option_value_exits_2_with_an_error_event(launched):
    root, runs = launched
    run = runs["bad_value"].result()
    assert run.returncode == EXIT_BAD_INPUT, run.describe()
    events = run.events
    assert [e["type"] for e in events] == ["error"]
    assert "resolution" in events[0]["message"] and "multiple of 8" in events[0]["message"]
    assert not (root / "out-bad").exists()


def test_config_file_with_command_line_override(tiny_model, sample_data, tmp_path, capsys):
    out = tmp_path / "out"
    config_file = tmp_path / "options.yaml"
    config_file.write_text(yaml.safe_dump({
        "pretrained_model_name_or_path": str(tiny_model), "train_data_dir": str(sample_data),
        "resolution": 32, "train_batch_size": 2, "max_train_steps": 5, "rank": 2,
        "learning_rate": 0.001, "seed": 0, "center_crop": True, "output_dir": str(tmp_path / "not-here"),
    }))
    run = run_in_process(["--config", str(config_file), "--max_train_steps", "2", "--output-dir", str(out)], capsys)
    assert run.returncode == 0, run.describe()
    saved = json.loads((out / "training_config.json").read_text())
    assert (saved["max_train_steps"], saved["output_dir"]) == (2, str(out))  # the command line wins
    assert (saved["rank"], saved["learning_rate"], saved["center_crop"]) == (2, 0.001, True)  # the file's
    assert (out / LORA_FILE).is_file() and not (tmp_path / "not-here").exists()
    steps = [e for e in run.events if e["type"] == "step"]
    assert [e["step"] for e in steps] == [1, 2]
    assert all(e["lr"] == pytest.approx(1e-3) for e in steps)
    assert "Steps" in run.stderr and "2/2" in run.stderr, "a progress bar on stderr"


def test_bad_image_exits_2_naming_the_file(tiny_model, sample_data, tmp_path, capsys):
    (sample_data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really" * 10)
    (sample_data / "broken.txt").write_text("a broken image")
    run = run_in_process(["--pretrained_model_name_or_path", str(tiny_model), "--train_data_dir", str(sample_data),
                          "--output_dir", str(tmp_path / "out"), "--resolution", "32"], capsys)
    assert run.returncode == EXIT_BAD_INPUT, run.describe()
    events = run.events
    assert events[-1]["type"] == "error"
    assert "broken.png" in events[-1]["message"]
    assert "0000.png" not in events[-1]["message"]
    assert "start" not in [e["type"] for e in events]
    assert not (tmp_path / "out" / LORA_FILE).exists()


def test_acceptance_run_prints_one_step_event_per_step(launched):
    root, runs = launched
    run = runs["acceptance"].result()
    assert run.returncode == 0, run.describe()
    events = run.events
    assert events[0]["type"] == "start" and events[0]["total_steps"] == 30
    assert events[-1]["type"] == "done"
    steps = [e for e in events if e["type"] == "step"]
    assert [e["step"] for e in steps] == list(range(1, 31))
    # The latent cache's `prepare` events (its plan, or up-front progress) come before the first step.
    types = [e["type"] for e in events]
    prepare = [i for i, kind in enumerate(types) if kind == "prepare"]
    assert prepare and prepare == list(range(1, 1 + len(prepare)))
    assert [kind for kind in types if kind != "prepare"] == ["start"] + ["step"] * 30 + ["done"]
    for event in steps:
        assert event["total_steps"] == 30
        assert math.isfinite(event["loss"]) and event["loss"] > 0
        assert event["lr"] == pytest.approx(1e-4)  # the default constant schedule
    lora = root / "out" / LORA_FILE
    assert str(lora) in events[-1]["paths"]
    assert all(Path(path).is_file() for path in events[-1]["paths"])
    assert events[-1]["step"] == 30
    weights = load_file(lora)
    assert weights and all("lora" in key for key in weights)
    assert "Steps" not in run.stderr, "--no-progress shows no progress bar"


# --------------------------------------------------------------------------------------------
# Option parsing (in process)


def test_parse_overrides_forms():
    assert parse_overrides(["--center_crop", "--learning_rate", "1e-3", "--resolution=64", "--random-flip",
                            "--train-batch-size", "2"]) == {
        "center_crop": "true", "learning_rate": "1e-3", "resolution": "64", "random_flip": "true",
        "train_batch_size": "2"}


def test_parse_overrides_values():
    assert parse_overrides(["--seed", "none", "--lora_alpha=None", "--revision", "null"]) == {
        "seed": None, "lora_alpha": None, "revision": None}
    assert parse_overrides(["--validation_prompt", "a red circle", "--noise_offset", "-0.1"]) == {
        "validation_prompt": "a red circle", "noise_offset": "-0.1"}
    assert parse_overrides(["--validation_prompt=a=b"]) == {"validation_prompt": "a=b"}
    assert parse_overrides(["--rank", "4", "--rank", "8"]) == {"rank": "8"}
    assert parse_overrides(["--center_crop"]) == {"center_crop": "true"}  # a flag at the very end
    assert parse_overrides([]) == {}


@pytest.mark.parametrize("tokens", [["stray"], ["--rank", "4", "8"], ["--"]])
def test_parse_overrides_rejects_stray_arguments(tokens):
    with pytest.raises(ConfigError, match="unexpected argument"):
        parse_overrides(tokens)


def test_build_config_file_then_overrides(tmp_path):
    config_file = tmp_path / "options.json"
    config_file.write_text(json.dumps({"pretrained_model_name_or_path": "m", "train_data_dir": "d",
                                       "rank": 8, "random_flip": True}))
    config = build_config(str(config_file), ["--rank", "2", "--center_crop"])
    assert (config.rank, config.random_flip, config.center_crop) == (2, True, True)
    with pytest.raises(ConfigError, match="^rank: "):
        build_config(str(config_file), ["--rank", "0"])


def test_bad_config_files_are_config_errors(tmp_path):
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    (tmp_path / "broken.yaml").write_text("rank: [1,\n")
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00\x01")
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(ConfigError, match="mapping"):
        read_config_file(str(tmp_path / "list.yaml"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        read_config_file(str(tmp_path / "broken.yaml"))
    with pytest.raises(ConfigError, match="binary.yaml"):
        read_config_file(str(tmp_path / "binary.yaml"))
    with pytest.raises(ConfigError, match="cannot read"):
        read_config_file(str(tmp_path / "missing.yaml"))
    assert read_config_file(str(tmp_path / "empty.yaml")) == {}


def test_train_options_are_not_abbreviations_of_cli_flags():
    args, extra = make_parser().parse_known_args(["train", "--conf", "x.yaml", "--no_progress"])
    assert args.config is None and args.no_progress
    assert parse_overrides(extra) == {"conf": "x.yaml"}
