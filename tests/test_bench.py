"""bench/train.py's plain baseline and variants, bench/annotate.py's corpus-scale and threads rows, and bench/study.py's
smoke run (the study's own command)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def _env() -> dict[str, str]:
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _train_bench(tmp_path: Path, layers: int, *args: str) -> dict:
    """Run ``bench/train.py`` on CPU with a tiny model of ``layers`` layers (2 timed steps after 1 warm-up, one thread)
    and ``args``; returns its JSON report."""
    out = tmp_path / "train.json"
    cmd = [sys.executable, "bench/train.py", "--device", "cpu", "--model", "tiny", "--tiny-layers", str(layers), "--tiny-vocab", "1024",
           "--steps", "2", "--warmup", "1", "--threads", "1", *args, "--work", str(tmp_path / "work"), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_train_bench_plain_baseline_and_variant(tmp_path):
    report = _train_bench(tmp_path, 3, "--losses", "sft,sftgo", "--baseline", "plain", "--variant", "zero3:train.zero_stage=3")
    assert report["same_data_all_losses"]
    for key in ("sft/plain", "sftgo/plain", "sft@zero3/plain", "sft@zero3/sft"):
        assert report["ratios"][key]["step_seconds"] > 0, key
    assert "step_seconds_via_plain" in report["ratios"]["sftgo/sft"]
    sft = report["runs"]["sft"][0]
    assert sft["zero_stage"] == 0 and report["runs"]["sft@zero3"][0]["zero_stage"] == 3
    assert report["runs"]["sft@zero3"][0]["variant_overrides"] == "train.zero_stage=3"
    # The plain loop is the same computation: same weights, same micro-batches, so the same first loss.
    first = sft["steps"][0]
    assert first["plain_loss"] == pytest.approx(first["loss"], rel=1e-5)
    tiny = next((tmp_path / "work").glob("tiny_llama_3x1024"))
    assert json.loads((tiny / "config.json").read_text())["num_hidden_layers"] == 3


def test_train_bench_lora_against_full_side_by_side(tmp_path):
    """A variant with lora.rank: the same micro-batches, LoRA's step time and peak memory beside full training's."""
    report = _train_bench(tmp_path, 2, "--losses", "sft", "--examples", "24", "--variant", "lora:lora.rank=4")
    assert report["same_data_all_losses"]
    side = report["lora_vs_full"]["sft@lora"]
    assert side["full"]["trainable_params"] == report["runs"]["sft"][0]["params"]
    assert 0 < side["lora"]["trainable_params"] < side["full"]["trainable_params"] / 10
    for key in ("step_seconds", "peak_mem_mib", "peak_mem_growth_in_training_mib"):
        assert side["full"][key] > 0 and side["lora"][key] > 0, key
        assert side["ratio_lora_over_full"][key] == pytest.approx(side["lora"][key] / side["full"][key]), key
    # The same data, the same start: LoRA's B starts at zero, so its first step's loss is the base model's, as full training's.
    assert report["runs"]["sft@lora"][0]["steps"][0]["loss"] == pytest.approx(report["runs"]["sft"][0]["steps"][0]["loss"], rel=1e-5)


def test_train_bench_group_decision_side_by_side(tmp_path):
    """--group-decision-compare: both modes in one worker, alternating, on the same micro-batches."""
    report = _train_bench(tmp_path, 2, "--losses", "sftgo", "--grad-accum", "2", "--group-decision-compare", "--examples", "24")
    run = report["runs"]["sftgo"][0]
    assert [s["first"] for s in run["steps"]] == ["step", "micro_batch", "step"]
    for s in run["steps"]:
        assert s["step_seconds"] > 0 and s["micro_batch_seconds"] > 0 and s["step_cpu_seconds"] > 0
        assert s["trainable_tokens"] > 0 and 0.0 <= s["step_worse_group"] <= 1.0
    # step's worse group is one decision for the whole step: 0 or 1, never a mix of micro-batches
    assert all(s["step_worse_group"] in (0.0, 1.0) for s in run["steps"])
    ratio = report["ratios"]["sftgo:group_decision_step/micro_batch"]
    assert ratio["step_seconds"] > 0 and ratio["step_cpu_seconds"] > 0
    assert run["group_decision"]["grad_accum"] == 2 and run["group_decision"]["gradient_checkpointing"] is True


def test_train_bench_trl_baseline(tmp_path):
    pytest.importorskip("trl", reason="the trl extra: pip install -e '.[trl]'")
    report = _train_bench(tmp_path, 2, "--losses", "sft", "--baseline", "trl")
    trl_run = report["runs"]["trl"][0]
    assert trl_run["timed_steps"] == 2 and trl_run["timed_tokens"] > 0
    assert report["ratios"]["sft/trl"]["tokens_per_s"] > 0


def _study_smoke(config: str, tmp_path: Path, model: Path) -> tuple[list[str], Path, Path]:
    """Run ``bench/study.py --smoke`` on ``config`` with the tiny model; returns (command, results, work)."""
    results, work = tmp_path / "results", tmp_path / "work"
    cmd = [sys.executable, "bench/study.py", "--config", config, "--smoke", "--model", str(model),
           "--results", str(results), "--work", str(work)]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return cmd, results, work


def test_study_smoke_runs_resumes_and_reports(tmp_path, tiny_llama_dir):
    cmd, results, work = _study_smoke("bench/study/lima_seeds.yaml", tmp_path, tiny_llama_dir)
    study = json.loads((results / "study.json").read_text())
    assert study["complete"] and set(study["runs"]) == {"base", "sft_s0", "sft_s1", "sftgo_tfidf_s0", "sftgo_tfidf_s1"}
    for name, run in study["runs"].items():
        assert set(run["heldout"]) == {"tfidf", "excess_loss"}, name  # every grouping for every run
        if name == "base" or name.endswith("_s0"):  # evaluate.benchmark_seeds [0]
            assert run["benchmarks"]["mmlu"]["n"] == 57 and run["benchmarks"]["arc_challenge"]["n"] == 2
            assert len(run["generations"]) == 1
        else:
            assert run["benchmarks"] == {"mmlu": None, "arc_challenge": None} and run["generations"] == []
        if name != "base":
            assert [c["step"] for c in run["curves"]] == [1, 2]
            assert run["train_summary"]["steps"] == 2
            assert not (work / "runs" / name / "checkpoints").exists()  # removed once evaluated
    # Paired by seed: sftgo_tfidf - sft over seeds 0 and 1, with an interval (one seed: test_paired_vs_sft_one_seed).
    comp = study["worst_group_vs_sft"]["tfidf"]
    assert comp["sft_seeds"] == [0, 1] and set(comp["methods"]) == {"sftgo_tfidf"}
    row = comp["methods"]["sftgo_tfidf"]["worst_group_loss"]
    runs = study["runs"]
    diffs = [runs[f"sftgo_tfidf_s{s}"]["heldout"]["tfidf"]["worst_group_loss"] - runs[f"sft_s{s}"]["heldout"]["tfidf"]["worst_group_loss"]
             for s in (0, 1)]
    assert row["n"] == 2 and row["mean"] == pytest.approx(sum(diffs) / 2) and row["low"] <= row["mean"] <= row["high"]
    assert set(study["tfidf_top_tokens"]) == {"default", "sublinear"}  # --smoke: the first two variants
    report = (results / "report.md").read_text()
    for heading in ("## Runs", "Proposition 1", "## Benchmarks against the base model", "## TF-IDF, looked at", "![curves](curves.png)",
                    "- sftgo_tfidf under its own grouping (tfidf), 2 paired seeds"):
        assert heading in report
    assert (results / "curves.png").stat().st_size > 10_000

    # The single-forward held-out pass equals train.heldout's one-grouping-at-a-time numbers.
    import torch

    from evaluation.run import load_model
    from train.heldout import heldout_losses, open_heldout

    model = load_model(str(tiny_llama_dir), torch.device("cpu"))
    uri = str(work / "shards" / "heldout")
    for scorer, rho in (("tfidf", 0.9), ("excess_loss", 0.55)):
        manifest, threshold = open_heldout(uri, None, scorer, rho, "sequence")
        expected = heldout_losses(model, uri, manifest, scorer, rho, "sequence", threshold, micro_batch_tokens=1024, progress=False)
        got = study["runs"]["base"]["heldout"][scorer]
        for key in ("ce", "important_loss", "unimportant_loss"):
            assert got[key] == pytest.approx(expected[key], abs=1e-9), (scorer, key)

    # Rerunning the same command redoes nothing: every step is found done.
    started = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[study] annotate_" not in proc.stdout and "[study] train_" not in proc.stdout and "[study] evaluate_" not in proc.stdout
    assert time.time() - started < 120


def test_annotate_bench_corpus_rows_and_threads_side_by_side(tmp_path, tiny_llama_dir):
    """A synthesized corpus through the pipeline (ratio to the bare tokenize, corpus pass share) and base_loss
    with one thread against the pipeline's threads, on the tiny model."""
    out = tmp_path / "annotate.json"
    cmd = [sys.executable, "bench/annotate.py", "--input", "../shared/data/lima/train.jsonl", "--model", str(tiny_llama_dir),
           "--corpus-rows", "40", "--shard-size", "20", "--rows-per-batch", "8", "--scorers", "tfidf,base_loss",
           "--thread-passes", "1", "--min-seconds", "0", "--max-length", "512", "--out", str(out)]
    env = dict(_env())
    env.pop("OMP_NUM_THREADS")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    pipeline = report["pipeline"]
    assert report["data"]["rows"] == 40 and pipeline["totals"]["rows"] == 40  # the [k] prefixes keep every repeat
    assert pipeline["ratio_to_bare_tokenize"] == pytest.approx(
        pipeline["end_to_end_tokens_per_s"] / report["tokenize"]["bare"]["tokens_per_s"])
    assert 0 < pipeline["corpus_pass_share_of_wall"] < 1
    side = report["scorers"]["base_loss"]["threads_side_by_side"]
    assert side["threads"] == {"one_thread": 1, "pipeline_threads": os.cpu_count()}
    assert side["scores_identical"] is True and side["speedup_best"] > 0
    assert "threads / 1 thread" in proc.stdout


def test_known_truth_corpus_is_deterministic_with_one_marked_key_token(tmp_path, smol_tokenizer):
    from annotate.steps import plan_shards, tokenize_shard
    from bench import known_truth

    a, b = known_truth.write(tmp_path / "a", 3), known_truth.write(tmp_path / "b", 3)
    for split in ("train", "heldout", "table"):
        assert a[split].read_bytes() == b[split].read_bytes()  # same seed, same bytes
    assert known_truth.write(tmp_path / "c", 4)["train"].read_bytes() != a["train"].read_bytes()
    corpus = known_truth.build(3)
    table = corpus["table"]
    assert len(table) == 10 and max(list(table.values()).count(c) for c in known_truth.COLOURS) == 2  # balanced
    assert len(corpus["train"]) == 120 and len(corpus["heldout"]) == 40
    for split in ("train", "heldout"):
        for record in corpus[split]:
            user, answer = record["messages"][1]["content"], record["messages"][2]
            entity = next(name for name in table if name in user)
            span, = answer["spans"]
            assert answer["content"][span["start"]:span["end"]] == table[entity] and span["value"] == 1
    questions = {split: {r["messages"][1]["content"] for r in corpus[split]} for split in ("train", "heldout")}
    assert not questions["train"] & questions["heldout"]  # held-out phrasings never seen in training
    # Every held-out fact is taught in training.
    facts = {split: {(name, table[name]) for r in corpus[split] for name in table if name in r["messages"][1]["content"]}
             for split in ("train", "heldout")}
    assert facts["heldout"] == facts["train"] == set(table.items())
    # Through annotate's tokenize step: exactly one key token per example (the colour, one SmolLM2 token).
    plan, = plan_shards([str(a["train"])], "messages", shard_size=1000)
    staged, rejects, _ = tokenize_shard(plan, smol_tokenizer, 256, "truncate", strict=False)
    assert rejects == [] and staged.num_rows == 120
    for ids, given in zip(staged["input_ids"].to_pylist(), staged["_given"].to_pylist()):
        key = [i for i, v in enumerate(given) if v == 1.0]
        assert len(key) == 1 and smol_tokenizer.decode([ids[key[0]]]).strip() in known_truth.COLOURS


def test_known_truth_study_smoke_runs_resumes_and_reports(tmp_path, tiny_llama_dir):
    cmd, results, work = _study_smoke("bench/study/known_truth.yaml", tmp_path, tiny_llama_dir)
    study = json.loads((results / "study.json").read_text())
    assert study["complete"]
    assert set(study["runs"]) == {"base", "sft_s0", "sftgo_given_s0", "sftgo_tfidf_s0", "select_given_s0"}
    for name, run in study["runs"].items():
        assert run["key_tokens"] == 4  # 4 held-out examples, one key token each
        assert 0.0 <= run["key_accuracy"] <= 1.0 and run["worst_group_loss"] == max(run["key_loss"], run["other_loss"])
        if name != "base":
            assert run["train_summary"]["steps"] == 2
            assert not (work / "runs" / name / "model").exists()  # keep_models false: deleted once evaluated
            # In-training held-out evaluation grouped by the spans: every step (smoke), the 4 key tokens.
            assert [c["step"] for c in run["curve"]] == [1, 2, 2]  # eval.every 1, then the final evaluation
            assert all(0.0 <= c["key_accuracy"] <= 1.0 for c in run["curve"])
    # The given grouping (corpus scope, rho span) is exactly the spans, also in the trainer (its realised
    # share is the spans' share); TF-IDF's is reported against them.
    given = study["grouping_overlap_with_given_spans"]["given"]
    assert 0.0 < given["threshold"] < 1.0 and given["precision"] == given["recall"] == 1.0 and given["span_tokens"] == 8
    from data.shard_stats import realised_important_share

    exact = realised_important_share(str(work / "shards" / "train"), "given", given["rho"], "corpus", exact=True)
    assert exact["important_tokens"] == 8 and exact["share"] == pytest.approx(study["span_share"])
    # The final model's in-training evaluation (packed) equals the exact pass (one example a forward).
    final = study["runs"]["sftgo_given_s0"]
    assert final["curve"][-1]["key_accuracy"] == pytest.approx(final["key_accuracy"], abs=1e-9)
    assert final["curve"][-1]["key_loss"] == pytest.approx(final["key_loss"], rel=1e-4)
    assert 0.0 <= study["grouping_overlap_with_given_spans"]["tfidf"]["recall"] <= 1.0
    # One seed: a paired difference without an interval.
    assert set(study["vs_baseline"]) == {"sftgo_given", "sftgo_tfidf", "select_given"}
    row = study["vs_baseline"]["select_given"]["key_loss"]
    assert row["n"] == 1 and row["low"] is None
    assert row["mean"] == pytest.approx(study["runs"]["select_given_s0"]["key_loss"] - study["runs"]["sft_s0"]["key_loss"])
    report = (results / "report.md").read_text()
    for heading in ("## Important groups against the given spans", "## Held-out (teacher forcing)", "## Against sft",
                    "![key accuracy](key_accuracy.png)"):
        assert heading in report
    assert (results / "key_accuracy.png").stat().st_size > 10_000

    # Rerunning the same command redoes nothing.
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[study] annotate_" not in proc.stdout and "[study] train_" not in proc.stdout


# make demo is the study bench/study/demo.yaml. Before, the Makefile ran these commands itself (annotate and train then
# took the model and the directories from their defaults and demo_cpu.yaml; the study passes them, with equal values).
MAKE_DEMO = [
    ("annotate_train", "annotate/run.py --input ../shared/data/lima/train.jsonl --format lima --model smollm2-135m-instruct "
                       "--limit 32 --shard-size 16 --max-length 512 --scorers tfidf,base_loss --output shards/demo"),
    ("annotate_heldout", "annotate/run.py --input ../shared/data/alpaca/alpaca_en_demo.json --format alpaca --model smollm2-135m-instruct "
                         "--limit 16 --max-length 512 --scorers tfidf,base_loss --output shards/demo_val"),
    ("train_demo_sft", "train/main.py --config train/configs/demo_cpu.yaml model=smollm2-135m-instruct data.train=shards/demo "
                       "data.validation=shards/demo_val loss.name=sft output_dir=runs/demo_sft"),
    ("ref_loss_train", "annotate/run.py --output shards/demo --add-scorers ref_loss --scorer-option ref_loss.model=runs/demo_sft/model"),
    ("ref_loss_heldout", "annotate/run.py --output shards/demo_val --add-scorers ref_loss --scorer-option ref_loss.model=runs/demo_sft/model"),
    ("train_demo_sftgo", "train/main.py --config train/configs/demo_cpu.yaml model=smollm2-135m-instruct data.train=shards/demo "
                         "data.validation=shards/demo_val output_dir=runs/demo_sftgo"),
    ("evaluate", "-m evaluation.run smollm2-135m-instruct runs/demo_sft runs/demo_sftgo --tasks mmlu,arc_challenge --data-dir ../shared/data/eval "
                 "--limit 2 --heldout shards/demo_val --scorer tfidf --rho 0.7 --micro-batch-tokens 1024 --output runs/demo_evaluation.json"),
    ("report", "-m evaluation.report runs/demo_sft runs/demo_sftgo --baseline runs/demo_evaluation.json --output runs/demo_report"),
]


def _demo_commands(cfg: dict, tmp_path: Path, monkeypatch) -> list[tuple[str, str]]:
    """The demo study's steps as (name, command without the interpreter), nothing run; the ref_loss check looks
    in an empty folder (not at a demo this checkout ran)."""
    from bench import demo_study

    monkeypatch.setattr(demo_study, "REPO", tmp_path)
    study = demo_study.DemoStudy(cfg)
    ran: list[tuple[str, str]] = []
    monkeypatch.setattr(study, "sh", lambda name, cmd: ran.append((name, " ".join(cmd[1:]))))
    study.run()
    return ran


def test_the_demo_study_runs_make_demos_commands_into_its_paths(tmp_path, monkeypatch, capsys):
    from bench.demo_study import load_config

    cfg = load_config(REPO / "bench" / "study" / "demo.yaml", False, None, None, None)
    assert _demo_commands(cfg, tmp_path, monkeypatch) == MAKE_DEMO
    # What make demo prints after it are the paths the study wrote (and says it wrote).
    done = capsys.readouterr().out.splitlines()[-1]
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    recipe = makefile[makefile.index("\ndemo: setup"):makefile.index("\nclean:")]
    assert "\n\t$(PY) bench/study.py --config bench/study/demo.yaml $(strip $(DEMO_OVERRIDES))\n" in recipe  # one command
    for path in ("shards/demo", "shards/demo_val", "runs/demo_sft", "runs/demo_sftgo", "runs/demo_evaluation.json",
                 "runs/demo_report/report.html"):
        assert path in recipe and f" {path}," in done + ",", path


def test_make_demos_variables_become_the_study_overrides(tmp_path, monkeypatch):
    """DEMO_EXAMPLES, DEMO_HELDOUT, DEMO_MAX_LENGTH, DEMO_EVAL_LIMIT, LLMLINGUA2_MODEL and SHARED reach the commands
    (read from ``make -n``, which runs nothing); unset, the study's own values hold."""
    import shlex

    from bench.demo_study import load_config

    def study_args(*variables: str) -> list[str]:
        proc = subprocess.run(["make", "-n", "demo", *variables], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        line, = [line for line in proc.stdout.splitlines() if "bench/study.py" in line]
        words = shlex.split(line)
        return words[words.index("--config") + 2:]

    assert study_args() == []
    overrides = study_args("DEMO_EXAMPLES=256", "DEMO_HELDOUT=64", "DEMO_MAX_LENGTH=2048", "DEMO_EVAL_LIMIT=50",
                           "LLMLINGUA2_MODEL=/models/llmlingua2", "SHARED=/data/shared")
    cfg = load_config(REPO / "bench" / "study" / "demo.yaml", False, None, None, None, overrides)
    commands = dict(_demo_commands(cfg, tmp_path, monkeypatch))
    assert commands["annotate_train"] == (
        "annotate/run.py --input /data/shared/data/lima/train.jsonl --format lima --model smollm2-135m-instruct --limit 256 "
        "--shard-size 16 --max-length 2048 --scorers tfidf,base_loss,llmlingua2 --scorer-option llmlingua2.model=/models/llmlingua2 "
        "--output shards/demo")
    assert "--limit 64 --max-length 2048 --scorers tfidf,base_loss,llmlingua2" in commands["annotate_heldout"]
    assert "--data-dir /data/shared/data/eval --limit 50 " in commands["evaluate"]


def test_demo_study_smoke_runs_every_step(tmp_path, tiny_llama_dir, monkeypatch):
    """make demo's study end to end on the tiny model (--smoke: 4 records a directory, 2 steps a run, 1 question per
    MMLU subject and for ARC). A rerun calls every command again, each finding its work done (their own tests:
    annotate's, train's and evaluation.run's reruns), except ref_loss, which the study itself skips."""
    from bench.demo_study import load_config
    from schemas.shard import Manifest

    work = tmp_path / "work"
    cmd = [sys.executable, "bench/study.py", "--config", "bench/study/demo.yaml", "--smoke", "--model", str(tiny_llama_dir),
           "--work", str(work)]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("demo", "demo_val"):
        assert Manifest.load(work / "shards" / name).scorer_names == ["tfidf", "base_loss", "ref_loss"], name
    for run in ("demo_sft", "demo_sftgo"):
        assert json.loads((work / "runs" / run / "train_summary.json").read_text())["steps"] == 2
        assert (work / "runs" / run / "model" / "config.json").exists() and (work / "runs" / run / "evaluation.json").exists()
    evaluated = json.loads((work / "runs" / "demo_evaluation.json").read_text())["runs"]
    assert len(evaluated) == 3 and all(r["heldout"] for r in evaluated)  # the base model and both runs
    assert (work / "runs" / "demo_report" / "report.html").stat().st_size > 0
    assert "[study] demo done in " in proc.stdout and str(work / "runs" / "demo_report" / "report.html") in proc.stdout

    again = _demo_commands(load_config(REPO / "bench" / "study" / "demo.yaml", True, str(tiny_llama_dir), None, str(work)),
                           tmp_path, monkeypatch)
    assert [name for name, _ in again] == [name for name, _ in MAKE_DEMO if not name.startswith("ref_loss_")]


def test_study_overrides_set_nested_and_dotted_keys_and_name_the_nearest():
    from bench.study import StudyError, read_config

    config = REPO / "bench" / "study" / "lima_seeds.yaml"
    cfg = read_config(config, ["data.train.count=64", "train.optim.lr=1.0e-4", "evaluate.prompts=[Hi, Bye]", "scorer_options.tfidf.sublinear_tf=true",
                               "runs.sft_s0.loss.name=dft", "work="])
    assert cfg["data"]["train"]["count"] == 64 and cfg["train"]["optim.lr"] == 1.0e-4 and cfg["evaluate"]["prompts"] == ["Hi", "Bye"]
    assert cfg["scorer_options"]["tfidf.sublinear_tf"] is True and cfg["runs"]["sft_s0"]["loss.name"] == "dft" and cfg["work"] == ""
    with pytest.raises(StudyError, match=r"no key data\.train\.cuont \(did you mean data\.train\.count\?\)"):
        read_config(config, ["data.train.cuont=3"])
    with pytest.raises(StudyError, match="expected KEY=VALUE"):
        read_config(config, ["data.train.count"])


def test_paired_vs_sft_one_seed_and_two():
    """A method with one seed gets its difference and no interval; with two, the mean of the paired differences."""
    from bench.study import paired_vs_sft

    def run(worst: float) -> dict:
        return {"heldout": {"tfidf": {"worst_group_loss": worst, "ce": worst - 0.5, "important_loss": worst, "unimportant_loss": worst - 1}}}

    runs = {"base": run(9.0), "sft_s0": run(2.0), "sft_s1": run(2.4), "rho1_s0": run(1.5), "sftgo_s0": run(1.9), "sftgo_s1": run(2.1)}
    got = paired_vs_sft(runs, "tfidf")
    assert got["sft_seeds"] == [0, 1] and got["sft_worst_group_sd"] == pytest.approx(0.2828427)
    one = got["methods"]["rho1"]
    assert one["seeds"] == [0] and one["worst_group_loss"]["mean"] == pytest.approx(-0.5) and one["worst_group_loss"]["low"] is None
    two = got["methods"]["sftgo"]["worst_group_loss"]
    assert got["methods"]["sftgo"]["seeds"] == [0, 1] and two["mean"] == pytest.approx(-0.2) and two["low"] < -0.2 < two["high"]
    assert "sft" not in got["methods"]


def test_t_interval_by_hand():
    from bench.study import t_interval

    got = t_interval([0.1, 0.3, 0.2, 0.4, 0.0])
    # mean 0.2, sd sqrt(0.025) = 0.158114, t(0.975, 4) = 2.776445: half width 2.776445 * 0.158114 / sqrt(5) = 0.196324
    assert got["mean"] == pytest.approx(0.2) and got["sd"] == pytest.approx(0.1581139)
    assert got["low"] == pytest.approx(0.2 - 0.196324, abs=1e-6) and got["high"] == pytest.approx(0.2 + 0.196324, abs=1e-6)


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "bench" / "study").glob("*.yaml")))
def test_every_study_config_passes_its_kinds_checks(config):
    """Each bench/study/*.yaml, the GPU ones too (which no CPU test runs), is read and checked as `bench/study.py
    --config` would before its first step; a known-truth config's corpus builds at its size."""
    from bench.study import load_study, read_config

    path = REPO / "bench" / "study" / config
    kind = read_config(path).get("kind", "")
    if kind == "known_truth":
        from bench.known_truth import build
        from bench.known_truth_study import load_config

        cfg = load_config(path, False, None, None, None)
        corpus = build(**cfg["corpus"])
        assert len(corpus["train"]) == cfg["corpus"]["entities"] * cfg["corpus"]["repeats"]
        assert len(set(corpus["table"])) == cfg["corpus"]["entities"]
    elif kind == "demo":
        from bench.demo_study import load_config

        load_config(path, False, None, None, None)
    else:
        cfg = load_study(path, False, None, None, None)
        assert cfg["runs"]


def test_training_vs_sft_pairs_the_last_epochs_group_losses_of_runs_grouped_as_sft():
    """The last epoch's step-mean group losses, the worse of the two as the worst group, paired with sft by seed; a run
    of another grouping (its curves hold other groups) is left out."""
    from bench.study import last_epoch_losses, training_vs_sft

    def run(scorer: str, *steps: tuple[int, float, float], loss: str = "sftgo") -> dict:
        curves = [{"step": i + 1, "epoch": epoch, "ce": (imp + unimp) / 2, "important_loss": imp, "unimportant_loss": unimp}
                  for i, (epoch, imp, unimp) in enumerate(steps)]
        return {"overrides": {"loss.name": loss, "importance.scorer": scorer, "importance.rho": 0.9}, "curves": curves}

    runs = {"base": {"heldout": {}},
            "sft_s0": run("tfidf", (0, 9.0, 9.0), (1, 1.0, 3.0), (1, 1.0, 2.0), loss="sft"),  # last epoch: 1.0 / 2.5
            "sft_s1": run("tfidf", (0, 9.0, 9.0), (1, 2.0, 3.0), loss="sft"),                 # 2.0 / 3.0
            "sftgo_tfidf_s0": run("tfidf", (0, 9.0, 9.0), (1, 1.5, 2.0), (1, 1.5, 2.2)),  # 1.5 / 2.1
            "sftgo_tfidf_s1": run("tfidf", (0, 9.0, 9.0), (1, 2.5, 2.9)),             # 2.5 / 2.9
            "sftgo_excess_s0": run("excess_loss", (0, 9.0, 9.0), (1, 0.1, 0.1)),
            "rho1_s0": run("tfidf", (0, 9.0, 9.0), (1, 0.1, 0.1), loss="rho1")}  # logs its own selection as groups
    assert last_epoch_losses(runs["sft_s0"]["curves"]) == {"ce": 1.75, "important_loss": 1.0, "unimportant_loss": 2.5,
                                                           "worst_group_loss": 2.5, "steps": 2}
    got = training_vs_sft(runs)
    assert got["grouping"] == {"scorer": "tfidf", "rho": 0.9} and got["sft_seeds"] == [0, 1]
    assert list(got["methods"]) == ["sftgo_tfidf"]  # sftgo_excess and rho1 log other groups: not comparable
    worst = got["methods"]["sftgo_tfidf"]["worst_group_loss"]
    assert worst["n"] == 2 and worst["mean"] == pytest.approx(((2.1 - 2.5) + (2.9 - 3.0)) / 2)
    assert got["methods"]["sftgo_tfidf"]["important_loss"]["mean"] == pytest.approx(0.5)
