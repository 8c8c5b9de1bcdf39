"""Several processes (data parallel over gloo on the CPU, as `accelerate launch` does on GPUs)."""

from safetensors.torch import load_file

from trainer.sample_data import write_sample_dataset
from support.torchrun import train_two_processes


def test_two_processes_train_one_lora_and_report_once(tiny_model, tmp_path):
    data = write_sample_dataset(tmp_path / "data", n_images=8, size=32)
    out = tmp_path / "out"
    events = train_two_processes(tiny_model, data, out, steps=4)
    start = events[0]
    assert start["type"] == "start" and start["data"]["total_batch_size"] == 4  # 2 per process x 2
    assert [e["step"] for e in events if e["type"] == "step"] == [1, 2, 3, 4], "only the main process reports"
    assert events[-1]["type"] == "done"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert load_file(str(out / "pytorch_lora_weights.safetensors"))
