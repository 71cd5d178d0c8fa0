"""Benchmark: lm-eval multiple-choice scoring through evaluation.run, the harness's HFLM against
evaluation/packed_lm.py's PackedLM, on the same model, questions and machine, side by side.

Not a test: it measures and writes a JSON file. One process loads the model once; each variant runs
``lm_eval.simple_evaluate`` on the same tasks (``evaluation.run``'s local-file MMLU / ARC tasks) in
rotating order over ``--rounds``; the value per variant is the median wall time. Accuracies are
recorded too: every variant must give the same ones (same answers, less work).

    python bench/evaluate.py --limit 1 --out bench/results/evaluate_cpu.json        # 57 MMLU + 30 ARC questions
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if not __package__:  # run as a file: this checkout, not the file's folder, leads sys.path (tests/test_layers.py)
    sys.path[:] = [str(Path(__file__).resolve().parents[1])] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="model folder or the embedded name")
    ap.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "eval"))
    ap.add_argument("--limit", type=int, default=1, help="MMLU questions per subject (57 subjects)")
    ap.add_argument("--arc-limit", type=int, default=30, help="ARC-Challenge questions")
    ap.add_argument("--variants", default="hf:16,hf:4,packed:512,packed:1024",
                    help="comma-separated kind:size; hf:N = HFLM batch N, packed:N = PackedLM rows of N tokens")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from data.models import load_tokenizer, resolve_model
    from evaluation import run as ev
    from evaluation.packed_lm import PackedLM

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    path = resolve_model(args.model)
    tokenizer = load_tokenizer(path)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = ev.load_model(path, device)
    variants = args.variants.split(",")
    seconds: dict[str, dict[str, list[float]]] = {v: {} for v in variants}
    accuracy: dict[str, dict[str, float]] = {v: {} for v in variants}
    for task, limit in (("mmlu", args.limit), ("arc_challenge", args.arc_limit)):
        parsed = ev.build_parser().parse_args([args.model, "--tasks", task, "--data-dir", args.data_dir, "--limit", str(limit), "--no-generate"])
        _, _, bench, _, _ = ev.check_inputs(parsed)
        for round_index in range(args.rounds):
            order = variants[round_index % len(variants):] + variants[:round_index % len(variants)]
            for variant in order:
                kind, size = variant.split(":")
                lm = (HFLM(pretrained=model, tokenizer=tokenizer, batch_size=int(size)) if kind == "hf"
                      else PackedLM(model, tokenizer, micro_batch_tokens=int(size), progress=False))
                started = time.perf_counter()
                result = lm_eval.simple_evaluate(model=lm, tasks=ev._task_objects(bench), task_manager=TaskManager(include_defaults=False),
                                                 num_fewshot=0, limit=limit, log_samples=False)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                seconds[variant].setdefault(task, []).append(time.perf_counter() - started)
                accuracy[variant][task] = result["results"][task]["acc,none"]
                print(f"{task} {variant} round {round_index}: {seconds[variant][task][-1]:.1f} s, acc {accuracy[variant][task]:.4f}", flush=True)
    median = {v: {t: statistics.median(s) for t, s in by_task.items()} for v, by_task in seconds.items()}
    reference = variants[0]
    report = {
        "benchmark": "bench/evaluate.py", "command": " ".join([sys.executable, *sys.argv]), "device": device.type,
        "machine": {"platform": platform.platform(), "cpus": torch.get_num_threads(), "torch": torch.__version__},
        "model": args.model, "questions": {"mmlu": 57 * args.limit, "arc_challenge": args.arc_limit}, "rounds": args.rounds,
        "seconds": seconds, "median_seconds": median, "accuracy": accuracy,
        "same_accuracy": all(accuracy[v] == accuracy[reference] for v in variants),
        "speedup_vs": {"reference": reference, **{v: {t: median[reference][t] / median[v][t] for t in median[v]} for v in variants}},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["speedup_vs"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
