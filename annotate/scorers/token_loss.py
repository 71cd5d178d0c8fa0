"""Per-token scores under a causal LM: ``ref_loss`` (a reference model), ``base_loss`` (the base model
being tuned) and ``entropy`` (the base model's predictive entropy). excess_loss = base_loss - ref_loss
is Rho-1's score, derived at load time.

The loss of token t is -log p(x_t | x_<t); its entropy is H(p(. | x_<t)) in nats, the model's
uncertainty before it sees x_t (EKSFT's signal). Position 0 predicts nothing and scores 0. When
base_loss and entropy of the same model are both requested they come from one forward pass
(``share_key``: the pipeline hosts them in one actor). Rows are sorted
by length and batched under a token budget, so padding stays small; logits are computed in chunks
of positions, so the full (batch x length x vocab) fp32 tensor never exists. bf16 on GPU, fp32 on CPU.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from annotate.scorers import ScorerContext, register
from schemas.shard import INPUT_IDS, ScorerInfo


class TokenLossScorer:
    name = "token_loss"
    output = "loss"  # what this scorer's column holds: "loss" or "entropy" (see _token_outputs)
    uses_gpu = True
    # ref_loss names its model: defaulted to --model it would score the base model against itself,
    # and excess_loss = base_loss - ref_loss would be 0 everywhere (METHOD.md).
    requires_model = False

    @dataclass
    class Options:
        model: str = ""  # "" = the job's --model (ref_loss: required)
        dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16
        max_batch_tokens: int = 8192  # padded tokens per forward pass
        logits_chunk: int = 2048  # positions per lm_head chunk
        threads: int = 0  # CPU threads for torch (0 = the actor's share of its node's cores, see ScorerContext)
        trust_remote_code: bool = False

    def __init__(self, options: Options, context: ScorerContext):
        from data.models import check_model, refuse_remote_code

        if self.requires_model and not options.model:
            raise ValueError(f"{self.name}: --scorer-option {self.name}.model=PATH is required (the reference model, "
                             f"e.g. the base model fine-tuned on a clean reference set); it is not defaulted to --model, "
                             f"against which excess_loss = base_loss - {self.name} would be 0 everywhere")
        if options.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"{self.name}.dtype: {options.dtype!r} is not auto, float32 or bfloat16")
        if options.max_batch_tokens < 1 or options.logits_chunk < 1:
            raise ValueError(f"{self.name}: max_batch_tokens and logits_chunk must be positive")
        self.options = options
        self.context = context
        self.model_name = options.model or context.model
        self.model_path = check_model(self.model_name)  # fail before Ray starts on a bad path
        if not options.trust_remote_code:  # nor on a model folder that would run its own code
            refuse_remote_code(self.model_path, f"--scorer-option {self.name}.trust_remote_code=true")
        self.model: Any = None

    def setup(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        device = self.context.device
        if device == "cpu":
            torch.set_num_threads(self.options.threads or self.context.cpu_threads or os.cpu_count() or 1)
        dtype = self.options.dtype
        if dtype == "auto":
            dtype = "bfloat16" if device.startswith("cuda") else "float32"
        self.model = AutoModelForCausalLM.from_pretrained(
            self.model_path, dtype=getattr(torch, dtype), trust_remote_code=self.options.trust_remote_code
        ).to(device)
        self.model.eval()

    def info(self) -> ScorerInfo:
        from data.models import model_revision

        params = asdict(self.options)
        params.pop("threads")
        return ScorerInfo(self.name, model=self.model_name, revision=model_revision(self.model_name), params=params)

    def share_key(self) -> tuple:
        """Scorers with equal keys get one actor and one forward pass per batch (same model, same batching)."""
        o = self.options
        return ("causal_lm", self.model_path, o.dtype, o.max_batch_tokens, o.logits_chunk, o.trust_remote_code)

    def score(self, batch: pa.Table) -> list[np.ndarray]:
        return self.score_columns(batch, [self.name])[self.name]

    def score_columns(self, batch: pa.Table, names: list[str]) -> dict[str, list[np.ndarray]]:
        """One column per scorer in ``names`` (all sharing this scorer's model), from one forward pass per batch."""
        import torch

        from annotate import scorers as registry

        kinds = {name: registry.get(name).output for name in names}
        rows = [np.asarray(ids, dtype=np.int64) for ids in batch[INPUT_IDS].to_numpy(zero_copy_only=False)]
        out: dict[str, list[np.ndarray | None]] = {name: [None] * len(rows) for name in names}
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        device = self.context.device
        start = 0
        while start < len(order):
            # Grow the batch while (rows x longest row) stays within the token budget.
            end = start + 1
            while end < len(order) and (end + 1 - start) * len(rows[order[end]]) <= self.options.max_batch_tokens:
                end += 1
            chosen = order[start:end]
            longest = max(len(rows[i]) for i in chosen)
            ids = torch.zeros((len(chosen), longest), dtype=torch.long)
            attention = torch.zeros((len(chosen), longest), dtype=torch.long)
            for r, i in enumerate(chosen):
                ids[r, : len(rows[i])] = torch.from_numpy(rows[i])
                attention[r, : len(rows[i])] = 1
            with torch.inference_mode():
                outputs = self._token_outputs(ids.to(device), attention.to(device), set(kinds.values()))
            arrays = {kind: value.float().cpu().numpy() for kind, value in outputs.items()}
            for name, kind in kinds.items():
                for r, i in enumerate(chosen):
                    out[name][i] = arrays[kind][r, : len(rows[i])].astype(np.float32)
            start = end
        return out  # type: ignore[return-value]

    def _token_outputs(self, ids: Any, attention: Any, kinds: set[str]) -> dict[str, Any]:
        """[B, T] per kind: "loss" at t is -log p(ids[t] | ids[<t]), "entropy" at t is H(p(. | ids[<t])); 0 at t = 0."""
        import torch

        from data.token_loss import logit_transform, token_ce, token_logprobs

        hidden = self.model.base_model(input_ids=ids, attention_mask=attention).last_hidden_state
        head = self.model.get_output_embeddings()
        batch, length = ids.shape
        flat_hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        flat_targets = ids[:, 1:].reshape(-1)
        flat = {kind: torch.empty(flat_targets.shape[0], dtype=torch.float32, device=ids.device) for kind in kinds}
        softcap = logit_transform(self.model)  # the model's own final-logit transform (scaling, soft-cap)
        for s in range(0, flat_targets.shape[0], self.options.logits_chunk):
            chunk = slice(s, s + self.options.logits_chunk)
            logits = head(flat_hidden[chunk])
            if "loss" in kinds:
                flat["loss"][chunk] = token_ce(logits, flat_targets[chunk], softcap).float()
            if "entropy" in kinds:
                logprobs = token_logprobs(logits, softcap)
                flat["entropy"][chunk] = -(logprobs.exp() * logprobs).sum(-1).float()
        result = {}
        for kind, values in flat.items():
            full = torch.zeros((batch, length), dtype=torch.float32, device=ids.device)
            full[:, 1:] = values.view(batch, length - 1) * attention[:, 1:]
            result[kind] = full
        return result


@register
class RefLossScorer(TokenLossScorer):
    """Loss under a reference model (Rho-1's reference); ``ref_loss.model`` names it (required)."""

    name = "ref_loss"
    requires_model = True


@register
class BaseLossScorer(TokenLossScorer):
    """Loss under the base model being tuned (the job's --model unless ``base_loss.model`` is set)."""

    name = "base_loss"


@register
class EntropyScorer(TokenLossScorer):
    """Predictive entropy (nats) of the base model before each token (the job's --model unless ``entropy.model`` is set)."""

    name = "entropy"
    output = "entropy"
