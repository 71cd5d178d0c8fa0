"""Train on an annotated directory with TRL: ``TokenScoreSFTTrainer``, an ``SFTTrainer`` that runs sftgo's losses.

    from trl import SFTConfig
    from train.trl_bridge import TokenScoreSFTTrainer, TrlLoss, annotated_dataset, trl_config_kwargs

    dataset = annotated_dataset("shards/demo", score="tfidf")   # input_ids, completion_mask, token_scores, token_score_ids
    trainer = TokenScoreSFTTrainer(model=model, loss=TrlLoss("sftgo", rho=0.7, lambda_=0.9), train_dataset=dataset,
                                   args=SFTConfig(output_dir="runs/trl", **trl_config_kwargs()), processing_class=tokenizer)
    trainer.train()

A runnable version, offline on CPU: ``python -m train.trl_example shards/demo`` (train/trl_example.py).

How the score reaches the loss: the collator (:class:`TokenScoreCollator`, the trainer's default) pads each
example's ``token_scores`` and the tie keys of (example id, position) (``token_tie_keys``; data/grouping.py, so ties
are broken as in train/main.py) into the batch; the trainer's ``compute_loss`` pops both from ``inputs`` before the
model is called (the model never sees them), and hands the rest to TRL's own ``compute_loss``. That runs ONE forward,
through the fused LM head SFTTrainer puts on the model (``fused_lm_head=True``: the per-token log-probabilities
computed in chunks of the vocabulary, fp32 accumulation, no full logits tensor), and logs TRL's own metrics from it
(``entropy``, ``mean_token_accuracy``, ``num_tokens``). The loss returned is sftgo's, computed from that forward's
per-token log-probabilities (TRL's own nll of the same forward is discarded). No extra forward, no forward hook.

Which score a loss can use: the dataset records the score it was built with (:func:`dataset_score`) and the trainer
refuses one its loss cannot use (:meth:`TrlLoss.score_problem`): rho1 trains on the stored reference loss, so it
needs ``score="ref_loss"``; sftgo, select and weighted train by a score's groups or weights, so they need one (any
stored scorer or excess_loss, not ``"none"``); sft reads none.

What it gives up against plain SFTTrainer: label smoothing and ``loss_type="dft"`` (refused: sftgo's losses replace
them), packing and padding-free batches (refused: the scores are padded like input_ids), DeepSpeed sequence
parallelism and context parallelism (refused: the sequence would be split without its scores), the logits for
``compute_metrics`` (TRL rebuilds them with an extra forward when asked, as for its own loss). The per-token CE is
TRL's fused head's, which applies the model's final-logit transform as TRL knows it (soft-cap, logit scale); for a
family both know (Llama, Gemma-2/3, Granite, Cohere, ...) it is data.token_loss's up to fp32 rounding.
TRL versions: 1.16 (tested, 1.16.0; the fused LM head of ``SFTTrainer`` is what this relies on); other versions are
refused (< 1.16 has no fused head; 2.x may change ``compute_loss``).

Exactness: the loss normalises by Trainer's ``num_items_in_batch`` (the step's trainable tokens over every
accumulated micro-batch and, with ``average_tokens_across_devices``, every process), as train/main.py normalises by
the step's tokens; group statistics (SFT-GO's worse group, Rho-1's top set, the weighted loss's weight sum) are
those of each micro-batch (as ``loss.group_decision=micro_batch``: Trainer gives the loss one micro-batch at a time,
so no step-wide decision). One process and no accumulation: the same loss as train/main.py on the same batch
(tests/train/test_trl_bridge.py). Several processes are not tested.

Progress (SFT-GO's ``lambda_schedule=linear``): ``state.global_step / (state.max_steps - 1)`` of the Trainer, read at
every loss call from the state the loss's callback (added by the trainer) hands over at train start, as
train/main.py's ``step / (total_steps - 1)``: lambda_max at the first step, lambda_min at the last.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from data.grouping import corpus_cut, important_masks, position_keys
from schemas.shard import EXCESS_LOSS, EXCESS_LOSS_PARTS, ID, INPUT_IDS, LOSS_MASK, REF_LOSS, score_column, tokenizer_fingerprint
from train.losses import build_loss, loss_inputs
from train.shards import NO_SCORE, open_annotated

SCORES = "token_scores"  # the batch key the collator adds and compute_loss pops
SCORE_IDS = "token_score_ids"  # the dataset's example-id column (the collator turns it into TIE_KEYS)
TIE_KEYS = "token_tie_keys"  # the batch key of the tie keys of (example id, position), popped too
SUPPORTED = ("sftgo", "rho1", "weighted", "select", "sft")
# The TRL versions compute_loss is written against: [1.16, 2.0).
TRL_VERSIONS = ("1.16", "2.0")
_DESCRIPTION = "sftgo annotated directory; token_scores: "  # + the score, in the dataset's info.description


def annotated_dataset(directory: str | Path, score: str, tokenizer: Any = None) -> Any:
    """A ``datasets.Dataset`` of an annotated directory: ``input_ids``, ``completion_mask`` (1 = trainable, the
    shard's loss_mask), ``token_scores`` (the chosen score; ``excess_loss`` = base_loss - ref_loss; ``"none"``: zeros,
    for sft) and ``token_score_ids`` (the example id, for the grouping's tie-break). The score's name is kept in
    ``info.description`` (:func:`dataset_score`), so a loss can refuse a score it cannot use.

    The directory is checked as train/main.py checks it (``train.shards.open_annotated``: the shard contract, the
    score, rows with trainable tokens) and, given the model's ``tokenizer``, refused when annotated with another."""
    import datasets

    fingerprint = None if tokenizer is None else tokenizer_fingerprint(tokenizer)["sha256"]
    manifest = open_annotated(str(directory), fingerprint, score, option="score")
    parts = [] if score == NO_SCORE else list(EXCESS_LOSS_PARTS) if score == EXCESS_LOSS else [score]
    columns = [ID, INPUT_IDS, LOSS_MASK, *(score_column(p) for p in parts)]
    table = pa.concat_tables([pq.read_table(Path(directory) / entry.path, columns=columns) for entry in manifest.shards])
    table = table.combine_chunks()
    lists = {name: table[name].chunk(0) for name in columns}  # one chunk each after combine_chunks
    offsets = lists[INPUT_IDS].offsets
    if score == EXCESS_LOSS:
        base, ref = (lists[score_column(p)].flatten().to_numpy() for p in parts)
        values = pa.ListArray.from_arrays(offsets, pa.array(base - ref, pa.float32()))
    elif score == NO_SCORE:
        values = pa.ListArray.from_arrays(offsets, pa.array(np.zeros(len(lists[INPUT_IDS].flatten()), np.float32)))
    else:
        values = lists[score_column(score)]
    completion = pa.ListArray.from_arrays(offsets, lists[LOSS_MASK].flatten().cast(pa.int8()))
    out = pa.table({"input_ids": lists[INPUT_IDS], "completion_mask": completion, SCORES: values,
                    SCORE_IDS: table[ID].cast(pa.string())})
    return datasets.Dataset(out, info=datasets.DatasetInfo(description=_DESCRIPTION + score))


def dataset_score(dataset: Any) -> str | None:
    """The score a dataset of :func:`annotated_dataset` holds as ``token_scores`` (None for any other dataset)."""
    description = getattr(getattr(dataset, "info", None), "description", None) or ""
    return description[len(_DESCRIPTION):] if description.startswith(_DESCRIPTION) else None


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
    """One of sftgo's losses on a padded batch's per-token CE and token scores: what :class:`TokenScoreSFTTrainer` trains.

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
        self.state: Any = None  # Trainer's TrainerState, from the callback at train start (progress)
        self.logged: dict[str, list[float]] = defaultdict(list)

    def score_problem(self, score: str | None) -> str | None:
        """Why this loss cannot train on token scores of ``score`` (None when it can; ``score`` None: unknown)."""
        if self.loss_fn.needs_ref_loss and score != REF_LOSS:
            return (f"{self.name} trains on the stored reference loss: build the dataset with "
                    f"annotated_dataset(DIR, score={REF_LOSS!r}), not score={score!r}")
        if (self.loss_fn.needs_groups or self.loss_fn.needs_weights) and score in (None, NO_SCORE):
            what = "groups" if self.loss_fn.needs_groups else "weights"
            return (f"{self.name} trains by the score's {what}: build the dataset with annotated_dataset(DIR, score=...) "
                    f"naming a stored score (tfidf, excess_loss, ...), not {score!r}")
        return None

    def _important(self, scores: torch.Tensor, trainable: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """The grouping rule of data/grouping.py on the shifted rows, each row an example (``keys``: their tie keys)."""
        cut = None if self.corpus_quantiles is None else corpus_cut({"quantiles": self.corpus_quantiles}, self.rho)
        return important_masks([scores], [trainable], self.rho, "sequence" if cut is None else "corpus", cut,
                               seq_lens=[[scores.shape[1]] * scores.shape[0]], keys=[keys])[0]

    def __call__(self, token_loss: torch.Tensor, trainable: torch.Tensor, scores: torch.Tensor, keys: torch.Tensor | None,
                 num_items_in_batch: Any = None, record: bool = True) -> torch.Tensor:
        """This micro-batch's contribution to the step's loss.

        Args:
            token_loss: ``[n]`` CE of the trainable targets (with gradient), in row-major order of ``trainable``.
            trainable: ``[B, T - 1]`` bool, target t + 1 of each row is trainable (``labels[:, 1:] != -100``).
            scores: ``[B, T]`` the collator's padded token scores (position t's score is token t's).
            keys: ``[B, T]`` the collator's tie keys; None: every row hashes as the empty id.
            num_items_in_batch: Trainer's count of the step's trainable tokens; None: this micro-batch's.
            record: keep the group metrics for the next log entry (training, not evaluation).
        """
        device = token_loss.device
        scores = scores.to(device)
        if keys is None:  # batches from another collator
            keys = torch.from_numpy(position_keys(None, np.arange(scores.shape[1]))).expand(scores.shape[0], -1)
        keys, trainable = keys.to(device), trainable.to(device)
        # Position t's score belongs to token t, predicted from position t - 1: shift like the labels.
        token_scores, token_keys = scores[:, 1:], keys[:, 1:]
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
        if record:
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
        """A TrainerCallback that hands the loss Trainer's state and adds the mean group losses since the last log
        to each log entry (``sftgo/<key>``); :class:`TokenScoreSFTTrainer` registers it."""
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


class _FusedForward:
    """The model as TRL's ``compute_loss`` calls it, keeping the outputs of its one fused forward
    (``fused_lm_head=True``: per-token log-probabilities with their graph) for sftgo's loss."""

    def __init__(self, model: Any) -> None:
        self.model, self.outputs = model, None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        outputs = self.model(*args, **kwargs)
        if kwargs.get("fused_lm_head") and self.outputs is None:
            self.outputs = outputs
        return outputs


def _check_trl_version() -> None:
    import trl
    from packaging.version import Version

    low, high = TRL_VERSIONS
    if not Version(low) <= Version(trl.__version__) < Version(high):
        raise ImportError(f"train/trl_bridge.py supports TRL >= {low}, < {high} (tested: 1.16.0); this is TRL {trl.__version__}: "
                          "pip install -e '.[trl]' installs the tested one")


def _trainer_class() -> type:
    """:class:`TokenScoreSFTTrainer`, defined on first use (TRL is an optional extra)."""
    from trl import SFTTrainer

    class TokenScoreSFTTrainer(SFTTrainer):
        """TRL's ``SFTTrainer`` training one of sftgo's losses (:class:`TrlLoss`) on an :func:`annotated_dataset`.

        Takes SFTTrainer's arguments plus ``loss``; ``data_collator`` defaults to :class:`TokenScoreCollator`
        (``processing_class``'s pad token) and the loss's callback is added. Refused up front: a dataset whose
        score the loss cannot use, ``compute_loss_func``, label smoothing, ``loss_type="dft"``, packing,
        padding-free batches, ``remove_unused_columns`` (it would drop the scores), sequence or context parallelism.
        """

        def __init__(self, model: Any, loss: TrlLoss, args: Any, train_dataset: Any, processing_class: Any = None,
                     data_collator: Any = None, eval_dataset: Any = None, callbacks: list[Any] | None = None,
                     **kwargs: Any) -> None:
            _check_trl_version()
            problems = [f"{name}: {problem}" for name, dataset in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset))
                        if dataset is not None and (problem := loss.score_problem(dataset_score(dataset)))]
            if kwargs.get("compute_loss_func") is not None:
                problems.append("compute_loss_func: the loss is sftgo's (loss=); leave it out")
            for name, bad, why in (("label_smoothing_factor", args.label_smoothing_factor > 0, "label smoothing"),
                                   ("loss_type", args.loss_type != "nll", "TRL's own dft loss"),
                                   ("packing", args.packing, "packed rows (the scores are padded per example)"),
                                   ("padding_free", args.padding_free, "padding-free rows (the scores are padded per example)"),
                                   ("remove_unused_columns", args.remove_unused_columns, "dropping the token_scores column")):
                if bad:
                    problems.append(f"SFTConfig.{name}={getattr(args, name)!r}: {why} is not supported; use **trl_config_kwargs()")
            if problems:
                raise ValueError("TokenScoreSFTTrainer: " + "; ".join(problems))
            if data_collator is None:
                if processing_class is None:
                    raise ValueError("TokenScoreSFTTrainer: give processing_class (its pad token pads the batches) or a data_collator")
                pad = processing_class.pad_token_id if processing_class.pad_token_id is not None else processing_class.eos_token_id
                data_collator = TokenScoreCollator(pad_token_id=pad)
            super().__init__(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                             processing_class=processing_class, data_collator=data_collator,
                             callbacks=[*(callbacks or []), loss.callback()], **kwargs)
            parallel = getattr(self.accelerator, "parallelism_config", None)
            if parallel is not None and (getattr(parallel, "sp_enabled", False) or getattr(parallel, "cp_enabled", False)):
                raise ValueError("TokenScoreSFTTrainer: sequence and context parallelism split each row without its scores")
            self.token_loss = loss

        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            """sftgo's loss of the micro-batch from TRL's one fused forward (TRL logs its metrics from the same forward)."""
            scores, keys = inputs.pop(SCORES, None), inputs.pop(TIE_KEYS, None)
            if scores is None:
                raise ValueError("the batch holds no token_scores: use TokenScoreCollator and keep the column "
                                 "(SFTConfig(**trl_config_kwargs()))")
            if "shift_labels" in inputs:
                raise ValueError("pre-shifted labels (context parallelism) would split rows without their scores")
            forward = _FusedForward(model)
            result = super().compute_loss(forward, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
            outputs = forward.outputs
            if outputs is None:
                raise RuntimeError(f"TRL {__import__('trl').__version__}'s compute_loss ran no fused forward: this version "
                                   f"is not supported (TRL >= {TRL_VERSIONS[0]}, < {TRL_VERSIONS[1]})")
            trainable = outputs.label_mask  # [B, T - 1]: labels[:, 1:] != -100
            token_loss = -outputs.log_probs[trainable]
            loss = self.token_loss(token_loss, trainable, scores, keys, num_items_in_batch, record=self.model.training)
            # As TRL does for its own loss: num_items_in_batch counts every process's tokens, DDP averages gradients.
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * (self.accelerator.num_processes // self.get_tp_size())
            if self.aux_loss_enabled:  # an MoE model's router loss, as TRL adds it
                steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
                loss = loss + self.router_aux_loss_coef * outputs.aux_loss / steps
            return (loss, result[1]) if return_outputs else loss

    return TokenScoreSFTTrainer


_TRAINER: type | None = None


def __getattr__(name: str) -> Any:
    # TokenScoreSFTTrainer subclasses TRL's SFTTrainer: built on first access, so this module imports without TRL.
    global _TRAINER
    if name == "TokenScoreSFTTrainer":
        if _TRAINER is None:
            _TRAINER = _trainer_class()
        return _TRAINER
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
