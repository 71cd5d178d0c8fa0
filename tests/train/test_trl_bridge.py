"""TRL's SFTTrainer on an annotated directory through train/trl_bridge.py: a tiny random model trains a few
steps on CPU, and its first-step loss equals train/main.py's loss classes on the same batch; train/trl_example.py
runs as written."""

import pytest
import torch

pytest.importorskip("trl")

from train.forward import token_losses
from data.grouping import important_mask_sequence, position_keys
from train.losses import build_loss
from train.trl_bridge import (SCORE_IDS, SCORES, TIE_KEYS, TokenScoreCollator, TokenScoreSFTTrainer, TrlLoss, annotated_dataset,
                               dataset_score, trl_config_kwargs)
from tests.train.conftest import make_examples, write_annotated_dir


@pytest.mark.slow
@pytest.mark.parametrize("loss,options,score", [("sftgo", {"lambda_": 0.9}, "tfidf"), ("select", {}, "tfidf"),
                                               ("rho1", {}, "ref_loss"), ("weighted", {"transform": "rank"}, "tfidf")])
def test_trl_first_step_loss_equals_ours(tmp_path, tiny_llama_dir, loss, options, score):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig

    shards = tmp_path / "shards"
    write_annotated_dir(shards, make_examples(8, ["tfidf", "ref_loss"], min_len=6, max_len=20), ["tfidf", "ref_loss"])
    dataset = annotated_dataset(shards, score=score)
    assert dataset.column_names == ["input_ids", "completion_mask", SCORES, SCORE_IDS]
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32, attn_implementation="sdpa")
    bridge = TrlLoss(loss, rho=0.7, **options)
    seen = []
    collator = TokenScoreCollator(pad_token_id=tokenizer.pad_token_id)

    def recording(examples):
        batch = collator(examples)
        seen.append({k: v.clone() for k, v in batch.items()})
        return batch

    args = SFTConfig(output_dir=str(tmp_path / "trl"), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-3,
                     logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0,
                     seed=0, **trl_config_kwargs())
    forwards = []
    trainer = TokenScoreSFTTrainer(model=model, loss=bridge, args=args, train_dataset=dataset, processing_class=tokenizer,
                                   data_collator=recording)
    trainer.model.register_forward_hook(lambda module, args, output: forwards.append(type(output).__name__))
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 3 and all("sftgo/important_loss" in entry for entry in logs)
    # One forward per step, through TRL's fused head, and TRL's own metrics still come from it.
    assert forwards == ["FusedCausalLMOutput"] * 3
    assert all(0 < entry["entropy"] and 0 <= entry["mean_token_accuracy"] <= 1 and entry["num_tokens"] > 0 for entry in logs)

    # Our trainer's loss on TRL's first batch, with the initial weights: the rows packed back to back.
    first = seen[0]
    initial = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    lengths = first["attention_mask"].sum(1).tolist()
    ids = torch.cat([row[:n] for row, n in zip(first["input_ids"], lengths)])
    trainable = torch.cat([row[:n] != -100 for row, n in zip(first["labels"], lengths)])
    scores = torch.cat([row[:n] for row, n in zip(first[SCORES], lengths)])
    positions = torch.cat([torch.arange(n) for n in lengths])
    with torch.no_grad():
        token_loss = token_losses(initial, ids, positions, lengths, trainable)
    # Each row's tie keys are those of its example id (found by its tokens) and positions, as in training.
    by_tokens = {tuple(row["input_ids"]): row[SCORE_IDS] for row in dataset}
    row_ids = [by_tokens[tuple(row[:n].tolist())] for row, n in zip(first["input_ids"], lengths)]
    for row, n, example_id in zip(first[TIE_KEYS], lengths, row_ids):
        assert row[:n].tolist() == position_keys(example_id, range(n)).tolist()
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    important = torch.cat([important_mask_sequence(scores[a : a + n], trainable[a : a + n], 0.7, example_id)
                           for a, n, example_id in zip(starts, lengths, row_ids)])[trainable]
    ours = build_loss(loss, **({"rho": 0.7, **options} if loss == "rho1" else options))
    extra = {}
    if loss == "weighted":
        weight = ours.token_weights(scores, trainable, lengths, "sequence")
        extra = {"weight": weight[trainable], "step_weight": float(weight.sum())}
    expected, _ = ours(token_loss, important, scores[trainable] if loss == "rho1" else None, int(trainable.sum()), 0.0, **extra)
    # (padded sdpa in TRL vs packed rows here: ~3e-5 relative apart at most)
    assert logs[0]["loss"] == pytest.approx(expected.item(), rel=5e-5)
    assert abs(expected.item() - token_loss.mean().item()) > 5 * 5e-5 * expected.item(), "the loss must differ from plain CE"


@pytest.mark.slow
def test_trl_lambda_follows_the_linear_schedule_over_the_trainers_steps(tmp_path, tiny_llama_dir):
    """lambda_schedule=linear: lambda_max at TRL's first step, lambda_min at its last (max_steps), linear between."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig

    shards = tmp_path / "shards"
    write_annotated_dir(shards, make_examples(8, ["tfidf"], min_len=6, max_len=20), ["tfidf"])
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32, attn_implementation="sdpa")
    bridge = TrlLoss("sftgo", rho=0.7, lambda_schedule="linear", lambda_max=0.9, lambda_min=0.1)
    # Two micro-batches per step: lambda is the step's, the same in both.
    args = SFTConfig(output_dir=str(tmp_path / "trl"), max_steps=5, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                     learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                     dataloader_num_workers=0, seed=0, **trl_config_kwargs())
    trainer = TokenScoreSFTTrainer(model=model, loss=bridge, args=args, train_dataset=annotated_dataset(shards, score="tfidf"),
                                   processing_class=tokenizer)
    trainer.train()
    lambdas = [entry["sftgo/lambda"] for entry in trainer.state.log_history if "sftgo/lambda" in entry]
    assert lambdas == pytest.approx([0.9, 0.7, 0.5, 0.3, 0.1], abs=1e-6)


def test_trl_linear_schedule_without_the_callback_is_refused():
    bridge = TrlLoss("sftgo", rho=0.7, lambda_schedule="linear")
    with pytest.raises(RuntimeError, match="callback"):
        bridge.progress()
    assert TrlLoss("sftgo", rho=0.7, lambda_=0.5).progress() == 0.0  # a static lambda needs no progress


def test_a_loss_refuses_a_dataset_whose_score_it_cannot_use(tmp_path):
    """rho1 needs ref_loss; sftgo, select and weighted need a score; sft needs none. Refused before any model loads."""
    from trl import SFTConfig

    shards = tmp_path / "shards"
    write_annotated_dir(shards, make_examples(4, ["tfidf", "ref_loss"], min_len=6, max_len=12), ["tfidf", "ref_loss"])
    tfidf, none = annotated_dataset(shards, score="tfidf"), annotated_dataset(shards, score="none")
    assert dataset_score(tfidf) == "tfidf" and dataset_score(tfidf.shuffle(seed=0)) == "tfidf"  # kept through datasets' ops
    assert dataset_score(none) == "none" and not any(any(row) for row in none[SCORES])
    args = SFTConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, **trl_config_kwargs())
    with pytest.raises(ValueError, match=r"train_dataset: rho1 trains on the stored reference loss: build the dataset with "
                                         r"annotated_dataset\(DIR, score='ref_loss'\), not score='tfidf'"):
        TokenScoreSFTTrainer(model="unused", loss=TrlLoss("rho1"), args=args, train_dataset=tfidf)
    for name in ("sftgo", "select", "weighted"):
        with pytest.raises(ValueError, match=f"{name} trains by the score's"):
            TokenScoreSFTTrainer(model="unused", loss=TrlLoss(name), args=args, train_dataset=none)
    assert TrlLoss("sft").score_problem("none") is None and TrlLoss("rho1").score_problem("ref_loss") is None
    assert TrlLoss("sftgo").score_problem("excess_loss") is None
    packed = SFTConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, **{**trl_config_kwargs(), "packing": True})
    with pytest.raises(ValueError, match="SFTConfig.packing=True"):
        TokenScoreSFTTrainer(model="unused", loss=TrlLoss("sft"), args=packed, train_dataset=tfidf)
    with pytest.raises(ValueError, match="score 'base_loss'"):
        annotated_dataset(shards, score="base_loss")


@pytest.mark.slow
def test_the_example_runs_as_written(tmp_path, tiny_llama_dir, smol_tokenizer):
    """python -m train.trl_example DIR --model PATH, as the README shows it, on a tiny random model and directory."""
    import os
    import subprocess
    import sys

    from schemas.shard import tokenizer_fingerprint
    from tests.conftest import REPO

    shards = tmp_path / "shards"
    write_annotated_dir(shards, make_examples(8, ["tfidf"], min_len=6, max_len=20), ["tfidf"],
                        tokenizer_fp=tokenizer_fingerprint(smol_tokenizer))
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "train.trl_example", str(shards), "--model", str(tiny_llama_dir),
                           "--max-steps", "2", "--output", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    logged = proc.stdout + proc.stderr  # Trainer prints each log entry: TRL's metrics and sftgo's group losses
    assert logged.count("'sftgo/important_loss'") == 2 and logged.count("'mean_token_accuracy'") == 2
    # A directory annotated with another tokenizer is refused, naming the mismatch.
    other = tmp_path / "other"
    write_annotated_dir(other, make_examples(4, ["tfidf"], min_len=6, max_len=12), ["tfidf"])
    proc = subprocess.run([sys.executable, "-m", "train.trl_example", str(other), "--model", str(tiny_llama_dir)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "tokenizer" in proc.stderr
