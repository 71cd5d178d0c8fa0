"""train/mfu.py: peaks by device name, the model's real FLOPs (checked against torch's FLOP counter), synced timing."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch

from train.mfu import ModelFlops, StepTimer, device_peak_flops, mfu, peak_flops


@pytest.mark.parametrize("name,dtype,tflops", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989.4),
    ("NVIDIA H100 80GB HBM3", "float32", 66.9),
    ("NVIDIA H100 PCIe", "bfloat16", 756.5),
    ("NVIDIA H100 NVL", "bfloat16", 835.5),
    ("NVIDIA H200", "bfloat16", 989.4),
    ("NVIDIA A100-SXM4-80GB", "bfloat16", 312.0),
    ("NVIDIA A100 80GB PCIe", "tf32", 156.0),
    ("NVIDIA L40S", "bfloat16", 362.05),
    ("NVIDIA L4", "bfloat16", 121.0),
])
def test_peak_by_device_name_and_dtype(name, dtype, tflops):
    assert peak_flops(name, dtype) == pytest.approx(tflops * 1e12)


def test_unknown_device_or_cpu_has_no_peak_and_no_mfu():
    assert peak_flops("Tesla T4", "bfloat16") is None
    assert device_peak_flops(torch.device("cpu"), "float32") is None
    assert mfu(1e15, 1.0, None) is None
    assert mfu(989.4e12, 2.0, 989.4e12, world_size=2) == pytest.approx(0.25)


def test_model_flops_of_tiny_llama_by_hand(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    flops = ModelFlops.of(model)
    # Per layer: q 64x64, k and v 64x32 (2 KV heads of 16), o 64x64, gate/up/down 64x128: 36,864; 2 layers.
    # The tied embedding is the head (49,152 x 64) and counts only as the head; the input lookup counts nothing.
    assert flops == ModelFlops(body_matmul_params=73_728, head_matmul_params=49_152 * 64, layers=2, attention_width=64)
    # Two examples of 3 and 5 tokens, 4 targets: attention over the causal triangles 6 + 15 (query, key) pairs.
    expected = 2 * 73_728 * 8 + 2 * 49_152 * 64 * 4 + 2 * 2 * 2 * 64 * (6 + 15)
    assert flops.forward_flops([3, 5], 4) == expected
    assert flops.train_flops([3, 5], 4) == 3 * expected
    batches = [{"seq_lens": [3, 5], "loss_mask": torch.tensor([0, 1, 1, 0, 1, 1, 0, 0], dtype=torch.bool)},
               {"seq_lens": [1], "loss_mask": torch.tensor([False]), "empty": True}]
    assert flops.step_flops([SimpleNamespace(**{"empty": False, **b}) for b in batches]) == 3 * expected  # the empty padding batch counts nothing


def test_model_flops_equal_torch_flop_counter_on_the_trainer_forward(tiny_llama_dir):
    """The trainer's forward (token_losses) counted by torch.utils.flop_counter: the body's matmuls for every
    token, the head for the targets only. Eager attention computes the full L x L scores (masked), so the
    counter sees L^2 per example where ModelFlops counts the causal L(L+1)/2."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModelForCausalLM

    from train.forward import token_losses

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, attn_implementation="eager")
    lens = [7]
    ids = torch.randint(0, 1000, (7,), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([0, 1, 1, 0, 1, 1, 1], dtype=torch.bool)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        token_losses(model, ids, torch.arange(7), lens, mask, chunk_size=2)
    flops = ModelFlops.of(model)
    causal = flops.forward_flops(lens, int(mask.sum()))
    full_attention = causal + flops.layers * 2 * 2 * flops.attention_width * (7 * 7 - 7 * 8 // 2)
    assert counter.get_total_flops() == full_attention


def test_step_timer_synchronises_the_device_before_reading_the_clock(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(("sync", device)))
    timer = StepTimer(torch.device("cuda", 0))
    timer.start()
    assert calls == [("sync", torch.device("cuda", 0))]
    time.sleep(0.02)
    seconds = timer.stop()
    assert len(calls) == 2 and 0.02 <= seconds < 5
    cpu = StepTimer(torch.device("cpu"))
    cpu.start()
    assert cpu.stop() >= 0 and len(calls) == 2  # nothing to synchronise on the CPU
    with pytest.raises(RuntimeError):
        StepTimer(torch.device("cpu")).stop()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_table_peak_and_synced_timer_agree_with_a_bf16_matmul_on_this_gpu():  # pragma: no cover - GPU only
    """A large bf16 matmul timed with StepTimer reaches a plausible share of the table's peak (never above
    it: a peak too low, e.g. the sparse number's half, or an unsynced timer would show up here)."""
    device = torch.device("cuda")
    peak = device_peak_flops(device, "bfloat16")
    if peak is None:
        pytest.skip(f"{torch.cuda.get_device_name(device)} is not in PEAK_TFLOPS")
    n, reps = 8192, 20
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b  # warm-up (cuBLAS heuristics, clocks)
    timer = StepTimer(device)
    timer.start()
    for _ in range(reps):
        a @ b
    seconds = timer.stop()
    share = mfu(2.0 * n**3 * reps, seconds, peak)
    assert 0.3 < share <= 1.0, share
