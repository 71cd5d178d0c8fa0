"""Train on annotated shards with SFT-GO, Rho-1, InfoSFT, DFT or SFT under DeepSpeed ZeRO-3.

    deepspeed train/main.py --config train/configs/lima_sftgo.yaml                 # 1..N GPUs
    deepspeed --hostfile docker/hostfile train/main.py --config ...                  # several nodes
    python train/main.py --config train/configs/demo_cpu.yaml loss.name=sftgo importance.rho=0.7

One explicit loop, top to bottom: setup (config, distributed, data, model, engine) -> train (steps of
``grad_accum`` packed micro-batches; checkpoint and evaluate every N steps) -> save (export a Hugging
Face folder). The parts: train/plan.py (data, steps, groups), train/engine.py (processes, ZeRO, model,
engine, export), train/step.py (one step, evaluation), train/checkpoint.py, train/metrics.py.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

if not __package__:  # run as a file: this checkout, not the file's folder, leads sys.path (tests/test_layers.py)
    sys.path[:] = [str(Path(__file__).resolve().parents[1])] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch
import torch.distributed as dist

from train import config as train_config
from train.card import run_cards
from train.checkpoint import (Progress, Refusal, Terminated, check_resumable, count_trained, finish_run_dir, finished_run,
                              gather_trained, interrupted, load_checkpoint, load_trained_counts, record_start, refuse_short_epochs,
                              refusing, run_identity, run_summary, save_checkpoint, seed_all, start_point, start_run_dir,
                              stop_signals_raise, write_summary)
from train.engine import build_engine, export_model, load_model, resolve_zero_stage, setup_distributed
from train.forward import resolve_attn_implementation
from train.losses import build_loss
from train.metrics import Metrics, bar_postfix, log0, step_record
from train.mfu import ModelFlops, StepTimer, device_peak_flops, mfu
from train.plan import dry_run, open_data, open_stream, plan_grouping, slow_cpu_step_warning
from train.shards import NO_SCORE
from train.sources import SourceWindow
from train.step import HeldOut, next_step_batches, train_step

# DeepSpeed's ZeRO stages call this every step (3 warnings a step); nothing a user of this trainer can change.
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.reduce_scatter_tensor` is deprecated", category=FutureWarning)


def run(argv: list[str] | None, progress: Progress) -> int:
    """The whole run: setup, train, save (``--dry-run``: setup only, printing what would be trained)."""
    # -- config: everything checked before any model loads ------------------------------------------
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg = train_config.load_config([a for a in argv if a != "--dry-run"])
        train_config.validate(cfg)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if "--dry-run" in argv:
        return dry_run(cfg)
    if (slow := slow_cpu_step_warning(cfg, cuda=torch.cuda.is_available())) is not None:
        log0(f"warning: {slow}")
    # The data before the process group: a bad path or a data mismatch is refused in seconds, before DeepSpeed
    # starts (its first start on a machine compiles a communication op for ~45 s).
    with refusing(ValueError, OSError):
        model_path, tokenizer, manifest, val_manifest = open_data(cfg)
    rank, world_size, device = setup_distributed()

    # -- the run directory: a finished run is not redone, another run's checkpoint not continued --------
    out = Path(cfg.output_dir)
    ckpt_root = progress.ckpt_root = out / "checkpoints"
    progress.rank = rank
    config_sha256, identity = run_identity(cfg, [manifest, val_manifest])
    if (finished := finished_run(out, config_sha256)) is not None:  # a rerun of a finished command (make demo twice)
        log0(f"{out}: already trained with this config ({finished['steps']} steps); model in {out / 'model'}. "
             "Nothing to do (another output_dir or any changed key trains again)")
        dist.destroy_process_group()
        return 0
    resume, history = start_point(cfg, out, identity)
    if rank == 0:
        start_run_dir(cfg, out, history)
    seed_all(cfg.seed)

    # -- engine set-up, data plan, groups --------------------------------------------------------------
    dtype_name = train_config.resolve_dtype(cfg, cuda=device.type == "cuda")
    with refusing(ValueError):
        zero = resolve_zero_stage(cfg, model_path, world_size, device, dtype_name)
        ds_config = train_config.deepspeed_dict(cfg, world_size=world_size, dtype=dtype_name, zero_stage=zero.stage,
                                                offload_optimizer=zero.offload_optimizer)
        if resume is not None:
            check_resumable(resume, zero.stage, world_size, cfg.lora)
    log0(f"zero stage {zero.stage}: {zero.why}")
    attn_implementation = resolve_attn_implementation(cfg.train.attn_implementation, device.type, dtype_name)
    log0(f"attention: {attn_implementation}")
    with refusing(ValueError):
        stream, plan, total_steps = open_stream(cfg, manifest, world_size)
    cut, corpus_quantiles, share = plan_grouping(cfg, manifest)
    # Per-source metrics (train/sources.py): the sources read with the lengths at plan time, the same on every rank and resume.
    sources = stream.read_sources()
    window = SourceWindow.open(sources, cfg.data.train, groups=cfg.importance.scorer != NO_SCORE)

    # -- model, engine, resume, evaluation, metrics ----------------------------------------------------
    model = load_model(cfg, model_path, ds_config, torch.bfloat16 if dtype_name == "bfloat16" else torch.float32,
                       attn_implementation)
    engine, scheduler = build_engine(model, cfg, ds_config, total_steps)
    loss_fn = build_loss(cfg.loss.name, **train_config.loss_options(cfg))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    step, trained = 0, {}  # trained: this rank's [examples, trainable tokens] per epoch
    if resume is not None:
        step, trained = load_checkpoint(engine, stream, resume, rank), load_trained_counts(resume, rank)
        progress.step = step
        log0(f"resumed from {resume} at step {step}")
    held_out = HeldOut.open(cfg, manifest, val_manifest)
    metrics = Metrics.open(cfg, out, rank, resumed=resume is not None)
    if rank == 0:
        record_start(out, step, history)
    # MFU: the model's real FLOPs per step over the device's own peak (train/mfu.py; not reported where unknown).
    model_flops, peak, timer = ModelFlops.of(engine.module), device_peak_flops(device, dtype_name), StepTimer(device)
    checkpoint_extra = {"total_steps": total_steps, "identity": identity}

    # -- train ----------------------------------------------------------------------------------------
    from tqdm import tqdm

    batches = stream.micro_batches(cfg.data.micro_batch_tokens, num_workers=cfg.data.num_workers)
    bar = tqdm(total=total_steps, initial=step, desc="train", disable=rank != 0, dynamic_ncols=True)
    engine.module.train()
    while step < total_steps:
        timer.start()
        micro = next_step_batches(batches, cfg.train.grad_accum, pad_id, device)
        if micro is None:  # the plan says how many steps the epochs hold: running out early is a bug
            raise Refusal(f"the data ran out after {step} of {total_steps} planned steps; please report this with the config")
        lr = scheduler.get_last_lr()[0]  # the rate this step uses (the scheduler steps inside train_step)
        count_trained(trained, micro)
        by_source = None if window is None else window.step_sums(device)
        parts, step_tokens, seen_tokens = train_step(engine, micro, loss_fn, cfg, cut, step / max(1, total_steps - 1), device,
                                                     corpus_quantiles, source_sums=by_source)
        step = progress.step = step + 1
        seconds = timer.stop()
        # Loss, FLOPs and the per-source sums summed over ranks in one collective.
        total = torch.tensor([sum(p["loss"] for p in parts), model_flops.step_flops(micro)], device=device, dtype=torch.float64)
        if by_source is not None:
            total = torch.cat([total, by_source.reshape(-1)])
        dist.all_reduce(total)
        if window is not None:
            window.add(total[2:])
        record = step_record(step, parts, float(total[0].item()), groups=cfg.importance.scorer != NO_SCORE, lr=lr,
                             grad_norm=parts[-1].get("grad_norm", float(engine.get_global_grad_norm() or 0.0)),
                             tokens_per_s=seen_tokens / seconds, trainable_tokens=step_tokens, epoch=stream.epoch,
                             skipped_no_trainable=stream.skipped_no_trainable, mfu=mfu(float(total[1].item()), seconds, peak, world_size))
        logged = step % cfg.train.log_every == 0
        if window is not None and (logged or step == total_steps):
            record.update(window.take())
        if held_out is not None and cfg.eval.every and step % cfg.eval.every == 0:
            record.update(held_out.evaluate(engine, cfg, device, pad_id))
        metrics.log(record)
        if logged:
            bar.set_postfix(bar_postfix(record, window.postfix(record) if window is not None else None))
        bar.update(1)
        if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < total_steps:
            save_checkpoint(engine, stream, ckpt_root, step, rank, cfg.checkpoint.keep, checkpoint_extra, trained)
    bar.close()

    # -- what was trained: never a silent short epoch (nothing is exported, the summary says why) --------
    per_epoch = gather_trained(trained, device)
    refuse_short_epochs(per_epoch, plan, cfg, out, rank, step, total_steps)

    # -- save -------------------------------------------------------------------------------------------
    final_eval = held_out.final(engine, cfg, device, pad_id) if held_out is not None else None
    if final_eval is not None:
        metrics.log({"step": step, **final_eval})
    save_checkpoint(engine, stream, ckpt_root, step, rank, cfg.checkpoint.keep, checkpoint_extra, trained)
    card, merged_card = run_cards(cfg, loss_fn.describe(), step, total_steps, final_eval) if rank == 0 else (None, None)
    export_model(engine, tokenizer, out / "model", rank, card, merged_card, cfg.trust_remote_code)
    if rank == 0:
        metrics.close()
        write_summary(out, run_summary(cfg, out, step, total_steps, per_epoch, plan, share, stream.skipped_no_trainable, sources,
                                       held_out.sources if held_out is not None else None, config_sha256, identity))
        finish_run_dir(cfg, out, step)
    dist.barrier()
    dist.destroy_process_group()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Train; a refusal (exit 2) logs its one line; on Ctrl-C (exit 130) or SIGTERM (exit 143): one line saying
    where the same command resumes, unfinished checkpoint folders removed, no traceback."""
    progress = Progress(rank=int(os.environ.get("RANK", "0")))  # the launcher's; set again once the group exists
    with stop_signals_raise():
        try:
            return run(argv, progress)
        except Refusal as exc:
            log0(f"error: {exc}")
            if dist.is_initialized():  # a refusal of the data comes before the process group exists
                dist.destroy_process_group()
            return 2
        except (KeyboardInterrupt, Terminated) as exc:
            return interrupted(exc, progress)


if __name__ == "__main__":
    sys.exit(main())
