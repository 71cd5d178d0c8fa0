"""The ZeRO plan of a run: which stage, whether AdamW's states live on the CPU, and why (``train.zero_stage``).

``auto`` (issue 32):

- one rank: no partitioning (stage 0; stage 1 with bf16 weights, where DeepSpeed 0.19 refuses the fp32
  gradient accumulation at stage 0) when model + optimizer states fit the device; else the optimizer
  offloaded to host RAM (ZeRO-Offload, stage 2) when the rest fits the device and the offloaded states
  fit the host; else a refusal that states the estimate. ZeRO-3 partitions over ranks, so on one rank
  it only adds gathers (trainer-profile.md: 1.5-2.3x a step) and saves nothing.
- several ranks: stage 2 when the states fit one device, else stage 3.

An explicit ``train.zero_stage`` (or a stage written in the DeepSpeed JSON) wins, bf16 stage 0 moved to 1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from train.config import TrainConfig

# Bytes per parameter of model + optimizer state on one device without partitioning: weights and
# gradients in the compute dtype, AdamW's two fp32 moments; bf16 adds DeepSpeed's fp32 master copy and
# the fp32 gradient accumulation buffer (data_types.grad_accum_dtype=fp32, train.config.deepspeed_dict).
STATE_BYTES_PER_PARAM = {"float32": 4 + 4 + 8, "bfloat16": 2 + 2 + 4 + 4 + 8}
# With the optimizer offloaded: the device keeps weights and gradients in the compute dtype ...
OFFLOAD_DEVICE_BYTES_PER_PARAM = {"float32": 4 + 4, "bfloat16": 2 + 2}
# ... and the host holds fp32 master weights, fp32 gradients and the two moments.
OFFLOAD_HOST_BYTES_PER_PARAM = 4 + 4 + 8
# States may take at most this share of a device: activations, logits chunks and the allocator need the rest.
STATE_FRACTION = 0.5


@dataclass(frozen=True)
class ZeroPlan:
    """The resolved ZeRO set-up. Unpacks as ``stage, why`` (what callers took before offload existed)."""

    stage: int
    why: str
    offload_optimizer: bool = False

    def __iter__(self) -> Iterator[int | str]:
        return iter((self.stage, self.why))


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def _fp32_accumulation(stage: int, dtype: str, why: str) -> ZeroPlan:
    """Stage 1 for bf16 at stage 0 (DeepSpeed 0.19's engine raises 'unsupported mix' for bf16 weights with
    fp32 gradient accumulation without ZeRO; stage 1 runs its BF16_Optimizer with fp32 gradients)."""
    if dtype != "bfloat16":
        return ZeroPlan(stage, why)
    if stage == 0:
        return ZeroPlan(1, f"{why}; stage 1 instead of 0: bf16 weights accumulate gradients in fp32, which DeepSpeed "
                           f"refuses at stage 0; gradients accumulate in fp32")
    return ZeroPlan(stage, f"{why}; bf16 weights: gradients accumulate in fp32")


def choose_zero_stage(requested: str, json_stage: int | None, n_params: int, dtype: str, world_size: int,
                      device_bytes: int, host_bytes: int | None = None) -> ZeroPlan:
    """The ZeRO plan for ``n_params`` parameters in ``dtype`` on ``world_size`` ranks of ``device_bytes`` each.

    Args:
        requested: ``train.zero_stage`` ("auto" or a stage).
        json_stage: a stage written in the DeepSpeed JSON, or None.
        host_bytes: host RAM per rank for an offloaded optimizer; None when the device is the host (CPU
            training: offloading moves nothing).

    Raises:
        ValueError: ``auto`` on one rank when the states fit neither the device nor, offloaded, the host;
            the message gives the estimate.
    """
    if requested != "auto":
        return _fp32_accumulation(int(requested), dtype, f"train.zero_stage={requested}")
    if json_stage is not None:
        return _fp32_accumulation(json_stage, dtype, f"zero_optimization.stage={json_stage} in deepspeed_config")
    need = n_params * STATE_BYTES_PER_PARAM[dtype]
    budget = STATE_FRACTION * device_bytes
    sizes = (f"model + optimizer states ~{_gib(need)} ({n_params / 1e6:.1f}M params x {STATE_BYTES_PER_PARAM[dtype]} B, "
             f"{dtype}) vs {STATE_FRACTION:.0%} of {_gib(device_bytes)} per device")
    if world_size > 1:
        if need > budget:
            return _fp32_accumulation(3, dtype, f"auto: {sizes}: do not fit, so ZeRO-3 partitions them over {world_size} ranks")
        return _fp32_accumulation(2, dtype, f"auto: {sizes}: fit, {world_size} ranks, so stage 2 shards gradients and "
                                            f"optimizer states")
    if need <= budget:
        return _fp32_accumulation(0, dtype, f"auto: {sizes}: fit, one rank, so no partitioning (stage 0)")
    on_device = n_params * OFFLOAD_DEVICE_BYTES_PER_PARAM[dtype]
    on_host = n_params * OFFLOAD_HOST_BYTES_PER_PARAM
    offload = (f"offloaded: ~{_gib(on_device)} on the device (weights + gradients) and ~{_gib(on_host)} of fp32 master "
               f"weights, gradients and AdamW moments on the host")
    if host_bytes is not None and on_device <= budget and on_host <= STATE_FRACTION * host_bytes:
        plan = _fp32_accumulation(2, dtype, f"auto: {sizes}: do not fit one rank; {offload} ({STATE_FRACTION:.0%} of "
                                            f"{_gib(host_bytes)} host RAM per rank): ZeRO-Offload, stage 2 with the optimizer "
                                            f"on the CPU")
        return ZeroPlan(plan.stage, plan.why, offload_optimizer=True)
    host = "no host to offload to (the device is the host)" if host_bytes is None else \
        f"{offload}, vs {STATE_FRACTION:.0%} of {_gib(host_bytes)} host RAM per rank"
    raise ValueError(f"train.zero_stage=auto: {sizes}: do not fit one rank, and {host}. ZeRO-3 needs several ranks "
                     f"to partition over: launch more ranks (deepspeed --num_gpus N), or a smaller model")


def count_parameters(model_path: str, trust_remote_code: bool = False) -> int:
    """Parameters of the model at ``model_path``, counted on the meta device (no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return sum(p.numel() for p in model.parameters())  # tied weights count once


def host_memory_bytes() -> int:
    """This host's RAM shared by its local ranks."""
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(1, local_ranks)


def device_memory_bytes(device: torch.device) -> int:
    """Memory of one device for one rank: the GPU's, or this host's RAM shared by its local ranks."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return host_memory_bytes()


def resolve_zero_stage(cfg: TrainConfig, model_path: str, world_size: int, device: torch.device, dtype: str) -> ZeroPlan:
    """:func:`choose_zero_stage` for this config, model and device."""
    from train import config as train_config

    return choose_zero_stage(cfg.train.zero_stage, train_config.json_zero_stage(cfg), count_parameters(model_path, cfg.trust_remote_code),
                             dtype, world_size, device_memory_bytes(device), None if device.type == "cpu" else host_memory_bytes())
