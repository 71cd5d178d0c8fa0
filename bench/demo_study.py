"""The demo (``make demo``) as a study: bench/study.py hands a config with ``kind: demo`` (bench/study/demo.yaml)
to :func:`run_study`.

    python bench/study.py --config bench/study/demo.yaml                      # what make demo runs
    python bench/study.py --config bench/study/demo.yaml data.train.limit=256 evaluate.limit=50

Steps, in order, each the project's own command, its output shown as it runs (the demo is watched; no log files,
so the demo writes exactly its outputs below ``work``):

1. annotate ``data.train`` and ``data.heldout`` (``--limit`` records of each input) with ``scorers``, plus
   llmlingua2 when ``llmlingua2_model`` names a model folder;
2. train the ``reference`` run: train/main.py with ``train_config``, the study's model and directories and the
   run's own keys, into the run's name (``runs/demo_sft``);
3. ``annotate/run.py --add-scorers ref_loss`` on both directories with the reference run's model, so Rho-1's
   ``excess_loss = base_loss - ref_loss`` is defined; skipped for a directory whose manifest lists ref_loss
   (--add-scorers refuses a column twice; an interrupted one has no manifest yet, and the same command finishes it);
4. train the other runs the same way;
5. ``evaluation.run`` over the base model and every run into ``evaluate.output`` (and each run's evaluation.json);
6. ``evaluation.report`` over every run, the base model as the baseline, into ``report``.

Rerunning redoes nothing, and after Ctrl-C at any step resumes it, because each command is always called and
decides itself: annotate keeps finished shards (and recognises its directory after --add-scorers extended it),
train/main.py stops at once on a finished run of the same config and data (and resumes an interrupted one from its
checkpoint), evaluation.run reuses an evaluation of the same weights, tasks, limits, held-out set and prompts. A
check here (a folder exists) would not see a changed ``limit`` or ``max_length``; the commands do.
"""

from __future__ import annotations

import posixpath
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.study import REPO, StudyError, _cli, read_config, step_env
from schemas.shard import MANIFEST_NAME, Manifest

REQUIRED = ("kind", "model", "work", "shared", "max_length", "scorers", "llmlingua2_model", "data", "train_config", "runs",
            "reference", "evaluate", "report")
EVALUATE = ("tasks", "data_dir", "limit", "scorer", "rho", "micro_batch_tokens", "output")
# --smoke (the test suite's run): 4 records a directory, 2 steps a run, 1 question per MMLU subject and for ARC.
SMOKE_TRAIN = {"train.max_steps": 2, "checkpoint.every": 1, "eval.every": 1}


def load_config(path: Path, smoke: bool, model: str | None, results: str | None, work: str | None,
                overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """The demo config (``overrides`` applied: bench/study.py's :func:`read_config`), checked."""
    cfg = read_config(path, overrides)
    missing = [k for k in REQUIRED if k not in cfg]
    unknown = sorted(set(cfg) - set(REQUIRED))
    if missing or unknown:
        raise StudyError(f"--config {path}: missing keys {missing}, unknown keys {unknown}")
    for name in ("train", "heldout"):
        spec = cfg["data"].get(name)
        if not isinstance(spec, dict) or not {"input", "format", "limit", "output"} <= set(spec):
            raise StudyError(f"--config {path}: data.{name} needs input, format, limit and output")
    if cfg["reference"] not in cfg["runs"]:
        raise StudyError(f"--config {path}: reference {cfg['reference']!r} is not one of runs {list(cfg['runs'])}")
    if missing_ev := [k for k in EVALUATE if k not in cfg["evaluate"]]:
        raise StudyError(f"--config {path}: evaluate needs {missing_ev}")
    if results:
        raise StudyError("--results: the demo has no results folder; its outputs go under work (--work)")
    for key, value in (("model", model), ("work", work)):
        if value:
            cfg[key] = value
    if smoke:
        for name in ("train", "heldout"):
            cfg["data"][name]["limit"] = 4
        cfg["runs"] = {name: {**keys, **SMOKE_TRAIN} for name, keys in cfg["runs"].items()}
        cfg["evaluate"]["limit"] = 1
    return cfg


class DemoStudy:
    """The demo's steps (the module docstring), each a command run in the repository root."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.env = step_env()

    def at(self, path: str) -> str:
        """``path`` under ``work``, as the commands are given it: relative to the repository root while work is
        ``.`` (``shards/demo``, what make demo always passed, so a run's recorded config and paths stay the same)."""
        return str(Path(self.cfg["work"]) / path)

    def shared(self, path: str) -> str:
        """``path`` inside the shared folder (an absolute ``path`` stays itself)."""
        return posixpath.join(self.cfg["shared"], path)

    def sh(self, name: str, cmd: list[str]) -> None:
        """Run one step's command with its output on the terminal; raise on failure.

        Ctrl-C reaches the command too (one process group): the runner waits while it stops cleanly and prints
        where the same command resumes, then exits with its status (130) instead of killing it mid-save, as
        ``subprocess.run`` would. SIGTERM to the runner is passed on to the command the same way (143)."""
        print(f"[study] {name}: {' '.join(cmd)}", flush=True)
        started = time.time()
        proc = subprocess.Popen(cmd, cwd=REPO, env=self.env)
        previous = signal.signal(signal.SIGTERM, lambda *_: proc.terminate())
        try:
            while True:
                try:
                    code = proc.wait()
                    break
                except KeyboardInterrupt:
                    continue  # the command got the same SIGINT; wait for it
        finally:
            signal.signal(signal.SIGTERM, previous)
        if code in (130, 143, -signal.SIGINT, -signal.SIGTERM):
            print(f"[study] {name} interrupted; the same command resumes the demo there", file=sys.stderr, flush=True)
            raise SystemExit(143 if code in (143, -signal.SIGTERM) else 130)
        if code != 0:
            raise StudyError(f"step {name} failed (exit {code}); its output is above")
        print(f"[study] {name}: {time.time() - started:.0f} s", flush=True)

    def annotate(self, name: str) -> None:
        spec = self.cfg["data"][name]
        scorers = list(self.cfg["scorers"])
        options = []
        if self.cfg["llmlingua2_model"]:
            scorers.append("llmlingua2")
            options = ["--scorer-option", f"llmlingua2.model={self.cfg['llmlingua2_model']}"]
        shard_size = ["--shard-size", str(spec["shard_size"])] if "shard_size" in spec else []
        self.sh(f"annotate_{name}", [sys.executable, "annotate/run.py", "--input", self.shared(spec["input"]), "--format", spec["format"],
                                     "--model", self.cfg["model"], "--limit", str(spec["limit"]), *shard_size,
                                     "--max-length", str(self.cfg["max_length"]), "--scorers", ",".join(scorers), *options,
                                     "--output", self.at(spec["output"])])

    def train(self, run: str) -> None:
        keys = {"model": self.cfg["model"], "data.train": self.at(self.cfg["data"]["train"]["output"]),
                "data.validation": self.at(self.cfg["data"]["heldout"]["output"]), **self.cfg["runs"][run], "output_dir": self.at(run)}
        self.sh(f"train_{Path(run).name}", [sys.executable, "train/main.py", "--config", self.cfg["train_config"],
                                            *[f"{k}={_cli(v)}" for k, v in keys.items()]])

    def add_ref_loss(self, name: str) -> None:
        folder = self.at(self.cfg["data"][name]["output"])
        if (Path(REPO, folder) / MANIFEST_NAME).exists() and "ref_loss" in Manifest.load(Path(REPO, folder)).scorer_names:
            return
        self.sh(f"ref_loss_{name}", [sys.executable, "annotate/run.py", "--output", folder, "--add-scorers", "ref_loss",
                                     "--scorer-option", f"ref_loss.model={self.at(self.cfg['reference'])}/model"])

    def evaluate(self) -> None:
        ev = self.cfg["evaluate"]
        self.sh("evaluate", [sys.executable, "-m", "evaluation.run", self.cfg["model"], *map(self.at, self.cfg["runs"]),
                             "--tasks", ev["tasks"], "--data-dir", self.shared(ev["data_dir"]), "--limit", str(ev["limit"]),
                             "--heldout", self.at(self.cfg["data"]["heldout"]["output"]), "--scorer", ev["scorer"],
                             "--rho", str(ev["rho"]), "--micro-batch-tokens", str(ev["micro_batch_tokens"]),
                             "--output", self.at(ev["output"])])

    def report(self) -> None:
        self.sh("report", [sys.executable, "-m", "evaluation.report", *map(self.at, self.cfg["runs"]),
                           "--baseline", self.at(self.cfg["evaluate"]["output"]), "--output", self.at(self.cfg["report"])])

    def run(self) -> None:
        started = time.time()
        for name in ("train", "heldout"):
            self.annotate(name)
        self.train(self.cfg["reference"])
        for name in ("train", "heldout"):
            self.add_ref_loss(name)
        for run in self.cfg["runs"]:
            if run != self.cfg["reference"]:
                self.train(run)
        self.evaluate()
        self.report()
        outputs = [self.at(self.cfg["data"][n]["output"]) for n in ("train", "heldout")] + [self.at(r) for r in self.cfg["runs"]]
        outputs += [self.at(self.cfg["evaluate"]["output"]), str(Path(self.at(self.cfg["report"])) / "report.html")]
        print(f"[study] demo done in {time.time() - started:.0f} s: {', '.join(outputs)}", flush=True)


def run_study(config_path: Path, smoke: bool, model: str | None, results: str | None, work: str | None,
              overrides: list[str] | tuple[str, ...] = ()) -> None:
    """Load, check and run the demo (bench/study.py's entry point for ``kind: demo``)."""
    DemoStudy(load_config(config_path, smoke, model, results, work, overrides)).run()
