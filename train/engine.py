"""The engine of a run: distributed set-up, the ZeRO plan, the model, the DeepSpeed engine, the export.

    rank, world_size, device = setup_distributed()
    plan = resolve_zero_stage(cfg, model_path, world_size, device, dtype_name)     # stage, why, offload
    model = load_model(cfg, model_path, ds_config, dtype, attn_implementation)
    engine, scheduler = build_engine(model, cfg, ds_config, total_steps)
    export_model(engine, tokenizer, out / "model", rank, card)

The ZeRO plan, ``train.zero_stage=auto`` (issue 32):

- one rank: no partitioning (stage 0; stage 1 with bf16 weights, where DeepSpeed 0.19 refuses the fp32
  gradient accumulation at stage 0) when model + optimizer states fit the device; else the optimizer
  offloaded to host RAM (ZeRO-Offload, stage 2) when the rest fits the device and the offloaded states
  fit the host; else a refusal that states the estimate. ZeRO-3 partitions over ranks, so on one rank
  it only adds gathers (trainer-profile.md: 1.5-2.3x a step) and saves nothing.
- several ranks: stage 2 when the states fit one device, else stage 3.

An explicit ``train.zero_stage`` (or a stage written in the DeepSpeed JSON) wins, bf16 stage 0 moved to 1.
With LoRA adapters (``lora.rank`` > 0, train/lora.py) the frozen base costs its weights only: gradients and
optimizer states are the adapters'.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, TextIO

import torch
import torch.distributed as dist

from train.config import TrainConfig
from train.metrics import log0
from train.schedule import make_scheduler

# Bytes per parameter of model + optimizer state on one device without partitioning: weights and
# gradients in the compute dtype, AdamW's two fp32 moments; bf16 adds DeepSpeed's fp32 master copy and
# the fp32 gradient accumulation buffer (data_types.grad_accum_dtype=fp32, train.config.deepspeed_dict).
STATE_BYTES_PER_PARAM = {"float32": 4 + 4 + 8, "bfloat16": 2 + 2 + 4 + 4 + 8}
# With the optimizer offloaded: the device keeps weights and gradients in the compute dtype ...
OFFLOAD_DEVICE_BYTES_PER_PARAM = {"float32": 4 + 4, "bfloat16": 2 + 2}
# ... and the host holds fp32 master weights, fp32 gradients and the two moments.
OFFLOAD_HOST_BYTES_PER_PARAM = 4 + 4 + 8
# A frozen parameter (LoRA's base) costs its weight only.
WEIGHT_BYTES_PER_PARAM = {"float32": 4, "bfloat16": 2}
# QLoRA's base in 4-bit NF4: half a byte a weight (plus ~0.5% of block constants with double quantisation). Counted for
# every parameter, a lower bound: bitsandbytes leaves the embeddings and the output head in train.dtype.
NF4_BYTES_PER_PARAM = 0.5
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
                      device_bytes: int, host_bytes: int | None = None, trainable_params: int | None = None,
                      quantized: bool = False) -> ZeroPlan:
    """The ZeRO plan for ``n_params`` parameters in ``dtype`` on ``world_size`` ranks of ``device_bytes`` each.

    Args:
        requested: ``train.zero_stage`` ("auto" or a stage).
        json_stage: a stage written in the DeepSpeed JSON, or None.
        host_bytes: host RAM per rank for an offloaded optimizer; None when the device is the host (CPU
            training: offloading moves nothing).
        trainable_params: LoRA: the adapters' parameters, the only ones with gradients and optimizer states
            (``n_params`` then counts the frozen base); None: every parameter trains.
        quantized: QLoRA: the frozen base is held in 4-bit NF4 (:data:`NF4_BYTES_PER_PARAM`).

    Raises:
        ValueError: ``auto`` on one rank when the states fit neither the device nor, offloaded, the host;
            the message gives the estimate.
    """
    if requested != "auto":
        return _fp32_accumulation(int(requested), dtype, f"train.zero_stage={requested}")
    if json_stage is not None:
        return _fp32_accumulation(json_stage, dtype, f"zero_optimization.stage={json_stage} in deepspeed_config")
    budget = STATE_FRACTION * device_bytes
    frozen_weight = NF4_BYTES_PER_PARAM if quantized else WEIGHT_BYTES_PER_PARAM[dtype]
    if trainable_params is None:
        need = n_params * STATE_BYTES_PER_PARAM[dtype]
        counted = f"{n_params / 1e6:.1f}M params x {STATE_BYTES_PER_PARAM[dtype]} B, {dtype}"
    else:  # LoRA: the base's weights, the adapters' weights, gradients and optimizer states
        need = n_params * frozen_weight + trainable_params * STATE_BYTES_PER_PARAM[dtype]
        counted = (f"{n_params / 1e6:.1f}M frozen params x {frozen_weight:g} B{' (4-bit NF4)' if quantized else ''} + "
                   f"{trainable_params / 1e6:.2f}M adapter params x "
                   f"{STATE_BYTES_PER_PARAM[dtype]} B, {dtype}")
    sizes = f"model + optimizer states ~{_gib(need)} ({counted}) vs {STATE_FRACTION:.0%} of {_gib(device_bytes)} per device"
    if world_size > 1:
        if need > budget:
            return _fp32_accumulation(3, dtype, f"auto: {sizes}: do not fit, so ZeRO-3 partitions them over {world_size} ranks")
        return _fp32_accumulation(2, dtype, f"auto: {sizes}: fit, {world_size} ranks, so stage 2 shards gradients and "
                                            f"optimizer states")
    if need <= budget:
        return _fp32_accumulation(0, dtype, f"auto: {sizes}: fit, one rank, so no partitioning (stage 0)")
    trained = n_params if trainable_params is None else trainable_params
    on_device = n_params * frozen_weight + trained * (OFFLOAD_DEVICE_BYTES_PER_PARAM[dtype] - WEIGHT_BYTES_PER_PARAM[dtype])
    on_host = trained * OFFLOAD_HOST_BYTES_PER_PARAM
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
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return host_memory_bytes()


def resolve_zero_stage(cfg: TrainConfig, model_path: str, world_size: int, device: torch.device, dtype: str) -> ZeroPlan:
    """:func:`choose_zero_stage` for this config, model and device (LoRA: its adapters are what trains). Raises
    ValueError for QLoRA (``lora.quantize``) at stage 3, which partitions weights that 4-bit ones cannot be."""
    from train import config as train_config
    from train.lora import count_trainable

    trainable = count_trainable(model_path, cfg.lora, cfg.trust_remote_code) if cfg.lora.rank else None
    plan = choose_zero_stage(cfg.train.zero_stage, train_config.json_zero_stage(cfg), count_parameters(model_path, cfg.trust_remote_code),
                             dtype, world_size, device_memory_bytes(device), None if device.type == "cpu" else host_memory_bytes(),
                             trainable_params=trainable, quantized=cfg.lora.rank > 0 and cfg.lora.quantize != "none")
    if cfg.lora.quantize != "none" and plan.stage == 3:
        raise ValueError(f"lora.quantize={cfg.lora.quantize}: {plan.why}; but 4-bit weights are not partitioned by ZeRO-3 here: "
                         f"set train.zero_stage=2")
    return plan


# ---------------------------------------------------------------------------------------------
# Processes, model, engine, export
# ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# DeepSpeed's CPU accelerator prints this (a bare print in deepspeed/comm/torch.py's build_shm_op) whenever
# init_distributed loads its shared-memory allreduce op: on every run, so before every later error too. It says
# nothing a user acts on.
OP_BUILT = re.compile(r"^DeepSpeed \S+ built successfully$")


class _LineFilter(io.TextIOBase):
    """A text stream that passes every complete line to ``target`` at once, except those ``drop`` matches."""

    def __init__(self, target: TextIO, drop: re.Pattern[str]):
        self.target, self.drop, self.pending = target, drop, ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        *lines, self.pending = (self.pending + text).split("\n")
        for line in lines:
            if not self.drop.match(line):
                self.target.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.target.flush()

    def close_pending(self) -> None:
        if self.pending and not self.drop.match(self.pending):
            self.target.write(self.pending)
        self.pending = ""


@contextlib.contextmanager
def dropping_lines(drop: re.Pattern[str]) -> Iterator[None]:
    """Inside the block, lines of ``sys.stdout`` that ``drop`` matches are left out; the rest pass through as written."""
    stream = _LineFilter(sys.stdout, drop)
    try:
        with contextlib.redirect_stdout(stream):
            yield
    finally:
        stream.close_pending()
        stream.flush()


def setup_distributed() -> tuple[int, int, torch.device]:
    """Join the launcher's process group, or make a single-process one (plain ``python``)."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    with dropping_lines(OP_BUILT):
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device



def decoder_layer_classes(model: torch.nn.Module) -> list[type]:
    """The model's decoder-layer classes (transformers' ``_no_split_modules``) that it really contains."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return sorted({type(m) for m in model.modules() if type(m).__name__ in names}, key=lambda c: c.__name__)


def load_model(cfg: TrainConfig, model_path: str, ds_config: dict[str, Any], dtype: torch.dtype, attn_implementation: str,
               random_weights: bool = False) -> torch.nn.Module:
    """The causal LM for training: partitioned at load under ZeRO-3, LoRA adapters injected with the base frozen
    (``lora.rank`` > 0; ``lora.quantize``: the base in 4 bits), decoder layers marked as ZeRO-3 leaf modules
    (``train.zero3_leaf_modules``), gradient checkpointing as configured, no KV cache.

    Raises:
        ValueError: ``lora.target_modules`` matches nothing, the output head or the embeddings."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    from train import lora

    stage = ds_config["zero_optimization"]["stage"]
    # While this object lives, from_pretrained partitions the weights as it loads them (zero.Init);
    # transformers holds it by a weak reference, so the model keeps it alive (below) for as long as it lives.
    hf_ds_config = HfDeepSpeedConfig(ds_config) if stage == 3 else None
    trust = cfg.trust_remote_code
    quantized = lora.quantized_load_kwargs(dtype) if cfg.lora.rank and cfg.lora.quantize != "none" else {}
    if random_weights and not quantized:  # benchmarks: the same compute without a weights file
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path, trust_remote_code=trust), dtype=dtype,
                                                 attn_implementation=attn_implementation, trust_remote_code=trust)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, attn_implementation=attn_implementation,
                                                     trust_remote_code=trust, **quantized)
    if hf_ds_config is not None:
        model._sftgo_hf_deepspeed_config = hf_ds_config
    if cfg.lora.rank:
        model = lora.add_adapters(model, cfg.lora, model_path)
        trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
        # A 4-bit weight's numel() counts its packed storage (2 to 8 weights an element): the base is counted from its config.
        frozen = (count_parameters(model_path, trust) if quantized
                  else sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if not p.requires_grad))
        log0(f"lora: rank {cfg.lora.rank}, alpha {lora.lora_alpha(cfg.lora):g}, dropout {cfg.lora.dropout:g} on "
             f"{','.join(cfg.lora.target_modules)}{' (base in 4-bit NF4)' if quantized else ''}: {trainable:,} adapter "
             f"parameters train, the {frozen:,} of the base are frozen")
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    if stage == 3 and cfg.train.zero3_leaf_modules:
        from deepspeed.utils import set_z3_leaf_modules

        classes = decoder_layer_classes(model)
        if classes:
            # One gather per layer instead of one per projection/norm: the per-module hooks are the cost.
            set_z3_leaf_modules(model, classes)
            log0(f"zero3 leaf modules: {', '.join(c.__name__ for c in classes)}")
        else:
            log0(f"zero3 leaf modules: {type(model).__name__} names no decoder-layer class (_no_split_modules); per-module gathers")
    return model


def build_engine(model: torch.nn.Module, cfg: TrainConfig, ds_config: dict[str, Any], total_steps: int) -> tuple[Any, Any]:
    """The DeepSpeed engine (any ZeRO stage) around ``model`` with a client AdamW (nothing to compile) and the LR schedule."""
    import deepspeed

    # Weight decay on matrices only; ZeRO-3 has already partitioned the parameters (p.shape is empty),
    # so read the full shape from ds_shape.
    def is_matrix(name: str, param: torch.nn.Parameter) -> bool:
        return len(getattr(param, "ds_shape", param.shape)) >= 2 and "norm" not in name

    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # LoRA: the adapters only
    groups = [{"params": [p for n, p in params if is_matrix(n, p)], "weight_decay": cfg.optim.weight_decay},
              {"params": [p for n, p in params if not is_matrix(n, p)], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    # The scheduler is built on DeepSpeed's wrapped optimizer (a callable), so their param groups agree.
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_config,
        lr_scheduler=lambda wrapped: make_scheduler(wrapped, total_steps, cfg.optim))
    return engine, scheduler


def export_model(engine: Any, tokenizer: Any, out: Path, rank: int, card: str | None = None,
                 merged_card: str | None = None, trust_remote_code: bool = False) -> None:
    """A standard Hugging Face folder (safetensors, config, generation_config, tokenizer, model card
    ``card`` as README.md) that from_pretrained loads; it appears whole or not at all.

    With LoRA adapters, ``out`` is PEFT's adapter folder instead (adapter_config.json naming the base,
    adapter_model.safetensors, and the same tokenizer, generation_config and card): ``PeftModel.from_pretrained(base,
    out)`` loads it. ``merged_card`` (``lora.export_merged``; given on rank 0): also ``<out>_merged/``, the base with the
    adapters merged in (train/lora.py :func:`~train.lora.merge_adapter`), with that card."""
    from train.card import generation_config
    from train.lora import merge_adapter, peft_model_of, save_adapter

    adapters = peft_model_of(engine.module) is not None
    if engine.zero_optimization_stage() == 3:
        # Gathers ZeRO-3 partitions on rank 0 (LoRA: the adapters only).
        state = engine._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=adapters)
    else:
        state = engine.module.state_dict()  # stages 0-2 keep whole weights on every rank
    if rank == 0:
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model = engine.module
        if adapters:
            save_adapter(model, state, tmp)
        else:
            model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        generation_config(model, tokenizer).save_pretrained(tmp)
        if card is not None:
            (tmp / "README.md").write_text(card, encoding="utf-8")
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
        if adapters and merged_card is not None:
            dtype = next(p.dtype for p in model.parameters() if p.requires_grad)
            merged = out.with_name(out.name + "_merged")
            merge_adapter(out, merged, dtype, merged_card, trust_remote_code)
            log0(f"lora.export_merged: the base with the adapter merged in: {merged}")
    dist.barrier()
