"""TRL's SFTTrainer on an annotated directory through train/trl_bridge.py: a tiny random model trains a few
steps on CPU, and its first-step loss equals train/main.py's loss classes on the same batch."""

import pytest
import torch

pytest.importorskip("trl")

from train.forward import token_losses
from data.grouping import important_mask_sequence, position_keys
from train.losses import build_loss
from train.trl_bridge import SCORE_IDS, SCORES, TIE_KEYS, TokenScoreCollator, TrlLoss, annotated_dataset, trl_config_kwargs
from tests.train.conftest import make_examples, write_annotated_dir


@pytest.mark.slow
@pytest.mark.parametrize("loss,options,score", [("sftgo", {"lambda_": 0.9}, "tfidf"), ("select", {}, "tfidf"),
                                               ("rho1", {}, "ref_loss"), ("weighted", {"transform": "rank"}, "tfidf")])
def test_trl_first_step_loss_equals_ours(tmp_path, tiny_llama_dir, loss, options, score):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

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
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, data_collator=recording,
                         compute_loss_func=bridge, callbacks=[bridge.callback()])
    bridge.attach(trainer.model)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 3 and all("sftgo/important_loss" in entry for entry in logs)

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
    from trl import SFTConfig, SFTTrainer

    shards = tmp_path / "shards"
    write_annotated_dir(shards, make_examples(8, ["tfidf"], min_len=6, max_len=20), ["tfidf"])
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32, attn_implementation="sdpa")
    bridge = TrlLoss("sftgo", rho=0.7, lambda_schedule="linear", lambda_max=0.9, lambda_min=0.1)
    # Two micro-batches per step: lambda is the step's, the same in both.
    args = SFTConfig(output_dir=str(tmp_path / "trl"), max_steps=5, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                     learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                     dataloader_num_workers=0, seed=0, **trl_config_kwargs())
    trainer = SFTTrainer(model=model, args=args, train_dataset=annotated_dataset(shards, score="tfidf"), processing_class=tokenizer,
                         data_collator=TokenScoreCollator(pad_token_id=tokenizer.pad_token_id), compute_loss_func=bridge,
                         callbacks=[bridge.callback()])
    bridge.attach(trainer.model)
    trainer.train()
    lambdas = [entry["sftgo/lambda"] for entry in trainer.state.log_history if "sftgo/lambda" in entry]
    assert lambdas == pytest.approx([0.9, 0.7, 0.5, 0.3, 0.1], abs=1e-6)


def test_trl_linear_schedule_without_the_callback_is_refused():
    bridge = TrlLoss("sftgo", rho=0.7, lambda_schedule="linear")
    with pytest.raises(RuntimeError, match="callback"):
        bridge.progress()
    assert TrlLoss("sftgo", rho=0.7, lambda_=0.5).progress() == 0.0  # a static lambda needs no progress
