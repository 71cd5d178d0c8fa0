"""The evidence study: annotate a fixed LIMA slice, train SFT / SFT-GO / Rho-1 / InfoSFT / DFT on it from
the same shards, evaluate every run and the base model, and write what held and what did not.

    python bench/study.py --config bench/study/lima_small.yaml           # the whole study, resumable
    python bench/study.py --config bench/study/lima_small.yaml --smoke   # 2 steps a run, tiny slices
    python bench/study.py --config bench/study/lima_gpu.yaml             # the whole LIMA set, on a GPU
    python bench/study.py --config bench/study/known_truth.yaml          # issue 33: bench/known_truth_study.py
    python bench/study.py --config bench/study/known_truth_gpu.yaml      # the same at full size, on a GPU
    python bench/study.py --config bench/study/demo.yaml                 # make demo: bench/demo_study.py
    python bench/study.py --config bench/study/lima_seeds.yaml train.optim.lr=1.0e-4   # key=value overrides a key of the config

Steps, each skipped when its output is already there (so a killed study reruns with the same command,
and the trainer resumes a killed run from its last checkpoint):
1. slices of the corpora (``data.*``: [start, start + count) in file order) under ``work``/data;
2. annotate train and held-out with tfidf + base_loss, the reference slice with tfidf, and TF-IDF
   variants of the train slice (``tfidf_variants``);
3. the reference model: SmolLM2 SFT-trained on the reference slice; ``--add-scorers ref_loss`` with it
   on train and held-out, so ``excess_loss = base_loss - ref_loss`` (Rho-1's) is defined;
4. every run of ``runs`` (``train`` keys shared, the run's own on top), then its evaluation: MMLU val and
   ARC-Challenge dev through ``evaluation.run``, greedy generations, and held-out losses of the
   important and the unimportant group under EVERY grouping of ``groupings`` (not only the run's);
   the base model is evaluated the same way;
5. ``results``/study.json (every number), report.md and the curves (PNG), rewritten after each run.

A fresh checkout has no ``work`` folder, only the committed ``results``. Runs already in
``results``/study.json are then reused, not retrained, when the study's config is unchanged and the
base model's held-out group losses, recomputed on the freshly annotated shards, equal the recorded
ones (so the groupings, the reference model's ref_loss included, are the same); otherwise, or with
``--no-reuse``, everything is recomputed.
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
if not __package__:  # run as a file: this checkout, not the file's folder, leads sys.path (tests/test_layers.py)
    sys.path[:] = [str(Path(__file__).resolve().parents[1])] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import yaml  # noqa: E402

from schemas.shard import MANIFEST_NAME, atomic_write_text  # noqa: E402

SCHEMA = "sftgo-study/1"
TOP_TOKENS = 30


class StudyError(RuntimeError):
    """A step of the study failed; the message names the step and its log file."""


# Config keys whose values decide every number of a run; a recorded run is reused only if they are unchanged.
RESULT_KEYS = ("model", "data", "train", "reference_train", "groupings", "evaluate", "smoke")


def same_heldout(recorded: dict[str, Any], now: dict[str, Any], rel_tol: float = 1e-5) -> bool:
    """True when two held-out group summaries (``collect``'s per-grouping entries) agree: the same token
    counts and the same losses up to float32 noise (1e-7 relative measured between two annotations of
    the same slice; a grouping change moves the token counts, and seed noise is ~3e-3 relative)."""
    if set(recorded) != set(now):
        return False
    for scorer, a in recorded.items():
        b = now[scorer]
        if (a["tokens"], a.get("important_tokens"), a["worse_group"]) != (b["tokens"], b.get("important_tokens"), b["worse_group"]):
            return False
        if not all(math.isclose(a[k], b[k], rel_tol=rel_tol) for k in ("ce", "important_loss", "unimportant_loss")):
            return False
    return True


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------

REQUIRED = ("model", "results", "work", "data", "train", "reference_train", "groupings", "runs", "evaluate", "tfidf_variants")
# scorer_options: annotate's --scorer-option for every directory the study annotates ({"tfidf.sublinear_tf": true}),
# so a recorded study keeps its scores when a scorer's default changes. Not a RESULT_KEY: a change of the scores it
# makes shows in the base model's held-out group losses, which reuse recomputes and compares.
# smoke_runs: the runs --smoke keeps (all when absent).
OPTIONAL = ("scorer_options", "smoke_runs")


def read_config(path: Path, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """The YAML mapping of ``path`` with the command line's ``key=value`` overrides applied, in order.

    A dotted key walks nested mappings (``data.train.count=64``); a key that holds dots itself, as the train
    keys do, is matched whole (``train.optim.lr=1.0e-4`` sets ``optim.lr`` of ``train``). The value is read as
    YAML, as train/main.py reads its own ``key=value`` (``64`` an int, ``[a, b]`` a list, nothing an empty
    string). Only a key the file has can be set, so a misspelt one fails, naming the nearest, before any step.
    """
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise StudyError(f"--config {path}: {exc}") from None
    if not isinstance(cfg, dict):
        raise StudyError(f"--config {path}: expected a mapping of keys")
    for override in overrides:
        dotted, sep, raw = override.partition("=")
        if not sep or not dotted:
            raise StudyError(f"{override!r}: expected KEY=VALUE (a key of --config {path}, e.g. data.train.count=64)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node, rest = cfg, dotted
        while rest not in node:
            head, dot, tail = rest.partition(".")
            if not dot or not isinstance(node.get(head), dict):
                close = difflib.get_close_matches(dotted, list(_dotted_keys(cfg)), n=1, cutoff=0.6)
                raise StudyError(f"{override!r}: --config {path} has no key {dotted}" + (f" (did you mean {close[0]}?)" if close else ""))
            node, rest = node[head], tail
        node[rest] = value
    return cfg


def _dotted_keys(mapping: dict[str, Any], prefix: str = "") -> Any:
    """Every key of a nested mapping, dotted: what an override can name."""
    for key, value in mapping.items():
        yield prefix + str(key)
        if isinstance(value, dict):
            yield from _dotted_keys(value, f"{prefix}{key}.")


def step_env() -> dict[str, str]:
    """The environment of every step's command: this checkout's code first, offline, unbuffered output."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
                PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def load_study(path: Path, smoke: bool, model: str | None, results: str | None, work: str | None,
               overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """The study config (``overrides`` applied: :func:`read_config`), checked; ``--smoke`` shrinks it to 2 steps a
    run on 8-example slices, ``smoke_runs`` and the first two ``tfidf_variants``."""
    cfg = read_config(path, overrides)
    missing = [k for k in REQUIRED if k not in cfg]
    unknown = sorted(set(cfg) - set(REQUIRED) - set(OPTIONAL))
    if missing or unknown:
        raise StudyError(f"--config {path}: missing keys {missing}, unknown keys {unknown}")
    for name in ("train", "reference", "heldout"):
        spec = cfg["data"].get(name)
        if not isinstance(spec, dict) or not {"input", "format", "start", "count"} <= set(spec):
            raise StudyError(f"--config {path}: data.{name} needs input, format, start and count")
    for key in ("tfidf", "excess_loss"):
        if key not in cfg["groupings"]:
            raise StudyError(f"--config {path}: groupings needs {key} (the held-out groupings compared)")
    if model:
        cfg["model"] = model
    if results:
        cfg["results"] = results
    if work:
        cfg["work"] = work
    if smoke:
        for name in ("train", "reference", "heldout"):
            cfg["data"][name]["count"] = 8
        cfg["train"].update({"train.max_steps": 2, "checkpoint.every": 1})
        cfg["reference_train"]["train.max_steps"] = 2
        cfg["evaluate"].update(mmlu_limit=1, arc_limit=2, max_new_tokens=4, prompts=cfg["evaluate"]["prompts"][:1])
        if cfg.get("smoke_runs"):
            cfg["runs"] = {name: cfg["runs"][name] for name in cfg["smoke_runs"]}
        # Two TF-IDF variants exercise the variant path; each more is one more annotate job (a Ray start).
        cfg["tfidf_variants"] = dict(list(cfg["tfidf_variants"].items())[:2])
    unknown_runs = sorted(set(cfg.get("smoke_runs") or []) - set(cfg["runs"])) if not smoke else []
    if unknown_runs:
        raise StudyError(f"--config {path}: smoke_runs {unknown_runs} are not runs")
    for name, overrides in cfg["runs"].items():
        if "seed" not in overrides or not name.endswith(f"_s{overrides['seed']}"):
            raise StudyError(f"--config {path}: runs.{name}: name it METHOD_sSEED and set seed (runs are paired by seed)")
    cfg["smoke"] = smoke
    return cfg


def _resolve(base: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


# ---------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------


class Study:
    def __init__(self, cfg: dict[str, Any], config_path: Path) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.work = _resolve(REPO, cfg["work"])
        self.results = _resolve(REPO, cfg["results"])
        self.logs = self.work / "logs"
        for folder in (self.work / "data", self.logs, self.work / "eval", self.results):
            folder.mkdir(parents=True, exist_ok=True)
        self.env = step_env()
        self.timings: dict[str, float] = {}
        timings_file = self.work / "timings.json"
        if timings_file.exists():
            self.timings = json.loads(timings_file.read_text())
        self.previous: dict[str, Any] | None = None  # the committed study.json, read before it is rewritten
        previous_file = self.results / "study.json"
        if previous_file.exists():
            previous = json.loads(previous_file.read_text())
            if previous.get("schema") == SCHEMA:
                self.previous = previous

    # -- plumbing -------------------------------------------------------------------------------------

    def sh(self, name: str, cmd: list[str]) -> None:
        """Run one step's command, its output in logs/NAME.log; raise naming the log on failure."""
        log = self.logs / f"{name}.log"
        print(f"[study] {name}: {' '.join(cmd)}", flush=True)
        started = time.time()
        with open(log, "a", encoding="utf-8") as out:
            out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
            out.flush()
            code = subprocess.run(cmd, cwd=REPO, env=self.env, stdout=out, stderr=subprocess.STDOUT, check=False).returncode
        if code != 0:
            tail = "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-25:])
            raise StudyError(f"step {name} failed (exit {code}); log: {log}\n{tail}")
        self.timings[name] = self.timings.get(name, 0.0) + time.time() - started
        atomic_write_text(self.work / "timings.json", json.dumps(self.timings, indent=2))

    def shards(self, name: str) -> Path:
        return self.work / "shards" / name

    def run_dir(self, name: str) -> Path:
        return self.work / "runs" / name

    # -- 1. data slices -------------------------------------------------------------------------------

    def slice_corpus(self, name: str) -> Path:
        spec = self.cfg["data"][name]
        source = _resolve(REPO, spec["input"])
        start, count = int(spec["start"]), int(spec["count"])
        text = source.read_text(encoding="utf-8")
        if source.suffix == ".json":
            records = json.loads(text)[start:start + count]
            body, out = json.dumps(records, ensure_ascii=False, indent=1) + "\n", self.work / "data" / f"{name}.json"
        else:
            lines = [line for line in text.splitlines() if line.strip()][start:start + count]
            body, out = "\n".join(lines) + "\n", self.work / "data" / f"{name}.jsonl"
        if len(body.splitlines()) < 1 or (out.exists() and out.read_text(encoding="utf-8") == body):
            return out  # unchanged: annotate recognises its own finished job
        atomic_write_text(out, body)
        return out

    # -- 2./3. annotate, reference model, ref_loss ---------------------------------------------------

    def _manifest(self, folder: Path) -> dict[str, Any] | None:
        path = folder / MANIFEST_NAME
        return json.loads(path.read_text()) if path.exists() else None

    def _has_scorer(self, folder: Path, scorer: str) -> bool:
        manifest = self._manifest(folder)
        return manifest is not None and scorer in [s["name"] for s in manifest.get("scorers", [])]

    def annotate(self, name: str, corpus: Path, data: str, scorers: str, options: dict[str, Any] | None = None) -> None:
        folder = self.shards(name)
        if all(self._has_scorer(folder, s) for s in scorers.split(",")):
            return
        cmd = [sys.executable, "annotate/run.py", "--input", str(corpus), "--format", self.cfg["data"][data]["format"],
               "--model", self.cfg["model"], "--max-length", str(self.cfg["data"]["max_length"]), "--scorers", scorers,
               "--output", str(folder)]
        # The study's own scorer options for the scorers of this directory, then the call's (a tfidf variant's).
        chosen = {k: v for k, v in (self.cfg.get("scorer_options") or {}).items() if k.split(".")[0] in scorers.split(",")}
        for key, value in {**chosen, **(options or {})}.items():
            cmd += ["--scorer-option", f"{key}={json.dumps(value) if isinstance(value, bool) else value}"]
        self.sh(f"annotate_{name}", cmd)

    def add_ref_loss(self, name: str, reference: Path) -> None:
        folder = self.shards(name)
        if self._has_scorer(folder, "ref_loss"):
            return
        self.sh(f"ref_loss_{name}", [sys.executable, "annotate/run.py", "--output", str(folder), "--add-scorers", "ref_loss",
                                     "--scorer-option", f"ref_loss.model={reference}"])

    def train(self, name: str, shards: Path, overrides: dict[str, Any]) -> Path:
        out = self.run_dir(name)
        if (out / "train_summary.json").exists() and (out / "model" / "config.json").exists():
            return out
        keys = {"model": self.cfg["model"], "output_dir": str(out), "data.train": str(shards), "data.validation": "",
                **overrides}
        self.sh(f"train_{name}", [sys.executable, "train/main.py", *[f"{k}={_cli(v)}" for k, v in keys.items()]])
        return out

    # -- 4. evaluation ----------------------------------------------------------------------------------

    def benchmarked(self, name: str) -> bool:
        """Whether run ``name`` (or base) gets MMLU, ARC and generations: ``evaluate.benchmark_seeds``
        (default all); every run gets the held-out group losses."""
        seeds = self.cfg["evaluate"].get("benchmark_seeds")
        return name == "base" or seeds is None or self.cfg["runs"][name]["seed"] in seeds

    def evaluate(self, name: str, model: str) -> dict[str, Any]:
        """Benchmarks (:meth:`benchmarked` runs), generations and held-out group losses under every
        grouping, cached in work/eval."""
        ev = self.cfg["evaluate"]
        # The held-out manifest's digest: re-annotated shards (other scores) must not reuse an old evaluation.
        heldout_manifest = hashlib.sha256((self.shards("heldout") / MANIFEST_NAME).read_bytes()).hexdigest()
        settings = {"model": model, "benchmarks": self.benchmarked(name), "mmlu_limit": ev["mmlu_limit"], "arc_limit": ev["arc_limit"],
                    "groupings": self.cfg["groupings"],
                    "prompts": ev["prompts"], "max_new_tokens": ev["max_new_tokens"], "heldout": str(self.shards("heldout")),
                    "heldout_manifest_sha256": heldout_manifest}
        out = self.work / "eval" / f"{name}.json"
        if out.exists():
            cached = json.loads(out.read_text())
            if cached.get("settings") == settings:
                return cached
        prompts = self.work / "data" / "prompts.txt"
        atomic_write_text(prompts, "\n".join(ev["prompts"]) + "\n")
        parts = {}
        tasks = (("mmlu", ev["mmlu_limit"], ["--no-generate"]),
                 ("arc_challenge", ev["arc_limit"], ["--prompts", str(prompts), "--max-new-tokens", str(ev["max_new_tokens"])]))
        for task, limit, extra in tasks if self.benchmarked(name) else ():
            part = self.work / "eval" / f"{name}.{task}.json"
            self.sh(f"evaluate_{name}_{task}", [sys.executable, "-m", "evaluation.run", model, "--tasks", task,
                                                "--data-dir", str(_resolve(REPO, ev["data_dir"])), "--limit", str(limit),
                                                "--output", str(part), *extra])
            parts[task] = json.loads(part.read_text())["runs"][0]
        started = time.time()
        result = {"settings": settings, "benchmarks": [b for part in parts.values() for b in part["benchmarks"]],
                  "generations": parts["arc_challenge"]["generations"] if parts else [], "heldout": self.heldout_groups(model)}
        self.timings[f"heldout_{name}"] = time.time() - started
        atomic_write_text(out, json.dumps(result, indent=2))
        return result

    def heldout_groups(self, model_path: str) -> dict[str, Any]:
        """Held-out CE and group losses under each grouping of ``groupings`` (scope sequence): one forward
        pass per micro-batch, the same per-token losses summed under every grouping (train/heldout.py's sums)."""
        import torch

        from data.models import load_tokenizer
        from schemas.shard import tokenizer_fingerprint
        from evaluation.run import CE_CHUNK, load_model
        from train.forward import token_losses
        from train.grouping import step_important_masks
        from train.heldout import GROUP_SUM_NAMES, open_heldout, reduce_group_sums, summarize_group_sums
        from train.shards import ShardStream
        from train.step import Batch

        uri = str(self.shards("heldout"))
        sha = tokenizer_fingerprint(load_tokenizer(model_path))["sha256"]
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = load_model(model_path, device)
        groupings = {scorer: (float(rho), *open_heldout(uri, sha, scorer, float(rho), "sequence"))
                     for scorer, rho in self.cfg["groupings"].items()}
        packing = self.cfg["evaluate"]["micro_batch_tokens"]
        streams = [ShardStream(uri, manifest, scorer, rank=0, world_size=1, shuffle=False, epochs=1).micro_batches(packing)
                   for scorer, (_, manifest, _) in groupings.items()]
        sums = {scorer: torch.zeros(len(GROUP_SUM_NAMES), dtype=torch.float64) for scorer in groupings}
        with torch.no_grad():
            for batches in zip(*streams):  # the same rows in the same packing; only the score differs
                first = batches[0]
                assert all(torch.equal(b["input_ids"], first["input_ids"]) for b in batches)
                loss_hits = token_losses(model, first["input_ids"].to(device), first["position_ids"].to(device), list(first["seq_lens"]),
                                         first["loss_mask"].to(device), chunk_size=CE_CHUNK, with_hits=True).cpu()
                for (scorer, (rho, _, threshold)), batch in zip(groupings.items(), batches):
                    imp = step_important_masks([Batch.of(batch)], rho, "sequence", threshold)[0][batch["loss_mask"]]
                    sums[scorer] += reduce_group_sums(loss_hits, imp)
        return {scorer: {"rho": groupings[scorer][0], **summarize_group_sums(total)} for scorer, total in sums.items()}

    # -- the whole study --------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        from data.models import resolve_model

        base_model = resolve_model(self.cfg["model"])
        corpora = {name: self.slice_corpus(name) for name in ("train", "reference", "heldout")}
        self.annotate("train", corpora["train"], "train", "tfidf,base_loss")
        self.annotate("heldout", corpora["heldout"], "heldout", "tfidf,base_loss")
        self.annotate("reference", corpora["reference"], "reference", "tfidf")
        for variant, options in self.cfg["tfidf_variants"].items():
            if options:  # the default variant is the train directory itself
                self.annotate(f"train_tfidf_{variant}", corpora["train"], "train", "tfidf", options)
        reference = self.train("reference", self.shards("reference"), {**self.cfg["train"], **self.cfg["reference_train"]})
        for name in ("train", "heldout"):
            self.add_ref_loss(name, reference / "model")
        evaluations: dict[str, dict[str, Any]] = self.reusable(base_model) if self.cfg.get("reuse", True) else {}
        if "base" not in evaluations:
            evaluations["base"] = self.evaluate("base", base_model)
        self.write(evaluations)
        for name, overrides in self.cfg["runs"].items():
            if name in evaluations:
                continue
            run = self.train(name, self.shards("train"), {**self.cfg["train"], **overrides})
            evaluations[name] = self.evaluate(name, str(run / "model"))
            shutil.rmtree(run / "checkpoints", ignore_errors=True)  # ~1.6 GB a run; the exported model stays
            self.write(evaluations)
        return self.write(evaluations, final=True)

    def reusable(self, base_model: str) -> dict[str, dict[str, Any]]:
        """The recorded runs (and base) of the previous study.json that need no recomputation, as
        ``{"reused": entry}`` evaluations; empty unless the config is unchanged and the base model's
        held-out groups, recomputed now, equal the recorded ones."""
        prev = self.previous
        if not prev or "base" not in prev.get("runs", {}):
            return {}
        changed = [k for k in RESULT_KEYS if prev["config"].get(k) != self.cfg.get(k)]
        if changed:
            print(f"[study] not reusing {self.results / 'study.json'}: config keys {changed} changed", flush=True)
            return {}
        names = [n for n in prev["runs"] if n == "base" or prev["config"]["runs"].get(n) == self.cfg["runs"].get(n)]
        if all((self.work / "eval" / f"{n}.json").exists() for n in names):
            return {}  # every recorded run is still evaluated in work: the ordinary cache serves them
        started = time.time()
        now = self.heldout_groups(base_model)
        self.timings["heldout_base_reuse_check"] = time.time() - started
        recorded = prev["runs"]["base"]["heldout"]
        if not same_heldout(recorded, now):
            print(f"[study] not reusing {self.results / 'study.json'}: the base model's held-out group losses differ "
                  f"(recorded {json.dumps(recorded)}, now {json.dumps(now)})", flush=True)
            return {}
        for key, seconds in prev.get("step_seconds", {}).items():
            if any(key.endswith(f"_{n}") or f"_{n}_" in key for n in names):
                self.timings.setdefault(key, seconds)
        print(f"[study] reusing {len(names) - 1} recorded runs of {self.results / 'study.json'} "
              f"({prev.get('generated_at')}): {', '.join(n for n in names if n != 'base')}; the base model's held-out "
              f"group losses recomputed now equal the recorded ones", flush=True)
        return {n: {"reused": prev["runs"][n], "reused_from": prev.get("generated_at")} for n in names}

    # -- 5. results ----------------------------------------------------------------------------------------

    def write(self, evaluations: dict[str, dict[str, Any]], final: bool = False) -> dict[str, Any]:
        results = collect(self, evaluations)
        results["complete"] = final
        atomic_write_text(self.results / "study.json", json.dumps(results, indent=2) + "\n")
        write_report(self, results)
        print(f"[study] wrote {self.results / 'study.json'} and report.md ({len(evaluations) - 1} of {len(self.cfg['runs'])} runs)",
              flush=True)
        return results


def _cli(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if value == "":
        return "''"
    return str(value)


# ---------------------------------------------------------------------------------------------
# Collecting the numbers
# ---------------------------------------------------------------------------------------------


def read_curves(run: Path) -> list[dict[str, Any]]:
    """The training records of metrics.jsonl, the last line per step winning (a resumed run relogs)."""
    path = run / "metrics.jsonl"
    records: dict[int, dict[str, Any]] = {}
    if not path.exists():
        return []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line of a killed run
        if "loss" in record:
            records[record["step"]] = {k: record[k] for k in ("step", "loss", "ce", "important_loss", "unimportant_loss",
                                                              "important_fraction", "lambda", "tokens_per_s", "epoch") if k in record}
    return [records[s] for s in sorted(records)]


def tfidf_top_tokens(study: Study) -> dict[str, Any]:
    """For each TF-IDF variant: the tokens most often marked important at groupings.tfidf (scope sequence)."""
    import glob

    import pyarrow.parquet as pq
    import torch

    from data.models import load_tokenizer
    from train.grouping import important_mask_sequence

    tokenizer = load_tokenizer(study.cfg["model"])
    rho = float(study.cfg["groupings"]["tfidf"])
    out = {}
    for variant, options in study.cfg["tfidf_variants"].items():
        folder = study.shards("train" if not options else f"train_tfidf_{variant}")
        files = sorted(glob.glob(str(folder / "shard-*.parquet")))
        if not files:
            continue
        counts: dict[int, int] = {}
        trainable = important_total = 0
        for file in files:
            table = pq.read_table(file, columns=["input_ids", "loss_mask", "score_tfidf"])
            for ids, mask, score in zip(*(table.column(c).to_pylist() for c in ("input_ids", "loss_mask", "score_tfidf"))):
                loss_mask = torch.tensor(mask)
                important = important_mask_sequence(torch.tensor(score), loss_mask, rho)
                trainable += int(loss_mask.sum())
                for token in torch.tensor(ids)[important].tolist():
                    counts[token] = counts.get(token, 0) + 1
                    important_total += 1
        top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_TOKENS]
        rows = [{"token_id": t, "text": tokenizer.decode([t]), "count": c} for t, c in top]
        out[variant] = {"options": options, "rho": rho, "important_tokens": important_total, "trainable_tokens": trainable,
                        "top": rows, "top_share_function_or_punct": _function_share(rows)}
    return out


# A small closed class list: articles, pronouns, auxiliaries, prepositions, conjunctions.
FUNCTION_WORDS = set("""a an the i you he she it we they me him her us them my your his its our their this that these those
is are was were be been being am do does did have has had will would can could shall should may might must
of in on at to for from by with about as into like through after over between out against during without before under
around among and or but nor so yet if then than because while although though not no""".split())


def _function_share(rows: list[dict[str, Any]]) -> float:
    """Share of the listed occurrences that are punctuation, whitespace, digits or function words."""
    total = sum(r["count"] for r in rows) or 1
    dull = sum(r["count"] for r in rows if not any(ch.isalpha() for ch in r["text"]) or r["text"].strip().lower() in FUNCTION_WORDS)
    return dull / total


def _bench(ev: dict[str, Any], task: str) -> dict[str, Any] | None:
    for record in ev.get("benchmarks", []):
        if record["task"] == task:
            return {"acc": record["acc"], "acc_stderr": record["acc_stderr"], "n": record["n"]}
    return None


def collect(study: Study, evaluations: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Every number of the study in one JSON object, with the comparisons the report states."""
    cfg = study.cfg
    runs: dict[str, Any] = {}
    for name, ev in evaluations.items():
        if "reused" in ev:  # recorded by an earlier invocation; its run folder may be gone
            runs[name] = {**ev["reused"], "reused_from": ev["reused"].get("reused_from", ev["reused_from"])}
            continue
        entry: dict[str, Any] = {"overrides": cfg["runs"].get(name, {}), "benchmarks": {}, "heldout": {},
                                 "generations": ev.get("generations", [])}
        for task in ("mmlu", "arc_challenge"):
            entry["benchmarks"][task] = _bench(ev, task)
        for scorer, h in ev.get("heldout", {}).items():
            entry["heldout"][scorer] = {"rho": h["rho"], "ce": h["ce"], "important_loss": h["important_loss"],
                                        "unimportant_loss": h["unimportant_loss"], "worse_group": h["worse_group"],
                                        "worst_group_loss": max(h["important_loss"], h["unimportant_loss"]),
                                        "tokens": h["tokens"], "important_tokens": h.get("important_tokens")}
        if name != "base":
            run = study.run_dir(name)
            entry["curves"] = read_curves(run)
            summary = run / "train_summary.json"
            entry["train_summary"] = json.loads(summary.read_text()) if summary.exists() else None
        runs[name] = entry

    comparisons = {scorer: paired_vs_sft(runs, scorer) for scorer in cfg["groupings"]}
    training = training_vs_sft(runs)
    bench_deltas: dict[str, Any] = {}
    for task in ("mmlu", "arc_challenge"):
        base = runs.get("base", {}).get("benchmarks", {}).get(task)
        if not base:
            continue
        bench_deltas[task] = {}
        for name, entry in runs.items():
            b = entry["benchmarks"].get(task)
            if name == "base" or not b:
                continue
            stderr = math.sqrt((b["acc_stderr"] or 0) ** 2 + (base["acc_stderr"] or 0) ** 2)
            bench_deltas[task][name] = {"acc": b["acc"], "delta_vs_base": b["acc"] - base["acc"], "stderr_of_delta": stderr}
    tokens = {}
    for name in ("train", "heldout", "reference"):
        manifest = study._manifest(study.shards(name))
        if manifest:
            tokens[name] = manifest.get("totals", {})
    return {"schema": SCHEMA, "config": {k: v for k, v in cfg.items()}, "config_file": str(study.config_path),
            "data_totals": tokens, "reference_model": "SmolLM2-135M-Instruct SFT-trained (sft, reference_train keys) on data.reference",
            "runs": runs, "worst_group_vs_sft": comparisons, "training_vs_sft": training, "benchmark_deltas": bench_deltas,
            "tfidf_top_tokens": tfidf_top_tokens(study), "step_seconds": study.timings,
            "generated_at": time.strftime("%Y-%m-%d %H:%M:%S")}


def t_interval(diffs: list[float]) -> dict[str, Any]:
    """Mean of paired differences and its 95% t-interval (None with fewer than two seeds)."""
    n = len(diffs)
    mean = statistics.fmean(diffs)
    if n < 2:
        return {"n": n, "mean": mean, "sd": None, "low": None, "high": None}
    from scipy.stats import t

    sd = statistics.stdev(diffs)
    half = float(t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "low": mean - half, "high": mean + half}


HELDOUT_METRICS = ("worst_group_loss", "important_loss", "unimportant_loss", "ce")


def paired_vs_sft(runs: dict[str, Any], scorer: str) -> dict[str, Any]:
    """Each method against sft under one held-out grouping: per metric, the mean over seeds of
    (method_sS - sft_sS) with its 95% t-interval (runs are named METHOD_sSEED; a seed counts when
    both have it), and sft's own seed-to-seed sd of the worst-group loss (the noise a one-seed method
    can only be compared with)."""
    return _paired(runs, lambda name: runs.get(name, {}).get("heldout", {}).get(scorer))


def last_epoch_losses(curves: list[dict[str, Any]]) -> dict[str, float] | None:
    """A run's training losses over its last epoch: the mean over that epoch's steps of each step's CE and group losses
    as the trainer logged them (each step's own batch, before its update), and the worst group's: the larger of the
    two groups' means. None without group losses."""
    if not curves:
        return None
    last = max(c.get("epoch", 0) for c in curves)
    steps = [c for c in curves if c.get("epoch", 0) == last and c.get("important_loss") is not None
             and c.get("unimportant_loss") is not None]
    if not steps:
        return None
    mean = {key: statistics.fmean(c[key] for c in steps) for key in ("ce", "important_loss", "unimportant_loss")}
    return {**mean, "worst_group_loss": max(mean["important_loss"], mean["unimportant_loss"]), "steps": len(steps)}


def training_vs_sft(runs: dict[str, Any]) -> dict[str, Any]:
    """Each method against sft on the training data (:func:`last_epoch_losses`), paired by seed as :func:`paired_vs_sft`
    does, for the sftgo runs whose training groups are sft's (the same importance.scorer and rho: a run logs the groups
    of its own grouping; other losses are left out, as rho1 logs its own selection as the groups). Proposition 1 is
    about this: the objectives' minimisers on the data they train on."""
    grouping = next((tuple(r["overrides"].get(k) for k in ("importance.scorer", "importance.rho"))
                     for name, r in sorted(runs.items()) if name.startswith("sft_s") and r.get("overrides")), None)

    def value(name: str) -> dict[str, Any] | None:
        run = runs.get(name, {})
        overrides = run.get("overrides", {})
        if overrides.get("loss.name") not in ("sft", "sftgo") or tuple(overrides.get(k) for k in ("importance.scorer", "importance.rho")) != grouping:
            return None
        return last_epoch_losses(run.get("curves") or [])

    return {"grouping": {"scorer": grouping[0], "rho": grouping[1]} if grouping else None, **_paired(runs, value)}


def _paired(runs: dict[str, Any], held: Callable[[str], dict[str, Any] | None]) -> dict[str, Any]:
    """The pairing of :func:`paired_vs_sft` over ``held(run name)``: a dict of HELDOUT_METRICS, or None (no value)."""
    by_method: dict[str, dict[int, str]] = {}
    for name in runs:
        if name != "base" and "_s" in name:
            method, seed = name.rsplit("_s", 1)
            by_method.setdefault(method, {})[int(seed)] = name
    sft = {seed: held(name) for seed, name in by_method.get("sft", {}).items() if held(name)}
    sft_worst = [h["worst_group_loss"] for h in sft.values()]
    out: dict[str, Any] = {"sft_seeds": sorted(sft), "sft_worst_group_sd": statistics.stdev(sft_worst) if len(sft_worst) > 1 else None,
                           "methods": {}}
    for method, seeds in by_method.items():
        paired = [seed for seed, name in sorted(seeds.items()) if method != "sft" and held(name) and seed in sft]
        if not paired:
            continue
        row: dict[str, Any] = {"seeds": paired}
        for metric in HELDOUT_METRICS:
            row[metric] = t_interval([held(seeds[seed])[metric] - sft[seed][metric] for seed in paired])
        out["methods"][method] = row
    return out


def _beyond(x: dict[str, Any]) -> str:
    """'lower' / 'higher' when the 95% interval excludes 0, 'within noise' when it holds 0, '-' with one seed."""
    if x["low"] is None:
        return "-"
    return "lower" if x["high"] < 0 else "higher" if x["low"] > 0 else "within noise"


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


def plot_curves(results: dict[str, Any], path: Path) -> bool:
    """Figure 2 style: overall, important and unimportant training loss per step, one panel per run."""
    runs = {n: r for n, r in results["runs"].items() if r.get("curves")}
    if not runs:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 4
    rows = math.ceil(len(runs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False, sharey=True)
    for ax, (name, run) in zip(axes.flat, runs.items()):
        steps = [c["step"] for c in run["curves"]]
        for key, label, color in (("ce", "all tokens", "tab:blue"), ("important_loss", "important", "tab:orange"),
                                  ("unimportant_loss", "unimportant", "tab:green")):
            ax.plot(steps, [c.get(key) for c in run["curves"]], label=label, color=color)
        scorer = run["overrides"].get("importance.scorer", "tfidf")
        ax.set_title(f"{name} ({scorer} groups)", fontsize=9)
        ax.set_xlabel("step")
        ax.xaxis.get_major_locator().set_params(integer=True)
    for ax in list(axes.flat)[len(runs):]:
        ax.axis("off")
    axes[0][0].set_ylabel("training loss (nats)")
    axes[0][0].legend(fontsize=8)
    save_figure(fig, path)
    return True


def save_figure(fig: Any, path: Path) -> None:
    """Lay out, write atomically (a temporary PNG, then rename) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)


def _f(value: Any, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def write_report(study: Study, results: dict[str, Any]) -> None:
    cfg = results["config"]
    runs = results["runs"]
    groupings = list(cfg["groupings"])
    lines = [f"# SFT-GO evidence study: `{study.config_path.name}`{' (smoke)' if cfg.get('smoke') else ''}", "",
             f"Generated {results['generated_at']} by `python bench/study.py --config {study.config_path.relative_to(REPO) if study.config_path.is_relative_to(REPO) else study.config_path}"
             f"{' --smoke' if cfg.get('smoke') else ''}`. "
             + ("All runs finished." if results.get("complete") else f"**In progress**: {len(runs) - 1} of {len(cfg['runs'])} runs evaluated."), ""]
    d = cfg["data"]
    lines += ["## Setup", "",
              f"- Model: `{cfg['model']}`. Train: {d['train']['input']} records [{d['train']['start']}, {d['train']['start'] + d['train']['count']}); "
              f"held-out: {d['heldout']['input']} records [{d['heldout']['start']}, {d['heldout']['start'] + d['heldout']['count']}); "
              f"max_length {d['max_length']}.",
              f"- Reference model for excess loss (Rho-1): {results['reference_model']}, records "
              f"[{d['reference']['start']}, {d['reference']['start'] + d['reference']['count']}) of {d['reference']['input']}, disjoint from the train slice.",
              f"- Shared train keys: `{json.dumps(cfg['train'])}`.",
              f"- Groupings (METHOD.md, LIMA, the paper's 3B values): {', '.join(f'{k} rho {v}' for k, v in cfg['groupings'].items())}; scope sequence.",
              f"- Data: {json.dumps(results['data_totals'])}", ""]
    lines += ["## Runs", "", "| run | loss and options | steps | held-out CE | " + " | ".join(
        f"{g}: important / unimportant (worst)" for g in groupings) + " | MMLU acc | ARC acc |",
              "|---|---|---:|---:|" + "---|" * len(groupings) + "---:|---:|"]
    for name, run in runs.items():
        h = run["heldout"]
        first = h.get(groupings[0], {})
        cells = []
        for g in groupings:
            x = h.get(g)
            cells.append("-" if not x else f"{_f(x['important_loss'])} / {_f(x['unimportant_loss'])} ({x['worse_group'][:5]})")
        bench = [run["benchmarks"].get(t) for t in ("mmlu", "arc_challenge")]
        opts = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in run["overrides"].items() if k != "seed") or "(base model)"
        steps = (run.get("train_summary") or {}).get("steps", "-")
        lines.append(f"| {name} | {opts} | {steps} | {_f(first.get('ce'))} | " + " | ".join(cells) + " | "
                     + " | ".join("-" if not b else f"{_f(b['acc'], 3)} ± {_f(b['acc_stderr'], 3)} (n={b['n']})" for b in bench) + " |")
    reused = {name: run["reused_from"] for name, run in runs.items() if run.get("reused_from")}
    if reused:
        lines += ["", "Recorded by an earlier invocation of the same study and reused (see the module docstring: the config was "
                  "unchanged and the base model's held-out group losses, recomputed on the re-annotated shards, were equal): "
                  + ", ".join(f"{n} ({when})" for n, when in reused.items()) + "."]
    lines += ["", "Held-out numbers: `train.heldout.heldout_losses` over the whole held-out directory (packed at "
              f"{cfg['evaluate']['micro_batch_tokens']} tokens, scope sequence), after training. Benchmarks: `evaluation.run` "
              f"(lm-eval) on MMLU val ({cfg['evaluate']['mmlu_limit']} per subject) and ARC-Challenge dev (first {cfg['evaluate']['arc_limit']}), 0-shot.", ""]
    lines += ["## Does SFT-GO lower the held-out worst-group loss (Proposition 1)?", ""]
    for g, comp in results["worst_group_vs_sft"].items():
        lines.append(f"Under the **{g}** grouping: method - sft, paired by seed (sft seeds {comp['sft_seeds']}; sft's own "
                     f"seed-to-seed sd of the worst-group loss {_f(comp['sft_worst_group_sd'])} nats). Mean [95% t-interval]; "
                     "one seed: the difference alone.")
        lines.append("")
        lines.append("| method | seeds | worst-group loss | vs 0 | important loss | unimportant loss | CE |")
        lines.append("|---|---|---|---|---|---|---|")
        for method, row in comp["methods"].items():
            cells = [_interval(row[m]) for m in HELDOUT_METRICS]
            lines.append(f"| {method} | {len(row['seeds'])} | {cells[0]} | {_beyond(row['worst_group_loss'])} | " + " | ".join(cells[1:]) + " |")
        lines.append("")
    train = results.get("training_vs_sft") or {}
    if train.get("methods"):
        g = train["grouping"]
        lines += ["## ... and on the training data?", "",
                  "Proposition 1 is about the objectives' minimisers on the data they train on. The same pairing, on each run's "
                  f"training losses over its last epoch (the mean over that epoch's steps of each step's group losses as logged: "
                  f"each step's batch before its update), for the runs grouped as sft's ({g['scorer']}, rho {g['rho']}; sft seeds "
                  f"{train['sft_seeds']}, its seed-to-seed sd of the worst group {_f(train['sft_worst_group_sd'])} nats):", "",
                  "| method | seeds | worst-group loss | vs 0 | important loss | unimportant loss | CE |", "|---|---|---|---|---|---|---|"]
        for method, row in train["methods"].items():
            cells = [_interval(row[m]) for m in HELDOUT_METRICS]
            lines.append(f"| {method} | {len(row['seeds'])} | {cells[0]} | {_beyond(row['worst_group_loss'])} | " + " | ".join(cells[1:]) + " |")
        lines.append("")
    lines += verdict_lines(results)
    lines += ["## Benchmarks against the base model", "", "| run | MMLU acc (delta ± stderr) | ARC acc (delta ± stderr) |", "|---|---|---|"]
    deltas = results["benchmark_deltas"]
    for name in runs:
        if name == "base":
            continue
        cells = []
        for task in ("mmlu", "arc_challenge"):
            x = deltas.get(task, {}).get(name)
            cells.append("-" if not x else f"{_f(x['acc'], 3)} ({x['delta_vs_base']:+.3f} ± {x['stderr_of_delta']:.3f})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "stderr of a delta: sqrt(se_run^2 + se_base^2) (unpaired, conservative; the same questions are asked of every model).", ""]
    if plot_curves(results, study.results / "curves.png"):
        lines += ["## Training curves (Figure 2 style)", "", "![curves](curves.png)", "",
                  "Each panel: mean training loss per optimizer step over all trainable tokens, the important and the unimportant "
                  "group of the run's own grouping (sft, rho1, infosft and dft runs are grouped by tfidf for the plot only).", ""]
    lines += ["## TF-IDF, looked at", ""]
    for variant, top in results["tfidf_top_tokens"].items():
        listing = ", ".join(f"`{r['text']!r}` {r['count']}" for r in top["top"])
        lines += [f"- **{variant}** ({json.dumps(top['options'])}): {top['important_tokens']:,} of {top['trainable_tokens']:,} trainable "
                  f"tokens important at rho {top['rho']}; of the 30 most frequent, {top['top_share_function_or_punct']:.0%} of occurrences are "
                  f"punctuation, digits, whitespace or function words: {listing}", ""]
    lines += ["## Generations (greedy)", ""]
    prompts = cfg["evaluate"]["prompts"]
    for i, prompt in enumerate(prompts):
        lines.append(f"**{prompt}**")
        lines.append("")
        for name, run in runs.items():
            gens = run.get("generations") or []
            if i < len(gens):
                answer = gens[i]["answer"].replace("\n", " ")
                lines.append(f"- {name}: {answer[:300]}")
        lines.append("")
    lines += ["## Time", "", "| step | seconds |", "|---|---:|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in results["step_seconds"].items()]
    lines.append(f"| total | {sum(results['step_seconds'].values()):.0f} |")
    atomic_write_text(study.results / "report.md", "\n".join(lines) + "\n")


def _interval(x: dict[str, Any]) -> str:
    return f"{x['mean']:+.4f}" + ("" if x["low"] is None else f" [{x['low']:+.4f}, {x['high']:+.4f}]")


def _seeds(row: dict[str, Any]) -> str:
    return f"{len(row['seeds'])} paired seed{'s' if len(row['seeds']) != 1 else ''}"


def verdict_lines(results: dict[str, Any]) -> list[str]:
    """What held and what did not, in words, from the paired comparisons: each SFT-GO run under its own grouping."""
    out = ["### What held", ""]
    for g, comp in results["worst_group_vs_sft"].items():
        for method, row in comp["methods"].items():
            own = method.startswith("sftgo") and (("tfidf" in method and g == "tfidf") or ("excess" in method and g == "excess_loss"))
            if not own:
                continue
            x = row["worst_group_loss"]
            beyond = _beyond(x)
            words = {"lower": "lower than SFT's, beyond seed noise (the 95% interval excludes 0)",
                     "higher": "HIGHER than SFT's, beyond seed noise (the 95% interval excludes 0)",
                     "within noise": "not different from SFT's beyond seed noise (the 95% interval holds 0)",
                     "-": f"one seed only: {x['mean']:+.4f} nats, against sft's seed-to-seed sd {_f(comp['sft_worst_group_sd'])}"}[beyond]
            out.append(f"- {method} under its own grouping ({g}), {_seeds(row)}: held-out worst-group loss "
                       f"{_interval(x)} nats vs SFT: {words}.")
    train = results.get("training_vs_sft") or {}
    for method, row in train.get("methods", {}).items():
        if method.startswith("sftgo"):
            x = row["worst_group_loss"]
            words = {"lower": "lower than SFT's, beyond seed noise", "higher": "HIGHER than SFT's, beyond seed noise",
                     "within noise": "not different from SFT's beyond seed noise", "-": "one seed only"}[_beyond(x)]
            out.append(f"- {method} on its training data (last epoch), {_seeds(row)}: worst-group loss "
                       f"{_interval(x)} nats vs SFT: {words}.")
    if len(out) == 2:
        out.append("- (no SFT-GO run evaluated yet)")
    out.append("")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="a study YAML of bench/study/ (lima_seeds.yaml, known_truth.yaml, demo.yaml)")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                    help="set a key of the config (data.train.count=64, train.optim.lr=1.0e-4, evaluate.limit=50): its YAML value")
    ap.add_argument("--smoke", action="store_true", help="2 steps a run, tiny slices and evaluation (the test suite's run)")
    ap.add_argument("--model", default=None, help="override the config's model (a folder or an embedded name)")
    ap.add_argument("--results", default=None, help="override the config's results folder")
    ap.add_argument("--work", default=None, help="override the config's work folder (shards, runs, models)")
    ap.add_argument("--no-reuse", action="store_true", help="recompute runs already recorded in the results' study.json")
    args = ap.parse_args(argv)
    config_path = Path(args.config).resolve()
    try:
        kind = read_config(config_path).get("kind", "")  # no kind: the LIMA evidence study
        if kind in ("known_truth", "demo"):  # issue 33's study, and make demo: a module each
            sys.modules.setdefault("bench.study", sys.modules[__name__])  # one StudyError class, caught below
            if kind == "known_truth":
                from bench.known_truth_study import run_study
            else:
                from bench.demo_study import run_study
            run_study(config_path, args.smoke, args.model, args.results, args.work, args.overrides)
            return 0
        cfg = load_study(config_path, args.smoke, args.model, args.results, args.work, args.overrides)
        cfg["reuse"] = not args.no_reuse
        Study(cfg, config_path).run()
    except StudyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
