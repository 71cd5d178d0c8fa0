"""python -m evaluation.run on CPU with a tiny random Llama, real lm-evaluation-harness and real shards.

Benchmark accuracies are checked against an independent loglikelihood recomputation, held-out group
losses against an unpacked forward pass and against the trainer's own evaluate(), generations
against a hand-written greedy loop; every bad input must exit 2 before a model loads.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from schemas.shard import tokenizer_fingerprint
from tests.conftest import REPO, SHARED_DATA
from tests.train.conftest import make_examples, write_annotated_dir
from evaluation import run as ev

EVAL_DATA = SHARED_DATA / "eval"
SUBJECTS = ("anatomy", "astronomy")
ARC_ROWS = (0, 1, 35, 89)  # 4 choices A-D, a 3-choice question (35) and labels 1-4 (89)
HELDOUT_SOURCES = ("lima", "web/alpaca en.json")  # the held-out shards' `source` values (sorted: their order)


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """2 MMLU subjects x 3 val rows (+ their 5 dev rows) and 4 ARC-Challenge dev rows, original formats."""
    root = tmp_path_factory.mktemp("eval_data")
    for split, rows in (("val", 3), ("dev", 5)):
        (root / "mmlu" / split).mkdir(parents=True)
        for subject in SUBJECTS:
            lines = (EVAL_DATA / "mmlu" / split / f"{subject}_{split}.csv").read_text(encoding="utf-8").splitlines(keepends=True)
            (root / "mmlu" / split / f"{subject}_{split}.csv").write_text("".join(lines[:rows]), encoding="utf-8")
    (root / "arc").mkdir()
    lines = (EVAL_DATA / "arc" / "ARC-Challenge-Dev.jsonl").read_text(encoding="utf-8").splitlines()
    (root / "arc" / "ARC-Challenge-Dev.jsonl").write_text("\n".join(lines[i] for i in ARC_ROWS) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def heldout_dir(tmp_path_factory, smol_tokenizer) -> Path:
    """Annotated shards (tfidf) carrying the tiny model's tokenizer fingerprint (SmolLM2's)."""
    out = tmp_path_factory.mktemp("heldout") / "val"
    examples = make_examples(14, ["tfidf"], seed=3, min_len=6, max_len=40, untrainable=(5,))
    for i, ex in enumerate(examples):  # two corpora, one name with characters unsafe in a metric key
        ex["source"] = HELDOUT_SOURCES[i % 3 == 2]
    write_annotated_dir(out, examples, ["tfidf"], tokenizer_fp=tokenizer_fingerprint(smol_tokenizer), rows_per_shard=6,
                        row_group_size=4)
    return out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_llama_dir) -> Path:
    """A training run directory as train/main.py leaves it: config.yaml and the exported model/."""
    run = tmp_path_factory.mktemp("runs") / "sftgo"
    shutil.copytree(tiny_llama_dir, run / "model")
    (run / "config.yaml").write_text("model: tiny\n")
    return run


@pytest.fixture(scope="module")
def model(tiny_llama_dir):
    return ev.load_model(str(tiny_llama_dir), torch.device("cpu"))


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, run_dir, tiny_llama_dir, data_dir, heldout_dir) -> dict:
    """One full 0-shot evaluation of a run directory and a plain model folder."""
    out = tmp_path_factory.mktemp("out") / "combined.json"
    code = ev.main([str(run_dir), str(tiny_llama_dir), "--tasks", "mmlu,arc_challenge", "--data-dir", str(data_dir),
                    "--heldout", str(heldout_dir), "--scorer", "tfidf", "--rho", "0.7", "--micro-batch-tokens", "64",
                    "--max-new-tokens", "6", "--output", str(out)])
    assert code == 0
    return json.loads(out.read_text())


# ---------------------------------------------------------------------------------------------
# Independent recomputations
# ---------------------------------------------------------------------------------------------


def loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context), tokenized as lm-eval's HFLM does (whole string, then split)."""
    whole = tokenizer.encode(context + continuation)
    n_ctx = len(tokenizer.encode(context))
    ids = torch.tensor([whole])
    with torch.no_grad():
        logprobs = F.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    return float(sum(logprobs[t - 1, whole[t]] for t in range(n_ctx, len(whole))))


def mc_scores(model, tokenizer, context: str, choices: list[str], gold: int) -> tuple[float, float]:
    """(acc, acc_norm) of one multiple-choice doc: argmax of loglikelihood, and of it per character."""
    lls = np.array([loglikelihood(model, tokenizer, context, " " + c) for c in choices])
    lengths = np.array([float(len(c)) for c in choices])
    return float(np.argmax(lls) == gold), float(np.argmax(lls / lengths) == gold)


def stderr(values: list[float]) -> float:
    p, n = float(np.mean(values)), len(values)
    return math.sqrt(p * (1 - p) / (n - 1))  # lm-eval's mean_stderr: sample stddev / sqrt(n)


# ---------------------------------------------------------------------------------------------
# Benchmarks
# ---------------------------------------------------------------------------------------------


def test_arc_zero_shot_matches_recomputed_loglikelihoods(evaluated, model, smol_tokenizer):
    record = next(b for b in evaluated["runs"][0]["benchmarks"] if b["task"] == "arc_challenge")
    lines = (EVAL_DATA / "arc" / "ARC-Challenge-Dev.jsonl").read_text(encoding="utf-8").splitlines()
    accs, norms = [], []
    for i in ARC_ROWS:
        doc = json.loads(lines[i])
        choices = [c["text"] for c in doc["question"]["choices"]]
        gold = [c["label"] for c in doc["question"]["choices"]].index(doc["answerKey"])
        acc, norm = mc_scores(model, smol_tokenizer, f"Question: {doc['question']['stem']}\nAnswer:", choices, gold)
        accs.append(acc)
        norms.append(norm)
    assert record["n"] == 4 and record["num_fewshot"] == 0 and record["split"] == "val" and record["limit"] is None
    assert record["acc"] == pytest.approx(np.mean(accs)) and record["acc_norm"] == pytest.approx(np.mean(norms))
    assert record["acc_stderr"] == pytest.approx(stderr(accs)) and record["acc_norm_stderr"] == pytest.approx(stderr(norms))


def test_mmlu_zero_shot_is_the_micro_accuracy_of_recomputed_subjects(evaluated, model, smol_tokenizer):
    record = next(b for b in evaluated["runs"][0]["benchmarks"] if b["task"] == "mmlu")
    all_accs = []
    for subject in SUBJECTS:
        rows = list(csv.reader((EVAL_DATA / "mmlu" / "val" / f"{subject}_val.csv").open(newline="", encoding="utf-8")))[:3]
        accs = []
        for q, a, b, c, d, answer in rows:
            context = (f"The following are multiple choice questions (with answers) about {subject}.\n\n"
                       f"{q.strip()}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer:")
            accs.append(mc_scores(model, smol_tokenizer, context, ["A", "B", "C", "D"], "ABCD".index(answer))[0])
        assert record["subjects"][subject]["acc"] == pytest.approx(np.mean(accs)) and record["subjects"][subject]["n"] == 3
        all_accs += accs
    assert record["n"] == 6 and record["acc"] == pytest.approx(np.mean(all_accs))  # micro = size-weighted mean
    assert 0.0 <= record["acc"] <= 1.0 and record["acc_norm"] is None
    assert record["acc_stderr"] is None or record["acc_stderr"] >= 0.0


def test_packed_loglikelihood_equals_the_harness_hflm(model, smol_tokenizer):
    """evaluation.packed_lm.PackedLM answers lm-eval's loglikelihood requests as its HFLM does: shared contexts
    (one-token choices), multi-token continuations, an empty context, trailing spaces, rows split small."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from evaluation.packed_lm import PackedLM

    pairs = [("Question: what is two plus two?\nAnswer:", c) for c in (" A", " B", " C", " D")]
    pairs += [("The capital of France is", " Paris, a city on the Seine."), ("The capital of France is ", "Lyon"),
              ("", "An empty context scores from the prefix token."), ("Short", " x"), ("Short", " y z")]
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(pairs)]
    expected = HFLM(pretrained=model, tokenizer=smol_tokenizer, batch_size=3).loglikelihood(requests, disable_tqdm=True)
    for row_tokens in (16, 4096):  # several rows (one input longer than a row) / everything in one row
        got = PackedLM(model, smol_tokenizer, micro_batch_tokens=row_tokens, progress=False).loglikelihood(requests, disable_tqdm=True)
        for (lp, greedy), (lp_hf, greedy_hf), pair in zip(got, expected, pairs):
            assert lp == pytest.approx(lp_hf, abs=1e-4), (row_tokens, pair)
            assert greedy == greedy_hf, (row_tokens, pair)


def test_hf_loglikelihood_gives_the_same_records(evaluated, run_dir, data_dir, tmp_path):
    out, run = tmp_path / "hf.json", tmp_path / "run"
    shutil.copytree(run_dir, run)  # RUN_DIR/evaluation.json is rewritten: keep the fixture's
    assert ev.main([str(run), "--tasks", "mmlu,arc_challenge", "--data-dir", str(data_dir), "--loglikelihood", "hf",
                    "--no-generate", "--output", str(out)]) == 0
    hf = {b["task"]: b for b in json.loads(out.read_text())["runs"][0]["benchmarks"]}
    packed = {b["task"]: b for b in evaluated["runs"][0]["benchmarks"]}
    for task in ("mmlu", "arc_challenge"):
        assert (hf[task]["loglikelihood"], packed[task]["loglikelihood"]) == ("hf", "packed")
        for key in ("acc", "acc_norm", "n"):
            assert hf[task][key] == packed[task][key], (task, key)


def test_an_evaluation_of_the_same_request_is_reused(run_dir, data_dir, heldout_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "evaluation.json").unlink(missing_ok=True)
    base = [str(run), "--tasks", "arc_challenge", "--data-dir", str(data_dir), "--heldout", str(heldout_dir),
            "--micro-batch-tokens", "64", "--max-new-tokens", "4", "--output", str(tmp_path / "combined.json")]
    assert ev.main(base) == 0
    first = json.loads((run / "evaluation.json").read_text())
    assert first["request"]["limit"] is None and first["request"]["heldout"][0]["manifest_sha256"]
    capsys.readouterr()
    assert ev.main(base) == 0
    assert "== run: an evaluation of the same weights, tasks, limits, held-out set and prompts is already there; reused" in capsys.readouterr().out
    assert json.loads((run / "evaluation.json").read_text()) == first
    # Another limit, --force, or other weights: computed again.
    for extra in (["--limit", "2"], ["--force"]):
        assert ev.main(base + extra) == 0
        assert "reused" not in capsys.readouterr().out, extra
    assert json.loads((run / "evaluation.json").read_text())["benchmarks"][0]["n"] == 4
    config = json.loads((run / "model" / "config.json").read_text())
    (run / "model" / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-3}))
    assert ev.main(base) == 0
    assert "reused" not in capsys.readouterr().out


def test_fewshot_contexts_hold_dev_examples(data_dir, model, smol_tokenizer):
    """k-shot through the real harness: MMLU's first k dev rows, ARC's other questions, never the asked one."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    bench = ev.Benchmarks(data_dir=data_dir, split="val", mmlu=ev.read_mmlu(data_dir, "val", 2), arc=ev.read_arc(data_dir, "val"))
    results = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=smol_tokenizer, batch_size=8),
                                      tasks=ev._task_objects(bench), task_manager=TaskManager(include_defaults=False),
                                      num_fewshot=2, limit=2, log_samples=True)
    dev = bench.mmlu["anatomy"]["dev"]
    for sample in results["samples"]["mmlu_anatomy"]:
        context = sample["arguments"][0][0]
        assert context.startswith("The following are multiple choice questions (with answers) about anatomy.\n\n")
        assert dev[0]["question"].strip() in context and dev[1]["question"].strip() in context
        assert dev[2]["question"].strip() not in context  # first_n: exactly the first k
        assert context.count("Answer:") == 3
    for sample in results["samples"]["arc_challenge"]:
        context = sample["arguments"][0][0]
        assert context.count("Question: ") == 3
        assert context.count(sample["doc"]["question"]) == 1  # the asked question is not among its own shots


def test_fewshot_cli_records(tiny_llama_dir, data_dir, tmp_path):
    out = tmp_path / "e.json"
    assert ev.main([str(tiny_llama_dir), "--tasks", "arc_challenge,mmlu", "--data-dir", str(data_dir), "--num-fewshot", "1",
                    "--limit", "2", "--no-generate", "--output", str(out)]) == 0
    records = {b["task"]: b for b in json.loads(out.read_text())["runs"][0]["benchmarks"]}
    assert records["arc_challenge"]["num_fewshot"] == 1 and records["arc_challenge"]["limit"] == 2 and records["arc_challenge"]["n"] == 2
    assert records["mmlu"]["n"] == 4 and all(s["n"] == 2 for s in records["mmlu"]["subjects"].values())


# ---------------------------------------------------------------------------------------------
# Held-out loss per group
# ---------------------------------------------------------------------------------------------


def _unpacked_group_losses(model, heldout_dir: Path, rho: float) -> dict:
    """Sequence scope by hand: one example at a time, a plain forward, groups by important_mask_sequence."""
    from train.grouping import important_mask_sequence
    from train.shards import ShardStream, open_annotated

    stream = ShardStream(str(heldout_dir), open_annotated(str(heldout_dir), None, "tfidf"), "tfidf", shuffle=False, epochs=1)
    losses, groups, hits, sources = [], [], [], []
    for ex in stream.examples():
        with torch.no_grad():
            logits = model(input_ids=ex["input_ids"][None]).logits[0].float()
        ce = F.cross_entropy(logits[:-1], ex["input_ids"][1:], reduction="none")
        mask = ex["loss_mask"]
        losses.append(ce[mask[1:]].double())
        hits.append((logits[:-1].argmax(-1) == ex["input_ids"][1:])[mask[1:]].double())
        groups.append(important_mask_sequence(ex["score"], mask, rho, ex["id"])[mask])  # ties by (id, position)
        sources.append(torch.full((int(mask.sum()),), ex["source"]))
    loss, imp, hit, source = torch.cat(losses), torch.cat(groups), torch.cat(hits), torch.cat(sources)

    def numbers(keep: torch.Tensor) -> dict:
        loss_, imp_, hit_ = loss[keep], imp[keep], hit[keep]
        return {"ce": loss_.mean().item(), "important_loss": loss_[imp_].mean().item(), "unimportant_loss": loss_[~imp_].mean().item(),
                "tokens": loss_.numel(), "important_tokens": int(imp_.sum()), "accuracy": hit_.mean().item(),
                "important_accuracy": hit_[imp_].mean().item(), "unimportant_accuracy": hit_[~imp_].mean().item()}

    assert stream.sources == list(HELDOUT_SOURCES)
    return {**numbers(torch.ones_like(imp)), "sources": [{"source": name, **numbers(source == index)}
                                                         for index, name in enumerate(stream.sources)]}


def test_heldout_record_equals_unpacked_recomputation(evaluated, model, heldout_dir):
    record = evaluated["runs"][0]["heldout"][0]
    assert {k: record[k] for k in ("dir", "scorer", "rho", "scope")} == {"dir": str(heldout_dir), "scorer": "tfidf", "rho": 0.7, "scope": "sequence"}
    expected = _unpacked_group_losses(model, heldout_dir, 0.7)
    for key in ("ce", "important_loss", "unimportant_loss"):
        assert record[key] == pytest.approx(expected[key], rel=1e-5)
    for key in ("accuracy", "important_accuracy", "unimportant_accuracy"):  # counts of hits: equal, not close
        assert record[key] == pytest.approx(expected[key], abs=1e-12)
    assert record["tokens"] == expected["tokens"] and record["important_tokens"] == expected["important_tokens"]
    unimportant_tokens = record["tokens"] - record["important_tokens"]
    assert record["ce"] * record["tokens"] == pytest.approx(
        record["important_loss"] * record["important_tokens"] + record["unimportant_loss"] * unimportant_tokens)
    assert record["worse_group"] == ("important" if record["important_loss"] >= record["unimportant_loss"] else "unimportant")
    assert record["micro_batches"] > 1  # packing really happened (64-token budget)
    # Per source: the same numbers over each source's tokens alone, with their token counts.
    assert [item["source"] for item in record["sources"]] == list(HELDOUT_SOURCES)
    for item, want in zip(record["sources"], expected["sources"]):
        assert set(item) == {"source", "tokens", "ce", "accuracy", "important_tokens", "important_loss", "unimportant_loss"}
        assert item["tokens"] == want["tokens"] and item["important_tokens"] == want["important_tokens"]
        for key in ("ce", "important_loss", "unimportant_loss"):
            assert item[key] == pytest.approx(want[key], rel=1e-5), (item["source"], key)
        assert item["accuracy"] == pytest.approx(want["accuracy"], abs=1e-12)
    assert sum(item["tokens"] for item in record["sources"]) == record["tokens"]
    assert sum(item["ce"] * item["tokens"] for item in record["sources"]) == pytest.approx(record["ce"] * record["tokens"])


def test_printed_table_has_per_source_rows_and_no_group_rows_without_groups(evaluated, tiny_llama_dir, heldout_dir, tmp_path,
                                                                            capsys):
    table = ev.format_results(evaluated["runs"])
    setting = f"{heldout_dir} (tfidf rho=0.7 sequence)"
    for source in HELDOUT_SOURCES:
        for label in ("CE", "important", "unimportant", "tokens"):
            rows = [line for line in table.splitlines() if line.startswith(f"held-out {label} [{source}]")]
            assert len(rows) == 1 and setting in rows[0], (source, label)
    tokens_row = next(line for line in table.splitlines() if line.startswith(f"held-out tokens [{HELDOUT_SOURCES[1]}]"))
    item = evaluated["runs"][0]["heldout"][0]["sources"][1]
    assert f"{item['tokens']} ({item['important_tokens']} important)" in tokens_row
    # scorer none (a run trained without a score): CE and tokens only, overall and per source; no 0.0 group numbers.
    out = tmp_path / "none.json"
    capsys.readouterr()
    assert ev.main([str(tiny_llama_dir), "--heldout", str(heldout_dir), "--scorer", "none", "--no-generate",
                    "--micro-batch-tokens", "64", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    held = [line for line in printed.splitlines() if line.startswith("held-out")]
    assert [line.split("  ")[0] for line in held] == [
        "held-out CE", "held-out tokens", f"held-out CE [{HELDOUT_SOURCES[0]}]", f"held-out tokens [{HELDOUT_SOURCES[0]}]",
        f"held-out CE [{HELDOUT_SOURCES[1]}]", f"held-out tokens [{HELDOUT_SOURCES[1]}]"]
    assert all("no groups (scorer none)" in line and "important" not in line for line in held)
    record = json.loads(out.read_text())["runs"][0]["heldout"][0]
    assert "important_loss" not in record and "worse_group" not in record and "important_tokens" not in record
    assert record["ce"] == pytest.approx(evaluated["runs"][0]["heldout"][0]["ce"], rel=1e-6)  # the same CE, grouped or not
    assert [set(item) for item in record["sources"]] == [{"source", "tokens", "ce", "accuracy"}] * 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("scope", ["sequence", "batch", "corpus"])
def test_heldout_equals_the_trainers_evaluate(model, heldout_dir, scope):
    """train.step.evaluate (one gloo rank, as under DeepSpeed) and train.heldout give the same numbers."""
    import torch.distributed as dist

    from train.step import evaluate
    from train.heldout import heldout_losses, open_heldout
    from train.shards import ShardStream

    manifest, threshold = open_heldout(str(heldout_dir), None, "tfidf", 0.6, scope)
    ours = heldout_losses(model, str(heldout_dir), manifest, "tfidf", 0.6, scope, threshold, micro_batch_tokens=50, progress=False)
    cfg = SimpleNamespace(data=SimpleNamespace(micro_batch_tokens=50), eval=SimpleNamespace(max_batches=0, scorer="", rho=None, scope=""),
                          importance=SimpleNamespace(scorer="tfidf", rho=0.6, scope=scope), train=SimpleNamespace(ce_chunk=1024))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        stream = ShardStream(str(heldout_dir), manifest, "tfidf", shuffle=False, epochs=1)
        trainer = evaluate(SimpleNamespace(module=model), stream, cfg, threshold, torch.device("cpu"), pad_id=2,
                           source_names=stream.read_sources())
    finally:
        dist.destroy_process_group()
    model.eval()  # the trainer's evaluate leaves the module in train mode
    assert trainer["eval_ce"] == ours["ce"]
    assert trainer["eval_important_loss"] == ours["important_loss"]
    assert trainer["eval_unimportant_loss"] == ours["unimportant_loss"]
    assert trainer["eval_tokens"] == ours["tokens"]
    assert trainer["eval_worse_group"] == (1 if ours["worse_group"] == "important" else 0)
    for key in ("accuracy", "important_accuracy", "unimportant_accuracy"):
        assert trainer[f"eval_{key}"] == ours[key]
    # Per source, under metric-safe keys ("web/alpaca en.json" -> web_alpaca_en.json): the same numbers.
    for key, item in zip(("lima", "web_alpaca_en.json"), ours["sources"]):
        assert {name: trainer[f"eval_source/{key}/{name}"] for name in ("tokens", "ce", "accuracy", "important_loss",
                                                                        "unimportant_loss")} == {
            name: item[name] for name in ("tokens", "ce", "accuracy", "important_loss", "unimportant_loss")}


# ---------------------------------------------------------------------------------------------
# Generations and files
# ---------------------------------------------------------------------------------------------


def test_generations_are_greedy_and_deterministic(model, smol_tokenizer, tmp_path):
    prompts_file = tmp_path / "p.jsonl"
    prompts_file.write_text('{"prompt": "Name a colour."}\n\n{"prompt": "Say hi."}\n')
    prompts = ev.read_prompts(str(prompts_file))
    assert prompts == ["Name a colour.", "Say hi."]
    first = ev.generate_answers(model, smol_tokenizer, prompts, 5, torch.device("cpu"))
    assert first == ev.generate_answers(model, smol_tokenizer, prompts, 5, torch.device("cpu"))
    for item, prompt in zip(first, prompts):  # a hand-written greedy loop over the chat template
        text = smol_tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        ids = smol_tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
        start = ids.shape[1]
        for _ in range(5):
            with torch.no_grad():
                nxt = model(input_ids=ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
            if int(nxt) == 2:  # <|im_end|>
                break
        assert item == {"prompt": prompt, "answer": smol_tokenizer.decode(ids[0, start:], skip_special_tokens=True).strip()}


def test_json_files(evaluated, run_dir, tiny_llama_dir):
    per_run = json.loads((run_dir / "evaluation.json").read_text())
    assert set(per_run) == {"run", "model", "benchmarks", "heldout", "generations", "system_prompt", "request"}
    assert per_run["system_prompt"] == "default"  # the run's data.system_prompt, what its generations were rendered with
    assert per_run["heldout"][0]["grouping_from"] == "--scorer --rho; the rest from its config"
    assert per_run == evaluated["runs"][0]
    assert per_run["run"] == "sftgo" and per_run["model"] == str(run_dir / "model")
    assert [b["task"] for b in per_run["benchmarks"]] == ["mmlu", "arc_challenge"]
    assert all(b["run"] == "sftgo" for b in per_run["benchmarks"] + per_run["heldout"])
    assert [g["prompt"] for g in per_run["generations"]] == ev.DEFAULT_PROMPTS
    assert all(isinstance(g["answer"], str) for g in per_run["generations"])
    # The plain model folder is evaluated too (same weights: same numbers) but gets no file of its own.
    other = evaluated["runs"][1]
    assert other["run"] == tiny_llama_dir.name and not (tiny_llama_dir / "evaluation.json").exists()
    assert [b["acc"] for b in other["benchmarks"]] == [b["acc"] for b in per_run["benchmarks"]]
    assert other["generations"] == per_run["generations"]
    assert evaluated["options"]["tasks"] == "mmlu,arc_challenge"


def test_lora_adapter_folders_and_runs_are_evaluated_on_their_base(tmp_path, tiny_llama_dir, heldout_dir):
    """A LoRA adapter folder as PEFT writes it (no tokenizer: its base's), and a LoRA run directory (the trainer's
    model/: adapter + tokenizer), load on their base through PEFT: the same held-out numbers and greedy answers as the
    merged model saved as a plain folder; the reuse key holds the base's weights too."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from schemas.shard import file_sha256

    torch.manual_seed(0)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape) * 0.05)
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    assert (adapter / "adapter_config.json").is_file() and not (adapter / "tokenizer_config.json").exists()
    run = tmp_path / "lora_run"
    shutil.copytree(adapter, run / "model")
    tokenizer_files = [p for p in tiny_llama_dir.iterdir() if p.name not in ("config.json", "generation_config.json", "model.safetensors")]
    for item in tokenizer_files:
        shutil.copy(item, run / "model" / item.name)
    (run / "config.yaml").write_text(f"model: {tiny_llama_dir}\nlora:\n  rank: 4\n")
    merged = tmp_path / "merged"
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), adapter).merge_and_unload().save_pretrained(merged)
    for item in tokenizer_files:
        shutil.copy(item, merged / item.name)

    out = tmp_path / "lora.json"
    assert ev.main([str(adapter), str(run), str(merged), "--heldout", str(heldout_dir), "--scorer", "tfidf", "--rho", "0.7",
                    "--micro-batch-tokens", "64", "--max-new-tokens", "4", "--output", str(out)]) == 0
    results = json.loads(out.read_text())["runs"]
    assert [r["run"] for r in results] == ["adapter", "lora_run", "merged"]
    plain = results[2]
    for result in results[:2]:
        for key in ("ce", "important_loss", "unimportant_loss", "accuracy"):
            assert result["heldout"][0][key] == pytest.approx(plain["heldout"][0][key], rel=1e-5, abs=1e-7), (result["run"], key)
        assert result["generations"] == plain["generations"]
        assert result["request"]["weights"]["base"]["model.safetensors"] == file_sha256(tiny_llama_dir / "model.safetensors")
        assert set(result["request"]["weights"]) == {"adapter_model.safetensors", "adapter_config.json", "base"}
    base_untrained = ev.load_model(str(tiny_llama_dir), torch.device("cpu"))
    ids = torch.arange(1, 30)[None]
    with torch.no_grad():  # the adapter really changes the model (else every comparison above would be the base's)
        assert (ev.load_model(str(adapter), torch.device("cpu"))(ids).logits - base_untrained(ids).logits).abs().max() > 1e-3
    assert (run / "evaluation.json").is_file()


# ---------------------------------------------------------------------------------------------
# Bad input: exit 2, the culprit named, no model loaded
# ---------------------------------------------------------------------------------------------


def _copy_data(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _bad_cases(tmp: Path, data_dir: Path, heldout_dir: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (extra argv after the run, text the error must contain)."""
    cases: dict[str, tuple[list[str], str]] = {}
    bench = ["--tasks", "mmlu,arc_challenge"]

    cases["missing_run"] = (["RUN=" + str(tmp / "nope")], "nope")
    (tmp / "half_run").mkdir()
    (tmp / "half_run" / "config.yaml").write_text("model: x\n")
    cases["run_without_model"] = (["RUN=" + str(tmp / "half_run")], "half_run has no model/config.json")
    cases["unknown_task"] = (["--tasks", "mmlu,hellaswag", "--data-dir", str(data_dir)], "unknown task 'hellaswag'")
    cases["no_data_dir"] = (bench, "--data-dir")

    no_arc = _copy_data(data_dir, tmp / "no_arc")
    (no_arc / "arc" / "ARC-Challenge-Dev.jsonl").unlink()
    cases["missing_arc_file"] = (bench + ["--data-dir", str(no_arc)], "ARC-Challenge-Dev.jsonl")

    columns = _copy_data(data_dir, tmp / "columns")
    path = columns / "mmlu" / "val" / "astronomy_val.csv"
    path.write_text(path.read_text() + "Only a question,A,B,C\n")
    cases["csv_columns"] = (bench + ["--data-dir", str(columns)], f"{path}:4: expected 6 columns")

    answer = _copy_data(data_dir, tmp / "answer")
    path = answer / "mmlu" / "val" / "anatomy_val.csv"
    path.write_text(path.read_text() + "Q?,a,b,c,d,E\n")
    cases["csv_answer"] = (bench + ["--data-dir", str(answer)], f"{path}:4: answer 'E' is not one of A, B, C, D")

    not_json = _copy_data(data_dir, tmp / "not_json")
    path = not_json / "arc" / "ARC-Challenge-Dev.jsonl"
    path.write_text(path.read_text() + "{not json\n")
    cases["jsonl_not_json"] = (bench + ["--data-dir", str(not_json)], f"{path}:5: not JSON")

    no_key = _copy_data(data_dir, tmp / "no_key")
    path = no_key / "arc" / "ARC-Challenge-Dev.jsonl"
    record = json.loads(path.read_text().splitlines()[0])
    del record["answerKey"]
    path.write_text(path.read_text() + json.dumps(record) + "\n")
    cases["jsonl_no_answer_key"] = (bench + ["--data-dir", str(no_key)], f"{path}:5: missing answerKey")

    cases["too_many_shots"] = (bench + ["--data-dir", str(data_dir), "--num-fewshot", "6"], "--num-fewshot 6")
    other_fp = tmp / "other_tokenizer"
    write_annotated_dir(other_fp, make_examples(4, ["tfidf"]), ["tfidf"])  # fingerprint {"name": "t", "sha256": "x"}
    cases["heldout_fingerprint"] = (["--heldout", str(other_fp)], "differs from the model's tokenizer")
    cases["unknown_scorer"] = (["--heldout", str(heldout_dir), "--scorer", "llmlingua2"], "score 'llmlingua2'")
    cases["rho"] = (["--heldout", str(heldout_dir), "--rho", "1.0"], "--rho 1.0")
    cases["prompts_file"] = (["--prompts", str(tmp / "none.txt")], "--prompts " + str(tmp / "none.txt") + ": not a file")
    return cases


CASES = ["missing_run", "run_without_model", "unknown_task", "no_data_dir", "missing_arc_file", "csv_columns", "csv_answer",
         "jsonl_not_json", "jsonl_no_answer_key", "too_many_shots", "heldout_fingerprint", "unknown_scorer", "rho", "prompts_file"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_exits_2_before_loading_a_model(case, tmp_path, data_dir, heldout_dir, run_dir, monkeypatch, capsys):
    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded despite bad input")

    monkeypatch.setattr(ev, "load_model", no_load)
    extra, expected = _bad_cases(tmp_path, data_dir, heldout_dir)[case]
    run = extra.pop(0)[4:] if extra and extra[0].startswith("RUN=") else str(run_dir)
    assert ev.main([run, *extra, "--output", str(tmp_path / "e.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err, err
    assert not (tmp_path / "e.json").exists()


def test_cli_bad_input_process(tmp_path, run_dir):
    """The real command line: exit status 2 and one error line, nothing loaded."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "evaluation.run", str(run_dir), "--tasks", "mmlu,bogus", "--data-dir", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: --tasks: unknown task 'bogus'; known tasks: mmlu, arc_challenge"
