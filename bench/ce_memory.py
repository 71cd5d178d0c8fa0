"""Micro-benchmark: peak memory of naive vs chunked per-token cross-entropy (forward + backward).

Not a test: it measures and writes a JSON file. The workload is the LM head of one packed row:
hidden states ``[seq, hidden]`` (SmolLM2-135M's hidden size by default) -> ``lm_head`` over the full
vocabulary (49,152) -> per-token CE of every target position -> ``sum().backward()``.

- ``naive``: full-row logits, upcast to fp32, ``F.cross_entropy`` (what ``model(...).logits`` implies);
- ``chunked@N``: ``train.forward.chunked_token_ce`` with ``chunk_size=N`` (checkpointed chunks).

Peak memory is the increase over the memory held before the CE starts:
on CUDA ``torch.cuda.max_memory_allocated`` (reset per variant); on CPU the process's peak RSS
(``resource.getrusage().ru_maxrss``), with each variant in a fresh subprocess because RSS peaks cannot
be reset. (``tracemalloc`` only sees Python's allocator, not torch's tensor storage, so it would read ~0.)

    python bench/ce_memory.py                       # CPU, seq 4096, vocab 49152 (~1 min on 2 cores)
    python bench/ce_memory.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if not __package__:  # run as a file: this checkout, not the file's folder, leads sys.path (tests/test_layers.py)
    sys.path[:] = [str(Path(__file__).resolve().parents[1])] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

MiB = 1024 * 1024


def _rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_variant(variant: str, seq: int, vocab: int, hidden: int, device: str, dtype_name: str) -> dict[str, Any]:
    """Run one variant (``naive`` or ``chunked@N``) once, forward + backward; return its measurements."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from train.forward import chunked_token_ce

    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    head = nn.Linear(hidden, vocab, bias=False).to(device=device, dtype=dtype)
    states = torch.randn(seq, hidden, device=device, dtype=dtype, requires_grad=True)
    input_ids = torch.randint(0, vocab, (seq,), device=device)
    loss_mask = torch.ones(seq, dtype=torch.bool, device=device)
    loss_mask[0] = False  # the first token predicts nothing

    # chunked_token_ce only needs get_output_embeddings() and config; a full model is not needed.
    class HeadOnly(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lm_head = head
            self.config = SimpleNamespace(final_logit_softcapping=None)

        def get_output_embeddings(self) -> nn.Module:
            return self.lm_head

    wrapper = HeadOnly()
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_peak_bytes()

    start = time.perf_counter()
    if variant == "naive":
        logits = head(states).float()
        losses = F.cross_entropy(logits[:-1], input_ids[1:], reduction="none")
        del logits
    else:
        chunk = int(variant.split("@", 1)[1])
        losses = chunked_token_ce(wrapper, states, input_ids, [seq], loss_mask, chunk_size=chunk)
    total = losses.sum()
    total.backward()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _rss_peak_bytes() - base
    seconds = time.perf_counter() - start
    return {
        "variant": variant,
        "peak_extra_mib": round(peak / MiB, 1),
        "seconds": round(seconds, 3),
        "loss_sum": float(total.detach()),
        "grad_norm_hidden": float(states.grad.float().norm()),
        "grad_norm_head": float(head.weight.grad.float().norm()),
        "targets": int(losses.numel()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--hidden", type=int, default=576, help="SmolLM2-135M: 576; Llama-3.2-1B: 2048")
    parser.add_argument("--chunks", default="4096,1024,256", help="chunk sizes to compare with naive")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", help="hidden/head dtype (bfloat16 on GPU)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "ce_memory.json")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: one variant, print JSON
    args = parser.parse_args()

    if args.child:
        print(json.dumps(run_variant(args.child, args.seq, args.vocab, args.hidden, args.device, args.dtype)))
        return

    import torch

    variants = ["naive"] + [f"chunked@{int(c)}" for c in args.chunks.split(",") if c]
    results = []
    for variant in variants:
        if args.device.startswith("cuda"):
            result = run_variant(variant, args.seq, args.vocab, args.hidden, args.device, args.dtype)
            torch.cuda.empty_cache()
        else:
            # A fresh process per variant: ru_maxrss is a high-water mark that never goes down.
            cmd = [sys.executable, __file__, "--child", variant, "--seq", str(args.seq), "--vocab", str(args.vocab),
                   "--hidden", str(args.hidden), "--device", args.device, "--dtype", args.dtype]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO)
            result = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append(result)
        print(json.dumps(result), flush=True)

    naive = results[0]
    report = {
        "what": "peak extra memory of per-token CE forward+backward over the full vocabulary, naive vs chunked",
        "measure": "torch.cuda.max_memory_allocated" if args.device.startswith("cuda") else "peak RSS (ru_maxrss) per subprocess",
        "seq": args.seq, "vocab": args.vocab, "hidden": args.hidden, "device": args.device, "dtype": args.dtype,
        "fp32_full_logits_mib": round(args.seq * args.vocab * 4 / MiB, 1),
        "results": results,
        "max_loss_sum_rel_diff_vs_naive": max(abs(r["loss_sum"] - naive["loss_sum"]) / abs(naive["loss_sum"]) for r in results),
        "torch": torch.__version__,
        "machine": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
