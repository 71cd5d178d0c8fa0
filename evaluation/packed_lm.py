"""lm-evaluation-harness loglikelihood on packed rows: the same answers as the harness's ``HFLM``, less work.

``HFLM`` pads a batch of requests to its longest member and runs the LM head and a log-softmax over
the whole vocabulary at every position, padding included. For multiple-choice tasks on a small model
on CPU that is most of the time: 57 MMLU questions at batch 16 run 11,075 padded positions for
6,221 real ones, and a [16, 462, 49152] float32 log-softmax (1.4 GB) for 16 wanted rows.

``PackedLM`` keeps the harness's request handling (``TemplateLM``: the same context/continuation
split and tokenization, the same empty-context prefix token) and changes only the forward:
- inputs that are identical (the harness's one-token continuations of one context: MMLU's A/B/C/D)
  are computed once;
- inputs are packed back to back into rows of ``micro_batch_tokens`` (block-diagonal causal mask,
  restarting positions: ``train.forward.packed_hidden_states``, the trainer's code), so no padding;
- the LM head and log-softmax run only at the positions that predict continuation tokens.
``tests/evaluation/test_run.py`` checks that its loglikelihoods equal ``HFLM``'s on the same requests.
"""

from __future__ import annotations

from typing import Any

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import _add_special_kwargs, has_bos_prefix, resolve_max_length
from tqdm import tqdm

from data.token_loss import logit_transform, token_logprobs
from train.forward import packed_hidden_states


class PackedLM(TemplateLM):
    """An lm-eval model for ``loglikelihood`` tasks (multiple choice); no generation, no rolling loglikelihood."""

    backend = "causal"

    def __init__(self, model: Any, tokenizer: Any, micro_batch_tokens: int = 4096, progress: bool = True,
                 progress_file: Any = None) -> None:
        super().__init__()
        self.progress_file = progress_file  # where the progress bar goes (default: sys.stderr at the time)
        self.model = model
        self.tokenizer = tokenizer
        self.micro_batch_tokens = micro_batch_tokens
        self.progress = progress
        self.max_length = resolve_max_length(model.config, tokenizer)
        self._device = next(model.parameters()).device

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        # As HFLM: the token that stands in for an empty context.
        return self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.tokenizer.eos_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """HFLM's tokenization (its add_bos_token left unset): the tokenizer's own special-token default."""
        special = _add_special_kwargs(add_special_tokens, None)
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            special["add_special_tokens"] = False
        return self.tokenizer.encode(string, **special)

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        # One model input per distinct (context + continuation)[:-1], left-truncated to the window as HFLM does.
        inputs: dict[tuple[int, ...], int] = {}
        wanted: list[tuple[int, int, list[int]]] = []  # (input index, first predicting position, continuation)
        for (context, continuation), context_enc, continuation_enc in requests:
            if not continuation_enc:
                raise ValueError(f"empty continuation after tokenization: context {context[-40:]!r}, continuation {continuation!r}")
            if len(continuation_enc) > self.max_length:
                raise ValueError(f"a continuation of {len(continuation_enc)} tokens exceeds the model's {self.max_length}-token window")
            whole = (context_enc + continuation_enc)[-(self.max_length + 1):]
            model_input = tuple(whole[:-1])
            index = inputs.setdefault(model_input, len(inputs))
            wanted.append((index, len(model_input) - len(continuation_enc), continuation_enc))
        by_input: dict[int, list[int]] = {}
        for request, (index, _, _) in enumerate(wanted):
            by_input.setdefault(index, []).append(request)
        sequences = list(inputs)

        # Longest first, packed greedily into rows of at most micro_batch_tokens (a longer input is a row alone).
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
        rows: list[list[int]] = []
        for i in order:
            if rows and sum(len(sequences[j]) for j in rows[-1]) + len(sequences[i]) <= self.micro_batch_tokens:
                rows[-1].append(i)
            else:
                rows.append([i])

        results: list[tuple[float, bool] | None] = [None] * len(wanted)
        lm_head, softcap = self.model.get_output_embeddings(), logit_transform(self.model)
        bar = tqdm(total=len(wanted), desc="benchmark loglikelihoods", unit="request", disable=disable_tqdm or not self.progress,
                   file=self.progress_file)
        with torch.no_grad():
            for row in rows:
                lens = [len(sequences[i]) for i in row]
                ids = torch.tensor([t for i in row for t in sequences[i]], dtype=torch.long, device=self._device)
                positions = torch.cat([torch.arange(n, device=self._device) for n in lens])
                hidden = packed_hidden_states(self.model, ids, positions, lens)
                src, labels, owners = [], [], []
                offset = 0
                for i, n in zip(row, lens):
                    for request in by_input[i]:
                        _, start, continuation_enc = wanted[request]
                        src.extend(range(offset + start, offset + n))
                        labels.extend(continuation_enc)
                        owners.append((request, len(continuation_enc)))
                    offset += n
                logits = lm_head(hidden[torch.tensor(src, device=self._device)])
                logprobs = token_logprobs(logits, softcap)
                target = torch.tensor(labels, device=self._device)
                token_logprob = logprobs.gather(1, target[:, None])[:, 0]
                greedy = logprobs.argmax(dim=-1) == target
                at = 0
                for request, n in owners:
                    results[request] = (float(token_logprob[at:at + n].sum()), bool(greedy[at:at + n].all()))
                    at += n
                bar.update(len(owners))
        bar.close()
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        raise NotImplementedError("PackedLM scores multiple-choice tasks only; use --loglikelihood hf for perplexity tasks")

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        raise NotImplementedError("PackedLM scores multiple-choice tasks only; use --loglikelihood hf for generation tasks")
