"""Train on an annotated directory with TRL's SFTTrainer: sftgo's losses as a ``compute_loss_func``.

    from trl import SFTConfig, SFTTrainer
    from train.trl_bridge import TokenScoreCollator, TrlLoss, annotated_dataset, trl_config_kwargs

    dataset = annotated_dataset("shards/lima", score="tfidf")            # input_ids, completion_mask, token_scores, token_score_ids
    loss = TrlLoss("sftgo", rho=0.7, lambda_=0.9)                         # or rho1 (score="ref_loss"), weighted, select
    trainer = SFTTrainer(model=model, args=SFTConfig(output_dir="runs/trl", **trl_config_kwargs()),
                         train_dataset=dataset, processing_class=tokenizer,
                         data_collator=TokenScoreCollator(pad_token_id=tokenizer.pad_token_id),
                         compute_loss_func=loss, callbacks=[loss.callback()])
    loss.attach(trainer.model)
    trainer.train()

How the score reaches the loss: Trainer hands ``compute_loss_func`` only the model's outputs and the
labels, so the collator adds a padded ``token_scores`` tensor to the batch and a forward pre-hook on
the model (``attach``) takes it out of the forward's keyword arguments (the model never sees it)
just before the forward whose outputs the loss receives. The example ids travel the same way, as the
tie keys of (id, position) (``token_tie_keys``; data/grouping.py), so ties are broken as in train/main.py. The per-token CE is the trainer's own
(``data.token_loss``: fp32 upcast; the model's forward has already applied its final-logit transform).

Exactness: the loss normalises by Trainer's ``num_items_in_batch`` (the step's trainable tokens over
every accumulated micro-batch), as train/main.py normalises by the step's tokens; group statistics
(SFT-GO's worse group, Rho-1's top set, the weighted loss's weight sum) are those of each
micro-batch on its own process (as ``loss.group_decision=micro_batch``: Trainer gives the loss one
micro-batch at a time, so no step-wide decision). One process and no accumulation: the same loss as
train/main.py on the same batch (tests/train/test_trl_bridge.py). Across several processes the group
statistics are per process, not all-reduced as in train/main.py.

Progress (SFT-GO's ``lambda_schedule=linear``): ``state.global_step / (state.max_steps - 1)`` of the
Trainer, read at every loss call from the state the callback (``loss.callback()``) hands over at
train start, as train/main.py's ``step / (total_steps - 1)``: lambda_max at the first step, lambda_min at
the last. A schedule that needs progress without the callback registered is refused at the first call.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from data.token_loss import token_ce
from data.grouping import corpus_cut, important_masks, position_keys
from schemas.shard import EXCESS_LOSS, EXCESS_LOSS_PARTS, ID, INPUT_IDS, LOSS_MASK, Manifest, score_column
from train.losses import build_loss, loss_inputs

SCORES = "token_scores"  # the batch key the collator adds and attach()'s hook removes
SCORE_IDS = "token_score_ids"  # the dataset's example-id column (the collator turns it into TIE_KEYS)
TIE_KEYS = "token_tie_keys"  # the batch key of the tie keys of (example id, position), removed by the hook too
SUPPORTED = ("sftgo", "rho1", "weighted", "select", "sft")


def annotated_dataset(directory: str | Path, score: str) -> Any:
    """A ``datasets.Dataset`` of an annotated directory: ``input_ids``, ``completion_mask`` (1 = trainable, the
    shard's loss_mask), ``token_scores`` (the chosen score; ``excess_loss`` = base_loss - ref_loss) and
    ``token_score_ids`` (the example id, for the grouping's tie-break)."""
    import datasets

    manifest = Manifest.load(directory)
    parts = list(EXCESS_LOSS_PARTS) if score == EXCESS_LOSS else [score]
    missing = [p for p in parts if p not in manifest.scorer_names]
    if missing:
        raise ValueError(f"{directory}: no {missing} score (it has {manifest.scorer_names})")
    columns = [ID, INPUT_IDS, LOSS_MASK, *(score_column(p) for p in parts)]
    table = pa.concat_tables([pq.read_table(Path(directory) / entry.path, columns=columns) for entry in manifest.shards])
    table = table.combine_chunks()
    lists = {name: table[name].chunk(0) for name in columns}  # one chunk each after combine_chunks
    offsets = lists[INPUT_IDS].offsets
    if score == EXCESS_LOSS:
        base, ref = (lists[score_column(p)].flatten().to_numpy() for p in parts)
        values = pa.ListArray.from_arrays(offsets, pa.array(base - ref, pa.float32()))
    else:
        values = lists[score_column(score)]
    completion = pa.ListArray.from_arrays(offsets, lists[LOSS_MASK].flatten().cast(pa.int8()))
    out = pa.table({"input_ids": lists[INPUT_IDS], "completion_mask": completion, SCORES: values,
                    SCORE_IDS: table[ID].cast(pa.string())})
    return datasets.Dataset(out)


def trl_config_kwargs() -> dict[str, Any]:
    """SFTConfig settings the bridge needs: keep the ``token_scores`` column, labels from completion_mask, no
    truncation or packing (both would cut input_ids without the scores)."""
    return {"remove_unused_columns": False, "completion_only_loss": True, "max_length": None, "packing": False}


def _collator_base() -> type:
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    return DataCollatorForLanguageModeling


class TokenScoreCollator:
    """TRL's language-modelling collator plus the padded ``token_scores`` and ``token_tie_keys`` (right
    padding, like input_ids; padded keys are 1.0, above every real key)."""

    def __init__(self, pad_token_id: int) -> None:
        self.inner = _collator_base()(pad_token_id=pad_token_id)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        scores = [torch.tensor(example.pop(SCORES), dtype=torch.float32) for example in examples]
        ids = [example.pop(SCORE_IDS, None) for example in examples]
        batch = self.inner(examples)
        padded = torch.zeros(batch["input_ids"].shape, dtype=torch.float32)
        keys = torch.ones(batch["input_ids"].shape, dtype=torch.float64)
        for row, (values, example_id) in enumerate(zip(scores, ids)):
            n = min(len(values), padded.shape[1])
            padded[row, :n] = values[:n]
            keys[row, :n] = torch.from_numpy(position_keys(None if example_id is None else str(example_id), np.arange(n)))
        batch[SCORES] = padded
        batch[TIE_KEYS] = keys
        return batch


class TrlLoss:
    """``compute_loss_func`` for SFTTrainer running one of sftgo's losses on the collator's token scores.

    Args:
        loss: sftgo | rho1 | weighted | select | sft (the options of train.losses' class of that name follow).
        rho: threshold of the important group (sftgo, select), scope ``sequence``.
        corpus_quantiles: for scope corpus instead (rho's quantile of the manifest's sketch is the threshold).
    """

    def __init__(self, loss: str, rho: float = 0.7, corpus_quantiles: list[float] | None = None, **options: Any) -> None:
        if loss not in SUPPORTED:
            raise ValueError(f"TRL bridge loss {loss!r} is not one of {SUPPORTED}")
        self.name, self.rho, self.corpus_quantiles = loss, rho, corpus_quantiles
        if loss == "rho1":
            options.setdefault("rho", rho)  # Rho-1 keeps the top 1 - rho by live excess loss
        self.loss_fn = build_loss(loss, **options)
        self.pending: torch.Tensor | None = None
        self.pending_keys: torch.Tensor | None = None
        self.state: Any = None  # Trainer's TrainerState, from the callback at train start (progress)
        self.logged: dict[str, list[float]] = defaultdict(list)

    def attach(self, model: torch.nn.Module) -> None:
        """Register the pre-hook that takes ``token_scores`` out of the model's forward kwargs."""
        def take_scores(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
            scores = kwargs.pop(SCORES, None)
            keys = kwargs.pop(TIE_KEYS, None)
            if scores is not None:
                self.pending, self.pending_keys = scores, keys
            return args, kwargs

        model.register_forward_pre_hook(take_scores, with_kwargs=True)
        self.model = model

    def _important(self, scores: torch.Tensor, trainable: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """The grouping rule of data/grouping.py on the shifted rows, each row an example (``keys``: their tie keys)."""
        cut = None if self.corpus_quantiles is None else corpus_cut({"quantiles": self.corpus_quantiles}, self.rho)
        return important_masks([scores], [trainable], self.rho, "sequence" if cut is None else "corpus", cut,
                               seq_lens=[[scores.shape[1]] * scores.shape[0]], keys=[keys])[0]

    def __call__(self, outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
        if self.pending is None:
            raise RuntimeError("no token_scores reached the loss: use TokenScoreCollator and call TrlLoss.attach(trainer.model)")
        scores, self.pending = self.pending.to(labels.device), None
        keys, self.pending_keys = self.pending_keys, None
        if keys is None:  # batches from another collator: every row hashes as the empty id
            keys = torch.from_numpy(position_keys(None, np.arange(scores.shape[1]))).expand(scores.shape[0], -1)
        keys = keys.to(labels.device)
        logits = outputs.logits[:, :-1]
        targets = labels[:, 1:]
        trainable = targets != -100
        # Position t's score belongs to token t, predicted from position t - 1: shift like the labels.
        token_scores, token_keys = scores[:, 1:], keys[:, 1:]
        # outputs.logits come from the model's own forward, which already applied its final-logit
        # transform (Gemma-2's soft-cap, Granite's scaling, ...): upcast only, never transform twice.
        token_loss = token_ce(logits[trainable], targets[trainable], None)
        step_tokens = int(num_items_in_batch) if num_items_in_batch is not None else int(trainable.sum())
        important = self._important(token_scores, trainable, token_keys)
        weights, step_weight = None, 0.0
        if self.loss_fn.needs_weights:
            weights = torch.stack([self.loss_fn.token_weights(s, m, [len(s)], "sequence" if self.corpus_quantiles is None else "corpus",
                                                              self.corpus_quantiles) for s, m in zip(token_scores, trainable)])
            # The micro-batch's own weight sum, scaled to its share of the step's tokens (exact with one micro-batch).
            step_weight = float(weights[trainable].double().sum()) * step_tokens / max(1, int(trainable.sum()))
        # rho1 trains on the stored reference loss: the score it is given.
        inputs = loss_inputs(trainable, important, token_scores if self.loss_fn.needs_ref_loss else None, weights, step_weight)
        contribution, metrics = self.loss_fn(token_loss, inputs.important, inputs.ref_loss, step_tokens, self.progress(), **inputs.options)
        for key in ("ce", "important_loss", "unimportant_loss", "important_fraction", "lambda"):
            self.logged[key].append(metrics[key])
        return contribution

    def progress(self) -> float:
        """Training progress in [0, 1] from the Trainer's own step count: 0 at the first step, 1 at the last."""
        if self.state is None:
            if getattr(self.loss_fn.options, "lambda_schedule", "static") != "static":
                raise RuntimeError("lambda_schedule needs the training progress: pass callbacks=[loss.callback()] to the trainer")
            return 0.0
        return min(1.0, max(0.0, self.state.global_step / max(1, self.state.max_steps - 1)))

    def callback(self) -> Any:
        """A TrainerCallback that adds the mean group losses since the last log to each log entry."""
        from transformers import TrainerCallback

        bridge = self

        class GroupLossCallback(TrainerCallback):
            def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                bridge.state = state  # the live TrainerState: global_step advances after each optimizer step

            def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                bridge.state = state  # the same object; kept current should Trainer ever replace it

            def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
                if not bridge.logged or not state.log_history:
                    return
                means = {f"sftgo/{key}": float(np.mean(values)) for key, values in bridge.logged.items()}
                state.log_history[-1].update(means)
                if logs is not None:
                    logs.update(means)
                bridge.logged.clear()

        return GroupLossCallback()
