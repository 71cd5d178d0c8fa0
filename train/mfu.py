"""Model FLOPs utilisation (issue 32 item 6): the device's own peak, the model's real FLOPs, synced timing.

MFU = (model FLOPs of the step, all ranks) / (step seconds x peak FLOP/s of one device x ranks).

- Peak: :data:`PEAK_TFLOPS`, dense (no sparsity) tensor-core numbers from NVIDIA's datasheets, looked up by
  ``torch.cuda.get_device_name`` and the compute dtype. An unknown device (or the CPU) has no peak: MFU is
  not reported rather than reported against another card's peak.
- FLOPs (:class:`ModelFlops`): the useful work of a training step, 3 x forward (backward = 2 x forward),
  gradient-checkpoint recomputation not counted (that would be hardware FLOPs utilisation):
  * matmuls of the decoder: 2 FLOPs per weight per token for every ``nn.Linear`` in the model except the
    output head; the input embedding is a lookup (0 FLOPs);
  * the output head: 2 x hidden x vocab per *target* token only (the trainer computes logits for the
    trainable targets alone: train/forward.py chunked_token_ce);
  * attention scores and values: per layer and example of length L, 2 x 2 x (heads x head_dim) x L(L+1)/2
    (QK^T and AV over the causal triangle), from each example's real length, not the padded row.
- Timing (:class:`StepTimer`): ``torch.cuda.synchronize`` before reading the clock at both ends, so the
  seconds are the device's, not the time the host took to queue kernels.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["PEAK_TFLOPS", "ModelFlops", "StepTimer", "device_peak_flops", "mfu", "peak_flops"]

# (pattern on the device name, {dtype: dense TFLOP/s}); the first match wins, so specific names come first.
# "float32" is plain FP32 (torch's default matmul precision "highest"); "tf32" when TF32 matmuls are allowed.
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    (r"H100.*NVL|H200.*NVL", {"bfloat16": 835.5, "float16": 835.5, "tf32": 417.5, "float32": 60.0}),
    (r"H100.*PCIe", {"bfloat16": 756.5, "float16": 756.5, "tf32": 378.0, "float32": 51.2}),
    (r"H100|H200|GH200", {"bfloat16": 989.4, "float16": 989.4, "tf32": 494.7, "float32": 66.9}),  # SXM / HBM3
    (r"A100", {"bfloat16": 312.0, "float16": 312.0, "tf32": 156.0, "float32": 19.5}),
    (r"L40S", {"bfloat16": 362.05, "float16": 362.05, "tf32": 183.0, "float32": 91.6}),
    (r"\bL4\b", {"bfloat16": 121.0, "float16": 121.0, "tf32": 60.0, "float32": 30.3}),
)


def peak_flops(device_name: str, dtype: str) -> float | None:
    """Dense peak FLOP/s of the named device in ``dtype`` ("bfloat16", "float16", "tf32", "float32"), or None if unknown."""
    for pattern, peaks in PEAK_TFLOPS:
        if re.search(pattern, device_name, re.IGNORECASE):
            tflops = peaks.get(dtype)
            return None if tflops is None else tflops * 1e12
    return None


def device_peak_flops(device: torch.device, dtype: str) -> float | None:
    """:func:`peak_flops` of ``device`` for training in ``dtype`` ("bfloat16" / "float32"); None off CUDA.
    fp32 matmuls count at the TF32 peak when torch allows TF32 for them."""
    if device.type != "cuda":
        return None
    if dtype == "float32" and torch.get_float32_matmul_precision() != "highest":
        dtype = "tf32"
    return peak_flops(torch.cuda.get_device_name(device), dtype)


def _numel(param: torch.Tensor) -> int:
    # ZeRO-3 partitions parameters (local numel 0); ds_numel is the full size.
    return int(getattr(param, "ds_numel", param.numel()))


@dataclass(frozen=True)
class ModelFlops:
    """What a step's FLOPs depend on, read once from the model.

    Attributes:
        body_matmul_params: weights of every ``nn.Linear`` except the output head (2 FLOPs each per token).
        head_matmul_params: the output head's weights (2 FLOPs each per target token).
        layers: decoder layers; attention_width: heads x head_dim (the width of Q, and of the attended V).
    """

    body_matmul_params: int
    head_matmul_params: int
    layers: int
    attention_width: int

    @classmethod
    def of(cls, model: nn.Module) -> ModelFlops:
        """From a transformers ``*ForCausalLM`` (ZeRO-3 partitioned or not)."""
        head = model.get_output_embeddings()
        body = sum(_numel(m.weight) for m in model.modules() if isinstance(m, nn.Linear) and m is not head)
        config = model.config
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(body, _numel(head.weight), config.num_hidden_layers, heads * head_dim)

    def forward_flops(self, seq_lens: Iterable[int], targets: int) -> float:
        """Forward FLOPs of one packed row of examples of ``seq_lens`` with ``targets`` trainable targets."""
        lens = [int(n) for n in seq_lens]
        tokens = sum(lens)
        # Causal attention: query i attends to i + 1 keys; QK^T and AV each 2 x width FLOPs per (query, key).
        attention = self.layers * 2 * 2 * self.attention_width * sum(n * (n + 1) // 2 for n in lens)
        return 2.0 * self.body_matmul_params * tokens + 2.0 * self.head_matmul_params * targets + attention

    def train_flops(self, seq_lens: Iterable[int], targets: int) -> float:
        """Forward + backward (3 x forward) FLOPs of one packed row."""
        return 3.0 * self.forward_flops(seq_lens, targets)

    def step_flops(self, micro_batches: Sequence[Any]) -> float:
        """Training FLOPs of one rank's micro-batches of a step (``train.step.Batch``: ``seq_lens``, ``loss_mask``;
        the trainer's empty padding batches, ``empty``, count nothing)."""
        return sum(self.train_flops(b.seq_lens, int(b.loss_mask.sum())) for b in micro_batches if not b.empty)


def mfu(flops: float, seconds: float, peak: float | None, world_size: int = 1) -> float | None:
    """``flops`` (all ranks) over ``seconds`` as a fraction of ``world_size`` devices' peak; None without a peak."""
    if not peak or seconds <= 0:
        return None
    return flops / seconds / (peak * world_size)


class StepTimer:
    """Wall seconds of device work: synchronises ``device`` (CUDA) before reading the clock at start and stop."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.started: float | None = None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        self._sync()
        self.started = time.perf_counter()

    def stop(self) -> float:
        """Seconds since :meth:`start`, after the device finished the work queued so far."""
        if self.started is None:
            raise RuntimeError("StepTimer.stop() before start()")
        self._sync()
        return time.perf_counter() - self.started
