"""Per-token cross-entropy under a causal LM: ``ref_loss`` (a reference model) and ``base_loss``
(the base model being tuned). excess_loss = base_loss - ref_loss is Rho-1's score, derived at load time.

The score of token t is -log p(x_t | x_<t); position 0 predicts nothing and scores 0. Rows are sorted
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
    uses_gpu = True

    @dataclass
    class Options:
        model: str = ""  # "" = the job's --model
        dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16
        max_batch_tokens: int = 8192  # padded tokens per forward pass
        logits_chunk: int = 2048  # positions per lm_head chunk
        threads: int = 0  # CPU threads for torch (0 = every core of the node)
        trust_remote_code: bool = False

    def __init__(self, options: Options, context: ScorerContext):
        from data.models import check_model, refuse_remote_code

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
            torch.set_num_threads(self.options.threads or os.cpu_count() or 1)
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

    def score(self, batch: pa.Table) -> list[np.ndarray]:
        import torch

        rows = [np.asarray(ids, dtype=np.int64) for ids in batch[INPUT_IDS].to_numpy(zero_copy_only=False)]
        out: list[np.ndarray | None] = [None] * len(rows)
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
                losses = self._token_losses(ids.to(device), attention.to(device)).float().cpu().numpy()
            for r, i in enumerate(chosen):
                out[i] = losses[r, : len(rows[i])].astype(np.float32)
            start = end
        return out  # type: ignore[return-value]

    def _token_losses(self, ids: Any, attention: Any) -> Any:
        """[B, T] losses: position t holds -log p(ids[t] | ids[<t]); position 0 holds 0."""
        import torch

        from data.token_loss import logit_softcap, token_ce

        hidden = self.model.base_model(input_ids=ids, attention_mask=attention).last_hidden_state
        head = self.model.get_output_embeddings()
        batch, length = ids.shape
        losses = torch.zeros((batch, length), dtype=torch.float32, device=ids.device)
        flat_hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        flat_targets = ids[:, 1:].reshape(-1)
        flat_losses = torch.empty(flat_targets.shape[0], dtype=torch.float32, device=ids.device)
        softcap = logit_softcap(self.model)
        for s in range(0, flat_targets.shape[0], self.options.logits_chunk):
            chunk = slice(s, s + self.options.logits_chunk)
            flat_losses[chunk] = token_ce(head(flat_hidden[chunk]), flat_targets[chunk], softcap).float()
        losses[:, 1:] = flat_losses.view(batch, length - 1) * attention[:, 1:]
        return losses


@register
class RefLossScorer(TokenLossScorer):
    """Loss under a reference model (Rho-1's reference); set ``ref_loss.model`` to it."""

    name = "ref_loss"


@register
class BaseLossScorer(TokenLossScorer):
    """Loss under the base model being tuned (the job's --model unless ``base_loss.model`` is set)."""

    name = "base_loss"
