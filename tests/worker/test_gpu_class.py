"""The GPU class a worker announces, read from the NVIDIA driver's /proc files (never CUDA)."""

from __future__ import annotations

from worker.gpu_class import gpu_class


def test_the_first_gpus_model_as_a_short_name(tmp_path):
    for index, model in enumerate(["NVIDIA H100 80GB HBM3", "NVIDIA GeForce RTX 4090"]):
        folder = tmp_path / f"0000:0{index}:00.0"
        folder.mkdir()
        (folder / "information").write_text(f"Model: \t\t {model}\nIRQ:   35\nBus Type: PCIe\n")
    assert gpu_class("auto", tmp_path) == "h100-80gb-hbm3"
    assert gpu_class("cuda", tmp_path) == "h100-80gb-hbm3"
    (tmp_path / "0000:00:00.0" / "information").unlink()
    assert gpu_class("auto", tmp_path) == "4090"


def test_cpu_by_setting_or_without_a_driver(tmp_path):
    assert gpu_class("cpu", tmp_path) == "cpu"  # a GPU host told to train on the CPU
    assert gpu_class("auto", tmp_path / "missing") == "cpu"
