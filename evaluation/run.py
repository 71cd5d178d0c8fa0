"""Evaluate trained runs side by side: benchmarks (lm-evaluation-harness), per-group held-out loss, generations.

    python -m evaluation.run runs/sft runs/sftgo --tasks mmlu,arc_challenge --data-dir ../shared/data/eval
    python -m evaluation.run runs/sft runs/sftgo --heldout shards/lima --scorer tfidf --rho 0.7

A RUN is a training run directory (``model/`` + ``config.yaml``), a Hugging Face model folder, or the
embedded name ``smollm2-135m-instruct``. Every input is checked before any model loads (exit 2,
``error: ...`` on stderr). Then, one run at a time on one device (no DeepSpeed, no torch.distributed):

- **Benchmarks** run through lm-evaluation-harness (``lm_eval.simple_evaluate`` with an ``HFLM`` around
  the loaded model), offline: tasks are built in code from local files in their original formats,
  loaded into ``datasets.Dataset`` here (``custom_dataset``), with the harness's own prompts and
  metrics for ``mmlu`` (57 subjects, one group: size-weighted mean = micro accuracy, pooled stderr)
  and ``arc_challenge`` (acc and acc_norm).
- **Held-out loss per group** over an annotated shard directory with the trainer's own code
  (``train/heldout.py``: ShardStream packing, train/grouping.py, train/forward.py token_losses), overall and
  per value of the shards' ``source`` column, with token counts; no group numbers for scorer ``none``.
  The grouping (score, rho, scope) is each run's own: its config's evaluation grouping
  (``train.config.eval_grouping``: ``eval.*``, defaulting to ``importance.*``); a model without a training
  config takes the first run directory's; ``--scorer`` / ``--rho`` / ``--scope`` set it for every run.
- **Generations**: greedy answers to a few prompts, rendered with the chat template and the system-prompt
  choice the run trained with (its ``data.system_prompt``, which the trainer checked against its shards'
  tokenizer fingerprint; ``--system-prompt`` overrides; a model without a training config: ``default``, the
  template's own behaviour). Held-out shards rendered with another choice than a run's training shards are
  refused, naming both.

Results: one table printed, ``--output`` (all runs) and ``RUN_DIR/evaluation.json`` (that run only)
with keys ``run``, ``model``, ``benchmarks``, ``heldout``, ``generations`` (read by evaluation.report).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import logging
import os
import re
import shutil
import sys
import textwrap
from dataclasses import dataclass, field
from itertools import zip_longest
from pathlib import Path
from typing import Any

import torch

from schemas.shard import program

TASKS = ("mmlu", "arc_challenge")
# --split -> (MMLU directory / file suffix, ARC file part): the original releases' names.
SPLITS = {"val": ("val", "Dev"), "test": ("test", "Test")}
MMLU_DEV_SHOTS = 5  # MMLU's dev split holds the 5 few-shot examples of each subject
CE_CHUNK = 1024  # target tokens per lm_head chunk in the held-out pass (train.ce_chunk's default)
DEFAULT_PROMPTS = [
    "What is the capital of France?",
    "Give three tips for staying healthy.",
    "Explain in one sentence what photosynthesis is.",
    "Write a haiku about the ocean.",
]


@dataclass
class Run:
    """One RUN argument: its display name, the model to load and, for a run directory, where to write."""

    name: str
    arg: str
    model: str  # a model folder, or the embedded name until resolve_model converts it
    run_dir: Path | None = None
    tokenizer: Any = None
    config: Any = None  # a run directory's TrainConfig (config.yaml)
    system_prompt: str = "default"  # what its generations are rendered with (data.system_prompt)
    # The system-prompt choice its training shards were rendered with: its config's data.system_prompt, which the
    # trainer checked against their tokenizer fingerprint; None for a model without a training config.
    trained_system_prompt: str | None = None
    grouping: tuple[str, float, str] = ("tfidf", 0.7, "sequence")  # (scorer, rho, scope) of its held-out groups
    grouping_from: str = "the defaults"  # where the grouping came from, in words
    heldout: list[tuple[str, Any, float | None]] = field(default_factory=list)  # (dir, manifest, threshold)


@dataclass
class Benchmarks:
    """The parsed local files of the requested tasks (docs already in the harness's HF layouts)."""

    data_dir: Path
    split: str
    mmlu: dict[str, dict[str, list[dict[str, Any]]]] | None = None  # subject -> {"eval": docs, "dev": docs}
    arc: dict[str, list[dict[str, Any]]] | None = None  # {"eval": docs, "train": docs (optional)}


# ---------------------------------------------------------------------------------------------
# Inputs: everything is read and checked here, before any model loads
# ---------------------------------------------------------------------------------------------


#: Where the combined results go by default: beside the runs, in a folder git ignores.
DEFAULT_OUTPUT = "runs/evaluation.json"


def resolve_run(arg: str) -> Run:
    """A RUN argument -> :class:`Run`; raises ValueError naming the argument when it is no model."""
    from data.models import EMBEDDED, check_model

    from train.lora import is_adapter_folder

    path = Path(arg).expanduser()
    if path.is_dir():
        name = path.resolve().name
        if (path / "model").is_dir() or ((path / "config.yaml").exists() and not (path / "config.json").exists()
                                         and not is_adapter_folder(path)):
            if not (path / "model" / "config.json").is_file() and not is_adapter_folder(path / "model"):
                raise ValueError(f"run directory {arg} has no model/config.json (nor a LoRA adapter's model/adapter_config.json): "
                                 "the run has not exported its model (training writes model/ at the end)")
            return Run(name=name, arg=arg, model=str(path / "model"), run_dir=path)
        if (path / "config.json").is_file() or is_adapter_folder(path):
            return Run(name=name, arg=arg, model=str(path))
        raise ValueError(f"{arg}: neither a training run directory (model/ and config.yaml) nor a model folder (config.json) "
                         "nor a LoRA adapter folder (adapter_config.json)")
    if arg in EMBEDDED:
        return Run(name=arg, arg=arg, model=arg)
    if path.exists() or arg.startswith((".", "/", "~")) or arg.count("/") > 1:
        raise ValueError(f"run or model {arg!r}: no such directory")
    try:  # a Hugging Face id: only from the local cache when offline
        return Run(name=arg.replace("/", "_"), arg=arg, model=check_model(arg))
    except FileNotFoundError as exc:
        raise ValueError(f"run or model {arg!r}: {exc}") from None


def _mmlu_rows(path: Path) -> list[dict[str, Any]]:
    """One MMLU CSV (no header: question, A, B, C, D, answer) -> docs shaped like HF ``cais/mmlu``."""
    subject = path.name.rsplit("_", 1)[0]
    docs = []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            for row in reader:
                where = f"{path}:{reader.line_num}"
                if not row or all(not cell.strip() for cell in row):
                    continue
                if len(row) != 6:
                    raise ValueError(f"{where}: expected 6 columns (question,A,B,C,D,answer), got {len(row)}")
                answer = row[5].strip().upper()
                if answer not in ("A", "B", "C", "D"):
                    raise ValueError(f"{where}: answer {row[5]!r} is not one of A, B, C, D")
                if not row[0].strip():
                    raise ValueError(f"{where}: empty question")
                docs.append({"question": row[0], "subject": subject, "choices": row[1:5], "answer": "ABCD".index(answer)})
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc})") from None
    except csv.Error as exc:
        raise ValueError(f"{path}: malformed CSV ({exc})") from None
    if not docs:
        raise ValueError(f"{path}: no rows")
    return docs


def read_mmlu(data_dir: Path, split: str, num_fewshot: int) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Every subject of ``DATA/mmlu/<split>/<subject>_<split>.csv``, plus its dev file when k-shot needs it."""
    folder, _ = SPLITS[split]
    eval_dir = data_dir / "mmlu" / folder
    if not eval_dir.is_dir():
        raise ValueError(f"task mmlu: no directory {eval_dir} (expected {eval_dir}/<subject>_{folder}.csv)")
    files = sorted(eval_dir.glob(f"*_{folder}.csv"))
    if not files:
        raise ValueError(f"task mmlu: no <subject>_{folder}.csv file in {eval_dir}")
    if num_fewshot > MMLU_DEV_SHOTS:
        raise ValueError(f"--num-fewshot {num_fewshot}: MMLU's dev split holds {MMLU_DEV_SHOTS} examples per subject")
    subjects: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for path in files:
        subject = path.name[: -len(f"_{folder}.csv")]
        splits = {"eval": _mmlu_rows(path)}
        if num_fewshot > 0:  # the original MMLU k-shot: the first k examples of the subject's dev file
            dev = data_dir / "mmlu" / "dev" / f"{subject}_dev.csv"
            if not dev.is_file():
                raise ValueError(f"task mmlu: --num-fewshot {num_fewshot} needs {dev} (few-shot examples of {subject})")
            splits["dev"] = _mmlu_rows(dev)
            if len(splits["dev"]) < num_fewshot:
                raise ValueError(f"{dev}: {len(splits['dev'])} rows, fewer than --num-fewshot {num_fewshot}")
        subjects[subject] = splits
    return subjects


def _arc_rows(path: Path) -> list[dict[str, Any]]:
    """An ARC jsonl file -> docs shaped like HF ``allenai/ai2_arc`` (labels kept: A-E or 1-4)."""
    docs = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc})") from None
    for number, line in enumerate(lines, 1):
        where = f"{path}:{number}"
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not JSON ({exc.msg})") from None
        question = record.get("question") if isinstance(record, dict) else None
        if not isinstance(question, dict) or not isinstance(question.get("stem"), str):
            raise ValueError(f"{where}: missing question.stem")
        choices = question.get("choices")
        if (not isinstance(choices, list) or len(choices) < 2
                or not all(isinstance(c, dict) and isinstance(c.get("text"), str) and isinstance(c.get("label"), str) for c in choices)):
            raise ValueError(f"{where}: question.choices must be a list of at least 2 {{text, label}} objects")
        labels = [c["label"] for c in choices]
        if "answerKey" not in record:
            raise ValueError(f"{where}: missing answerKey")
        if record["answerKey"] not in labels:
            raise ValueError(f"{where}: answerKey {record['answerKey']!r} is not one of the choice labels {labels}")
        docs.append({"id": str(record.get("id", number)), "question": question["stem"],
                     "choices": {"text": [c["text"] for c in choices], "label": labels}, "answerKey": record["answerKey"]})
    if not docs:
        raise ValueError(f"{path}: no records")
    return docs


def read_arc(data_dir: Path, split: str) -> dict[str, list[dict[str, Any]]]:
    """``DATA/arc/ARC-Challenge-<Dev|Test>.jsonl``, plus ``ARC-Challenge-Train.jsonl`` when present (few-shot)."""
    _, part = SPLITS[split]
    path = data_dir / "arc" / f"ARC-Challenge-{part}.jsonl"
    if not path.is_file():
        raise ValueError(f"task arc_challenge: no file {path}")
    docs = {"eval": _arc_rows(path)}
    train = data_dir / "arc" / "ARC-Challenge-Train.jsonl"
    if train.is_file():
        docs["train"] = _arc_rows(train)
    return docs


def read_prompts(path: str | None) -> list[str]:
    """Generation prompts: the built-in list, or a file (one prompt a line, or JSONL with ``prompt``)."""
    if path is None:
        return list(DEFAULT_PROMPTS)
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"--prompts {path}: not a file")
    lines = file.read_text(encoding="utf-8").splitlines()
    jsonl = file.suffix == ".jsonl" or next((l.lstrip().startswith("{") for l in lines if l.strip()), False)
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if not jsonl:
            prompts.append(line.strip())
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
            raise ValueError(f"{path}:{number}: a JSONL line needs a non-empty string \"prompt\"")
        prompts.append(record["prompt"])
    if not prompts:
        raise ValueError(f"--prompts {path}: no prompts in the file")
    return prompts


def parse_tasks(text: str) -> list[str]:
    """``"mmlu,arc_challenge"`` -> names, each checked against :data:`TASKS`."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    for name in names:
        if name not in TASKS:
            raise ValueError(f"--tasks: unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return list(dict.fromkeys(names))


def configure_runs(runs: list[Run], args: argparse.Namespace) -> None:
    """Each run's held-out grouping and system-prompt choice: its training config's (``eval_grouping`` and
    ``data.system_prompt``), a model without one the first run directory's grouping; the options override."""
    from train import config as train_config

    for run in runs:
        if run.run_dir is not None and (run.run_dir / "config.yaml").is_file():
            try:
                run.config = train_config.load_config(["--config", str(run.run_dir / "config.yaml")])
            except ValueError as exc:
                raise ValueError(f"run {run.arg}: its config.yaml is not readable here ({exc}); give --scorer, --rho, --scope") from None
    first = next((run.config for run in runs if run.config is not None), None)
    for run in runs:
        cfg = run.config if run.config is not None else first
        own = train_config.eval_grouping(cfg) if cfg is not None else ("tfidf", 0.7, "sequence")
        run.grouping = (args.scorer or own[0], own[1] if args.rho is None else args.rho, args.scope or own[2])
        given = [o for o, v in (("--scorer", args.scorer), ("--rho", args.rho), ("--scope", args.scope)) if v is not None]
        origin = "its config" if run.config is not None else ("the first run's config" if cfg is not None else "the defaults")
        run.grouping_from = (origin if not given else " ".join(given) if len(given) == 3
                             else f"{' '.join(given)}; the rest from {origin}")
        if run.config is not None:
            run.trained_system_prompt = run.config.data.system_prompt
        if args.system_prompt is not None:
            run.system_prompt = args.system_prompt
        elif run.trained_system_prompt is not None:
            run.system_prompt = run.trained_system_prompt


def heldout_system_prompt_problem(run: Run, uri: str, manifest: Any) -> str | None:
    """Why held-out shards ``uri`` do not fit ``run`` (None when they do): they were rendered with another
    system-prompt choice than the run's training shards, so their tokens (and losses) are not the ones it learnt on.
    A model without a training config has no choice to hold them to."""
    from schemas.shard import system_prompt_of

    have, want = system_prompt_of(manifest.tokenizer), run.trained_system_prompt
    if want is None or have == want:
        return None
    return (f"--heldout {uri} was rendered with system prompt {have!r} (annotate --system-prompt), but run {run.arg} "
            f"trained on shards rendered with {want!r} (its data.system_prompt); held-out losses are only comparable "
            f"on the same rendering: annotate the held-out data with --system-prompt {want!r}")


def check_inputs(args: argparse.Namespace) -> tuple[list[Run], list[str], Benchmarks | None, list[str], torch.device]:
    """Read and check every input; raises ValueError / OSError with a message naming the culprit."""
    from data.models import load_tokenizer, resolve_model
    from schemas.shard import tokenizer_fingerprint
    from train.heldout import check_rho, open_heldout
    from train.lora import adapter_base, is_adapter_folder

    try:
        if args.rho is not None:
            check_rho(args.rho)
    except ValueError:
        raise ValueError(f"--rho {args.rho}: must be in [0, 1)") from None
    for option, value, low in (("--num-fewshot", args.num_fewshot, 0), ("--limit", args.limit, 1), ("--batch-size", args.batch_size, 1), ("--row-tokens", args.row_tokens, 1),
                               ("--micro-batch-tokens", args.micro_batch_tokens, 1), ("--max-new-tokens", args.max_new_tokens, 1)):
        if value is not None and value < low:
            raise ValueError(f"{option} {value}: must be >= {low}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device here")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")

    tasks = parse_tasks(args.tasks)
    if not tasks and not args.heldout and not args.generate:
        raise ValueError("nothing to evaluate: give --tasks, --heldout, or leave generations on")
    runs = [resolve_run(arg) for arg in args.runs]
    seen: dict[str, int] = {}
    for run in runs:  # unique display names (two runs/x/model folders are both "model")
        seen[run.name] = seen.get(run.name, 0) + 1
        if seen[run.name] > 1:
            run.name = f"{run.name}#{seen[run.name]}"

    bench = None
    if tasks:
        if args.data_dir is None:
            raise ValueError("--tasks needs --data-dir (the folder holding mmlu/ and arc/)")
        data_dir = Path(args.data_dir)
        if not data_dir.is_dir():
            raise ValueError(f"--data-dir {args.data_dir}: no such directory")
        bench = Benchmarks(data_dir=data_dir, split=args.split)
        if "mmlu" in tasks:
            bench.mmlu = read_mmlu(data_dir, args.split, args.num_fewshot)
        if "arc_challenge" in tasks:
            bench.arc = read_arc(data_dir, args.split)
    prompts = read_prompts(args.prompts) if args.generate else []
    output = Path(args.output)
    # A directory given by hand must exist (a typo fails before any work); the default's runs/ is made on write.
    if not output.parent.resolve().is_dir() and args.output != DEFAULT_OUTPUT:
        raise ValueError(f"--output {args.output}: directory {output.parent} does not exist")

    configure_runs(runs, args)
    for run in runs:  # tokenizers only (the embedded model is converted once, on first use)
        run.model = resolve_model(run.model)
        # A LoRA adapter: its base must be here (before any model loads); its tokenizer, unless the folder has its own.
        tokenizer_source = run.model
        if is_adapter_folder(run.model):
            base = adapter_base(run.model)
            if not (Path(run.model) / "tokenizer_config.json").is_file():
                tokenizer_source = base
        # Before any model loads: a folder asking for its own code is refused unless --trust-remote-code.
        run.tokenizer = load_tokenizer(tokenizer_source, args.trust_remote_code, option="--trust-remote-code")
        if args.heldout:
            sha = tokenizer_fingerprint(run.tokenizer)["sha256"]
            for uri in args.heldout:
                try:
                    manifest, threshold = open_heldout(uri, sha, *run.grouping)
                except ValueError as exc:
                    raise ValueError(f"--heldout {uri} for run {run.arg}: {exc}") from None
                if (mismatch := heldout_system_prompt_problem(run, uri, manifest)) is not None:
                    raise ValueError(mismatch)
                run.heldout.append((uri, manifest, threshold))
    return runs, tasks, bench, prompts, device


# ---------------------------------------------------------------------------------------------
# Model work
# ---------------------------------------------------------------------------------------------


def load_model(path: str, device: torch.device, trust_remote_code: bool = False) -> Any:
    """A causal LM from safetensors on ``device``: bf16 on CUDA, fp32 on CPU; sdpa (packing needs its mask). A LoRA
    adapter folder (adapter_config.json) loads on its base through PEFT, merged into the base's weights."""
    from train.lora import load_causal_lm

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = load_causal_lm(path, dtype, attn_implementation="sdpa", use_safetensors=True, trust_remote_code=trust_remote_code)
    return model.to(device).eval()


def _task_objects(bench: Benchmarks) -> list[Any]:
    """lm-eval Task / Group objects over the parsed files, with the harness's standard mmlu / arc configs."""
    import datasets
    from lm_eval.api.group import Group
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.config.group import AggMetricConfig

    def dataset(splits: dict[str, list[dict[str, Any]]]) -> Any:
        built = datasets.DatasetDict({name: datasets.Dataset.from_list(docs) for name, docs in splits.items()})
        return lambda **_: built  # custom_dataset: called with the task's metadata, ignored

    objects: list[Any] = []
    if bench.mmlu is not None:
        # lm_eval/tasks/mmlu/default: the same prompt, description, first-n dev shots and metric;
        # the group's size-weighted mean over subjects is the micro accuracy.
        group = Group(name="mmlu", aggregate_metric_list=[AggMetricConfig(metric="acc", weight_by_size=True)])
        for subject, splits in bench.mmlu.items():
            group.add(ConfigurableTask(config={
                "task": f"mmlu_{subject}", "task_alias": subject, "custom_dataset": dataset(splits),
                "output_type": "multiple_choice", "test_split": "eval", "fewshot_split": "dev" if "dev" in splits else None,
                "fewshot_config": {"sampler": "first_n"},
                "description": f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n",
                "doc_to_text": "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\nD. {{choices[3]}}\nAnswer:",
                "doc_to_choice": ["A", "B", "C", "D"], "doc_to_target": "answer",
                "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
                "metadata": {"version": 1.0}}))
        objects.append(group)
    if bench.arc is not None:
        # lm_eval/tasks/arc/arc_easy.yaml's prompt and metrics. Few-shot examples come from the Train
        # file when there is one, else from the evaluated file (the harness then leaves out the doc asked).
        objects.append(ConfigurableTask(config={
            "task": "arc_challenge", "custom_dataset": dataset(bench.arc), "output_type": "multiple_choice",
            "test_split": "eval", "fewshot_split": "train" if "train" in bench.arc else "eval",
            "doc_to_text": "Question: {{question}}\nAnswer:", "doc_to_target": "{{choices.label.index(answerKey)}}",
            "doc_to_choice": "{{choices.text}}",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": 1.0}}))
    return objects


def _number(value: Any) -> float | None:
    """A harness metric as a float; its "N/A" (e.g. the stderr of a single example) as None."""
    return None if value is None or isinstance(value, str) else float(value)


def run_benchmarks(model: Any, tokenizer: Any, bench: Benchmarks, tasks: list[str], run: Run, num_fewshot: int,
                   limit: int | None, batch_size: int, loglikelihood: str = "packed",
                   row_tokens: int = 512) -> list[dict[str, Any]]:
    """``lm_eval.simple_evaluate`` on the loaded model; one record per task.

    ``loglikelihood`` picks the harness model: ``packed`` (:class:`evaluation.packed_lm.PackedLM`: the same
    answers, packed rows of ``row_tokens``, LM head only where it is read) or ``hf`` (the harness's
    ``HFLM``, ``batch_size`` padded requests a forward)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from evaluation.packed_lm import PackedLM

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # one warning per MMLU subject otherwise
    terminal = sys.stderr
    if loglikelihood == "packed":
        lm = PackedLM(model, tokenizer, micro_batch_tokens=row_tokens, progress_file=terminal)
    else:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    # The harness draws an unlabelled progress bar per task while building requests (57 for MMLU):
    # kept off the terminal; PackedLM's one labelled bar is drawn there, and any other text is passed on.
    captured = io.StringIO()
    with contextlib.redirect_stderr(captured):
        results = lm_eval.simple_evaluate(model=lm, tasks=_task_objects(bench), task_manager=TaskManager(include_defaults=False),
                                          num_fewshot=num_fewshot, limit=limit, log_samples=False)
    for line in re.split(r"[\r\n]", captured.getvalue()):
        if line.strip() and not (re.search(r"\d+%\|", line) or (loglikelihood == "hf" and "it/s]" in line)):
            print(line, file=terminal)
    table = results["results"]
    records = []
    for task in tasks:
        metrics = table[task]
        record = {"run": run.name, "model": run.model, "task": task, "split": bench.split, "data_dir": str(bench.data_dir),
                  "num_fewshot": num_fewshot, "limit": limit, "loglikelihood": loglikelihood,
                  "acc": _number(metrics.get("acc,none")), "acc_stderr": _number(metrics.get("acc_stderr,none")),
                  "acc_norm": _number(metrics.get("acc_norm,none")), "acc_norm_stderr": _number(metrics.get("acc_norm_stderr,none")),
                  "n": int(metrics["sample_len"])}
        if task == "mmlu":
            record["aggregation"] = "micro (size-weighted mean over subjects; pooled stderr)"
            record["subjects"] = {subject: {"acc": _number(table[f"mmlu_{subject}"].get("acc,none")),
                                            "acc_stderr": _number(table[f"mmlu_{subject}"].get("acc_stderr,none")),
                                            "n": int(table[f"mmlu_{subject}"]["sample_len"])}
                                  for subject in bench.mmlu}
        records.append(record)
    return records


def generate_answers(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int, device: torch.device,
                     system_prompt: str = "default") -> list[dict[str, str]]:
    """Greedy answers, one prompt at a time (no padding to reason about); the chat template when the tokenizer has one,
    with the run's system-prompt choice (data.render.prompt_text: what its training data was rendered with)."""
    from data.render import prompt_text

    from transformers import GenerationConfig

    eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None else tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if isinstance(eos, list) else eos)
    # A fresh config: the checkpoint's sampling defaults (temperature, top_p) must not apply.
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=pad)
    answers = []
    for prompt in prompts:
        if tokenizer.chat_template:
            text = prompt_text(tokenizer, prompt, system_prompt)
            encoded = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        else:
            encoded = tokenizer(prompt, return_tensors="pt")
        encoded = encoded.to(device)
        with torch.no_grad():
            out = model.generate(**encoded, generation_config=config)
        answer = tokenizer.decode(out[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        answers.append({"prompt": prompt, "answer": answer})
    return answers


def evaluation_request(run: Run, args: argparse.Namespace, tasks: list[str], bench: Benchmarks | None, prompts: list[str],
                       device: torch.device) -> dict[str, Any]:
    """Everything that decides a run's evaluation numbers: the weights (by digest), tasks and their docs,
    limits, held-out directories (by manifest digest), grouping and prompts. An earlier evaluation with
    an equal request is reused instead of recomputed."""
    import hashlib

    from schemas.shard import file_sha256, manifest_sha256

    from train.lora import ADAPTER_CONFIG, adapter_base, is_adapter_folder

    def digests(folder: Path) -> dict[str, str]:
        files = sorted(folder.glob("*.safetensors")) + [folder / "config.json", folder / ADAPTER_CONFIG]
        return {p.name: file_sha256(p) for p in files if p.is_file()}

    weights: dict[str, Any] = digests(Path(run.model))
    if is_adapter_folder(run.model):  # a LoRA adapter: its base's weights decide the numbers too
        weights["base"] = digests(Path(adapter_base(run.model)))
    docs = None
    if bench is not None:
        docs = hashlib.sha256(json.dumps({"mmlu": bench.mmlu, "arc": bench.arc}, sort_keys=True, default=str).encode()).hexdigest()
    return {"weights": weights, "tasks": tasks, "split": args.split, "benchmark_docs_sha256": docs, "num_fewshot": args.num_fewshot,
            "limit": args.limit, "loglikelihood": args.loglikelihood,
            "loglikelihood_batch": args.row_tokens if args.loglikelihood == "packed" else args.batch_size,
            "heldout": [{"dir": str(Path(uri).resolve()), "manifest_sha256": manifest_sha256(uri)}
                        for uri, _, _ in run.heldout],
            "scorer": run.grouping[0] if run.heldout else None, "rho": run.grouping[1] if run.heldout else None,
            "scope": run.grouping[2] if run.heldout else None, "micro_batch_tokens": args.micro_batch_tokens if run.heldout else None,
            "prompts": prompts, "max_new_tokens": args.max_new_tokens if prompts else None, "device": device.type,
            **({"system_prompt": run.system_prompt} if prompts and run.system_prompt != "default" else {})}


def earlier_evaluation(run: Run, request: dict[str, Any], output: Path) -> dict[str, Any] | None:
    """A finished evaluation of the same request: RUN_DIR/evaluation.json, or a run of the --output file."""
    candidates: list[dict[str, Any]] = []
    for path in ([run.run_dir / "evaluation.json"] if run.run_dir is not None else []) + [output]:
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        candidates += saved.get("runs", []) if "runs" in saved else [saved]
    for saved in candidates:
        if isinstance(saved, dict) and saved.get("request") == request:
            return {**saved, "run": run.name, "model": run.model}
    return None


def evaluate_run(run: Run, args: argparse.Namespace, tasks: list[str], bench: Benchmarks | None, prompts: list[str],
                 device: torch.device) -> dict[str, Any]:
    """Load one run's model and evaluate it; returns its ``evaluation.json`` object."""
    from train.heldout import heldout_losses

    print(f"== {run.name}: {run.model} on {device}", flush=True)
    model = load_model(run.model, device, args.trust_remote_code)
    result: dict[str, Any] = {"run": run.name, "model": run.model, "benchmarks": [], "heldout": [], "generations": []}
    if bench is not None:
        result["benchmarks"] = run_benchmarks(model, run.tokenizer, bench, tasks, run, args.num_fewshot, args.limit, args.batch_size,
                                              args.loglikelihood, args.row_tokens)
    for uri, manifest, threshold in run.heldout:
        scorer, rho, scope = run.grouping
        summary = heldout_losses(model, uri, manifest, scorer, rho, scope, threshold,
                                 micro_batch_tokens=args.micro_batch_tokens, device=device, chunk_size=CE_CHUNK)
        result["heldout"].append({"run": run.name, "model": run.model, "dir": uri, "scorer": scorer, "rho": rho,
                                  "scope": scope, "grouping_from": run.grouping_from, "micro_batch_tokens": args.micro_batch_tokens,
                                  **summary})
    if prompts:
        result["generations"] = generate_answers(model, run.tokenizer, prompts, args.max_new_tokens, device, run.system_prompt)
        result["system_prompt"] = run.system_prompt
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def _pm(value: float | None, stderr: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_results(results: list[dict[str, Any]]) -> str:
    """One table: a row per task metric and held-out loss (overall and per source), a column per run."""
    from train.shards import NO_SCORE

    names = [r["run"] for r in results]
    rows: list[list[str]] = []
    keys = list(dict.fromkeys((b["task"], b["split"], b["num_fewshot"], b["n"]) for r in results for b in r["benchmarks"]))
    for task, split, shots, n in keys:
        for metric in ("acc", "acc_norm"):
            cells = []
            for r in results:
                b = next((b for b in r["benchmarks"] if b["task"] == task), {})
                cells.append(_pm(b.get(metric), b.get(f"{metric}_stderr")))
            if any(c != "-" for c in cells):
                rows.append([f"{task} {metric}", f"{split}, {shots}-shot, n={n}", *cells])
    dirs = list(dict.fromkeys(h["dir"] for r in results for h in r["heldout"]))
    for uri in dirs:
        held = [next((h for h in r["heldout"] if h["dir"] == uri), None) for r in results]
        first = next(h for h in held if h)
        # scorer none (a run trained without a score): no groups, so no group rows rather than 0.0 in them.
        groups = first["scorer"] != NO_SCORE
        setting = f"{first['scorer']} rho={first['rho']} {first['scope']}" if groups else "no groups (scorer none)"
        keys = (("ce", "CE"), ("important_loss", "important"), ("unimportant_loss", "unimportant"),
                ("worse_group", "worse group"))[: 4 if groups else 1]
        for key, label in keys:
            rows.append([f"held-out {label}", f"{uri} ({setting})", *[_cell(h, key) for h in held]])
        rows.append(["held-out tokens", f"{uri} ({setting})",
                     *["-" if h is None else f"{h['tokens']}" + (f" ({h['important_tokens']} important)" if groups else "")
                       for h in held]])
        # Per source (the shards' `source` column): CE, and each group's loss where there are groups, with tokens.
        sources = list(dict.fromkeys(s["source"] for h in held if h for s in h.get("sources", [])))
        for source in sources:
            per = [None if h is None else next((s for s in h.get("sources", []) if s["source"] == source), None) for h in held]
            for key, label in keys[:3]:
                rows.append([f"held-out {label} [{source}]", f"{uri} ({setting})", *[_cell(p, key) for p in per]])
            rows.append([f"held-out tokens [{source}]", f"{uri} ({setting})",
                         *["-" if p is None else f"{p['tokens']}" + (f" ({p['important_tokens']} important)" if groups else "")
                           for p in per]])
    return _table(["metric", "setting", *names], rows) if rows else ""


def _cell(record: dict[str, Any] | None, key: str) -> str:
    """One table cell: a number to 4 decimals, a word as it is, ``-`` where the record or the value is absent (a group
    without tokens, a source the set does not hold)."""
    value = None if record is None else record.get(key)
    if value is None:
        return "-"
    return value if isinstance(value, str) else f"{value:.4f}"


def _wrap(text: str, width: int) -> list[str]:
    """Wrap each line of ``text`` to ``width``, keeping its line breaks (lists, code)."""
    return [piece for line in text.splitlines() for piece in (textwrap.wrap(line, width) or [""])]


def format_generations(results: list[dict[str, Any]]) -> str:
    """Each prompt, then every run's answer in its own column."""
    runs = [r for r in results if r["generations"]]
    if not runs:
        return ""
    width = max(24, (shutil.get_terminal_size((120, 20)).columns - 3 * (len(runs) - 1)) // len(runs))
    blocks = []
    for i, item in enumerate(runs[0]["generations"]):
        columns = [[r["run"], "-" * min(width, len(r["run"]))] + _wrap(r["generations"][i]["answer"] or "(empty)", width)
                   for r in runs]
        lines = [" | ".join(cell.ljust(width) for cell in row).rstrip() for row in zip_longest(*columns, fillvalue="")]
        blocks.append(f">>> {item['prompt']}\n" + "\n".join(lines))
    return "\n\n".join(blocks)


def write_json(path: Path, obj: Any) -> Path:
    """Atomically (tmp + os.replace): a reader sees the old file or the new one, never half of one."""
    from schemas.shard import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=program("python -m evaluation.run"), formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Evaluate runs side by side: benchmarks through lm-evaluation-harness on local files, "
                    "per-group held-out loss with the trainer's code, and greedy sample generations.",
        epilog=textwrap.dedent("""\
            examples:
              python -m evaluation.run runs/sft runs/sftgo --tasks mmlu,arc_challenge --data-dir ../shared/data/eval
              python -m evaluation.run runs/sft runs/sftgo --heldout shards/lima --scorer tfidf --rho 0.7
              python -m evaluation.run smollm2-135m-instruct --tasks arc_challenge --data-dir ../shared/data/eval --limit 20 --no-generate
            """))
    parser.add_argument("runs", nargs="+", metavar="RUN",
                        help="training run directory (model/ + config.yaml), model folder (config.json), LoRA adapter folder "
                             "(adapter_config.json: loaded on its base with PEFT), or smollm2-135m-instruct")
    parser.add_argument("--tasks", default="", help="comma-separated benchmarks: mmlu, arc_challenge (default: none)")
    parser.add_argument("--data-dir", default=None,
                        help="folder with mmlu/<split>/<subject>_<split>.csv (+ mmlu/dev/ for k-shot) and arc/ARC-Challenge-<Dev|Test>.jsonl; required with --tasks")
    parser.add_argument("--split", default="val", choices=sorted(SPLITS),
                        help="val: mmlu/val/*_val.csv and arc/ARC-Challenge-Dev.jsonl; test: mmlu/test/*_test.csv and arc/ARC-Challenge-Test.jsonl (default: %(default)s)")
    parser.add_argument("--num-fewshot", type=int, default=0,
                        help="examples in context: MMLU takes the first k of mmlu/dev (k <= 5); ARC draws k from "
                             "ARC-Challenge-Train.jsonl if present, else from the evaluated file minus the question asked (default: %(default)s)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N examples of each MMLU subject and of ARC, for quick runs (default: all)")
    parser.add_argument("--loglikelihood", default="packed", choices=["packed", "hf"],
                        help="how the harness's loglikelihood requests run: packed (evaluation/packed_lm.py: no padding, LM head only "
                             "where read; the same answers) or hf (lm-eval's HFLM, --batch-size padded requests a forward) (default: %(default)s)")
    parser.add_argument("--row-tokens", type=int, default=512,
                        help="--loglikelihood packed: tokens a packed row holds (512 was fastest on 2 CPU cores; more on a GPU) (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=16, help="--loglikelihood hf: requests per forward pass (default: %(default)s)")
    parser.add_argument("--heldout", action="append", default=[], metavar="DIR",
                        help="annotated shard directory for per-group held-out loss (repeatable); its tokenizer must be the run's (default: none)")
    parser.add_argument("--scorer", default=None, help="stored score that groups the held-out tokens: tfidf, llmlingua2, ref_loss, excess_loss, ... "
                                                      "(default: each run's own evaluation grouping, eval.scorer or importance.scorer of its config; "
                                                      "a model without one: the first run directory's, else tfidf)")
    parser.add_argument("--rho", type=float, default=None, help="threshold in [0, 1): the top ceil((1 - rho) * n) trainable tokens of each scope are important "
                                                                 "(default: each run's own, as --scorer; else 0.7)")
    parser.add_argument("--scope", default=None, choices=["sequence", "batch", "corpus"],
                        help="where tokens are ranked: sequence (per example), batch (per packed micro-batch), corpus (manifest threshold) "
                             "(default: each run's own, as --scorer; else sequence)")
    parser.add_argument("--system-prompt", default=None,
                        help="the system-prompt choice generations are rendered with: default, none or a text (default: each run's "
                             "data.system_prompt, what its data was annotated with; a model without a training config: default)")
    parser.add_argument("--micro-batch-tokens", type=int, default=4096,
                        help="held-out packing budget in tokens (scope batch depends on it: use the run's data.micro_batch_tokens) (default: %(default)s)")
    parser.add_argument("--generate", action=argparse.BooleanOptionalAction, default=True, help="greedy answers to the sample prompts (default: on)")
    parser.add_argument("--prompts", default=None, metavar="FILE",
                        help="prompts file: one prompt a line, or JSONL with \"prompt\" (default: 4 built-in prompts)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per answer (default: %(default)s)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow a model folder whose config asks for code shipped with it (auto_map); off: such a model is refused (default: off)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda (bf16) when available, else cpu (fp32) (default: %(default)s)")
    parser.add_argument("--force", action="store_true",
                        help="recompute a run even when RUN_DIR/evaluation.json or --output holds an evaluation of the same request (default: reuse it)")
    parser.add_argument("--output", default=DEFAULT_OUTPUT,
                        help="combined JSON of all runs; each run directory also gets RUN_DIR/evaluation.json (default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: 0 on success, 2 on bad input (before any model loads)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # every dataset is a local file
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        runs, tasks, bench, prompts, device = check_inputs(args)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    results, written = [], []
    for run in runs:
        request = evaluation_request(run, args, tasks, bench, prompts, device)
        earlier = None if args.force else earlier_evaluation(run, request, Path(args.output))
        if earlier is not None:
            print(f"== {run.name}: an evaluation of the same weights, tasks, limits, held-out set and prompts is already "
                  f"there; reused (--force recomputes)", flush=True)
            results.append(earlier)
        else:
            results.append({**evaluate_run(run, args, tasks, bench, prompts, device), "request": request})
        if run.run_dir is not None:  # written as soon as the run is done: a later run's crash keeps it
            written.append(write_json(run.run_dir / "evaluation.json", results[-1]))
    print()
    table = format_results(results)
    if table:
        print(table)
    generations = format_generations(results)
    if generations:
        print("\n== sample generations (greedy)\n" + generations)
    written.append(write_json(Path(args.output), {"runs": results, "options": vars(args)}))
    print("\nwrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
