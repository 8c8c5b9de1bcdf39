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


def test_what_a_worker_offers_detected_or_from_settings(tmp_path):
    from loraq.settings import Settings
    from worker.gpu_class import Capabilities, capabilities

    for index in range(4):
        folder = tmp_path / f"0000:0{index}:00.0"
        folder.mkdir()
        (folder / "information").write_text("Model: \t\t NVIDIA A100-SXM4-80GB\n")
    assert capabilities(Settings(worker_device="auto"), tmp_path) == Capabilities("a100-sxm4-80gb", 4, 80.0)
    assert capabilities(Settings(worker_device="auto", worker_gpu_class="a100", worker_gpus=2,
                                 worker_gpu_memory_gb=40), tmp_path) == Capabilities("a100", 2, 40.0)
    # The CPU: class cpu, one "GPU" unless told more (two-process gloo jobs), memory unknown.
    assert capabilities(Settings(worker_device="cpu"), tmp_path) == Capabilities("cpu", 1, None)
    assert capabilities(Settings(worker_device="cpu", worker_gpus=2), tmp_path) == Capabilities("cpu", 2, None)
