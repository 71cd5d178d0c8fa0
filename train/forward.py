"""Packed forward pass with per-token cross-entropy, computed without full-sequence fp32 logits.

One packed row holds several examples back to back. Two things make this module more than
``model(...).logits``:

1. **Isolation.** Every token attends only to earlier tokens of its *own* example. We never rely on
   transformers inferring packing from restarting ``position_ids``: that heuristic (transformers 5.23,
   ``masking_utils.find_packed_sequence_indices``) is silently skipped whenever a KV cache exists, and
   ``use_cache`` defaults to True, so a plain ``model(input_ids, position_ids=...)`` attends across
   examples. Instead we build the mask explicitly, in the format the model's attention kernel expects:

   - ``sdpa``: a 4D boolean block-diagonal causal mask ``[1, 1, T, T]`` (True = may attend);
   - ``eager``: the same mask as an *additive* float mask (0 / dtype min). Llama's eager attention does
     ``scores + mask``; a boolean mask would be added as 0/1 and isolate nothing (measured);
   - ``flex_attention``: a document-causal ``BlockMask`` built at block granularity on the host
     (:func:`document_block_mask`, equal to ``create_block_mask``'s), which skips fully masked blocks
     (the efficient choice for long packs on GPU;
     the sdpa/eager masks are dense T x T). Rows are padded to a multiple of ``row_multiple`` (the
     trainer passes ``data.micro_batch_tokens``) with one padding "document" that no real token sees,
     so the kernel and mask compile once. On CPU (torch 2.13) flex is forward-only (no backward), a
     second distinct row length triggers a dynamic-shape recompile that fails to compile, and head_dim
     16 gave wrong values: train on CPU with sdpa.
   - ``flash_attention_2``: no mask; the row's ``cu_seq_lens`` / ``max_length`` built on the host from
     ``seq_lens`` (:func:`flash_varlen_kwargs`) go to flash-attn's varlen kernel, which isolates the
     examples (transformers would otherwise infer them from the restarting ``position_ids`` on the device).
     Used when transformers reports flash-attention 2 available and the dtype is half
     (``resolve_attn_implementation``).

   transformers returns any 4D tensor or ``BlockMask`` given as ``attention_mask`` unchanged
   (``_preprocess_mask_arguments`` early exit), so what we build is exactly what the kernel sees.

2. **Memory.** Full-vocabulary fp32 logits dominate peak memory (T x V x 4 bytes: 805 MB per 4096
   tokens at V = 49,152, plus as much again for their gradient). We run only the backbone, then apply
   ``lm_head`` + log-softmax per chunk of *trainable target positions* under
   ``torch.utils.checkpoint``, so at most one chunk of logits is alive at a time, in the forward and
   in the backward (which recomputes the chunk's logits).

Semantics (METHOD.md): for a trainable token t, l_t = -log p(y_t | y_<t), i.e. the target token at
packed position t is scored by the logits at position t - 1 of the same example. The first token of an
example has no context and is never a target; a ``loss_mask`` that marks one is rejected, so the output
always has exactly ``loss_mask.sum()`` entries, aligned with the trainable tokens in order.

DeepSpeed ZeRO-3 (issue 32): every rank must issue the same collectives whatever its data, and
ZeRO-3 gathers a module's weights around each *call* of the module. So the data-dependent CE chunk loop
runs inside ONE call of ``lm_head`` (:func:`chunked_token_ce` puts the loop in place of the head's
``forward`` for that call): the head's weight is gathered once for the forward, once before the backward
(its pre-backward hook, ahead of every chunk's checkpoint recomputation) and released after the last
chunk's gradient; inside, chunks run the head class's own ``forward`` (no hooks). Calling ``lm_head``
once per chunk made a rank with more trainable targets gather more often: the ranks' collectives
mismatched (gloo aborted, NCCL hangs). Likewise :func:`token_losses` runs the whole forward as one call
of the top-level model, whose forward pre-hook is where ZeRO-3 resets its prefetch trace each step:
calling ``model.model`` and ``lm_head`` directly left the trace invalid for ever (no prefetch).
The checkpoint is non-reentrant so that a weight used by several chunks (and, with tied embeddings, by
the embedding too) receives one accumulated gradient in one backward pass, as ZeRO-3's per-parameter
reduce hooks expect. Tied embeddings need no special handling: ``get_output_embeddings()`` is the
``lm_head`` module whichever weight it holds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from data.token_loss import LogitTransform, final_logits, logit_transform, token_ce, top_k_entropy

if TYPE_CHECKING:  # pragma: no cover
    from torch.nn.attention.flex_attention import BlockMask

__all__ = [
    "SUPPORTED_ATTN_IMPLEMENTATIONS",
    "chunked_token_ce",
    "document_block_mask",
    "document_ids",
    "flash_varlen_kwargs",
    "packed_attention_mask",
    "packed_hidden_states",
    "pad_packed_row",
    "resolve_attn_implementation",
    "target_positions",
    "token_losses",
]

#: Attention implementations for which we know how to isolate packed examples.
SUPPORTED_ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention", "flash_attention_2")


def resolve_attn_implementation(requested: str, device_type: str, dtype: str | torch.dtype | None = None) -> str:
    """``train.attn_implementation`` with ``auto`` resolved: on CUDA flash-attn's varlen kernel when
    transformers reports flash-attention 2 available and the compute dtype is half precision (flash-attn
    has no fp32 kernel), else FlexAttention with a document BlockMask; sdpa with a dense mask on CPU.
    ``dtype`` None (unknown) never picks flash-attn."""
    if requested != "auto":
        return requested
    if device_type == "cuda":
        from transformers.utils import is_flash_attn_2_available

        half = str(dtype).removeprefix("torch.") in ("bfloat16", "float16")
        return "flash_attention_2" if half and is_flash_attn_2_available() else "flex_attention"
    return "sdpa"


def flash_varlen_kwargs(seq_lens: Sequence[int], device: torch.device | str) -> dict[str, Any]:
    """flash-attn varlen arguments of one packed row, from the host's ``seq_lens``: ``cu_seq_lens_q/k``
    (int32 cumulative lengths, one host-to-device copy) and ``max_length_q/k`` (Python ints). transformers'
    ``_flash_attention_forward`` takes them as given; without them it infers them from ``position_ids``
    (a device scan and ``.item()`` syncs in every layer)."""
    lens = [int(n) for n in seq_lens]
    cumulative = [0]
    for n in lens:
        cumulative.append(cumulative[-1] + n)
    cu = torch.tensor(cumulative, dtype=torch.int32).to(device, non_blocking=True)
    longest = max(lens)
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def document_block_mask(seq_lens: Sequence[int], device: torch.device | str, block_size: int = 128) -> BlockMask:
    """The document-causal ``BlockMask`` of one packed row built at block granularity on the host from
    ``seq_lens``: no T x T mask is materialised (``create_block_mask`` evaluates the mask function on every
    (query, key) pair first: 1 GiB at T = 32k). Equal to ``create_block_mask`` of the same mask function
    (tests/train/test_forward.py). Block (i, j) is listed when some query of block i may see some key of
    block j, and is *full* (no mask function applied) when j < i and both blocks are whole and lie in one example."""
    import numpy as np
    from torch.nn.attention.flex_attention import BlockMask

    lens = np.asarray([int(n) for n in seq_lens], dtype=np.int64)
    total = int(lens.sum())
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    doc = np.repeat(np.arange(len(lens)), lens)
    n_blocks = -(-total // block_size)
    first = np.arange(n_blocks) * block_size
    last = np.minimum(first + block_size, total) - 1
    # A block is "full" only if complete: create_block_mask pads the row to whole blocks with masked
    # positions, so a cut-off last block is never full (kept so: the two masks are equal block for block).
    one_doc = (doc[first] == doc[last]) & (last - first + 1 == block_size)
    # Keys a query block needs: from the start of its first query's example up to its own last query.
    lo = starts[doc[first]] // block_size
    partial_rows, full_rows = [], []
    for i in range(n_blocks):
        j = np.arange(lo[i], i + 1)
        full = (j < i) & one_doc[i] & one_doc[j] & (doc[first[j]] == doc[first[i]])
        full_rows.append(j[full])
        partial_rows.append(j[~full])

    def pack(rows: list) -> tuple[Tensor, Tensor]:
        counts = torch.tensor([len(r) for r in rows], dtype=torch.int32)
        indices = torch.zeros((n_blocks, n_blocks), dtype=torch.int32)
        for i, r in enumerate(rows):
            indices[i, : len(r)] = torch.from_numpy(r.astype(np.int32))
        return counts[None, None].to(device), indices[None, None].to(device)

    doc_ids = torch.from_numpy(doc).to(device)

    def document_causal(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return (doc_ids[q_idx] == doc_ids[kv_idx]) & (kv_idx <= q_idx)

    kv_num, kv_idx = pack(partial_rows)
    full_num, full_idx = pack(full_rows)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block_size, mask_mod=document_causal,
                                    seq_lengths=(total, total))


def _check_seq_lens(seq_lens: Sequence[int], total: int) -> list[int]:
    """Validate that ``seq_lens`` are positive and tile the packed row of length ``total`` exactly."""
    lens = [int(n) for n in seq_lens]
    if not lens or any(n <= 0 for n in lens):
        raise ValueError(f"seq_lens must be a non-empty list of positive lengths, got {lens}")
    if sum(lens) != total:
        raise ValueError(f"sum(seq_lens)={sum(lens)} does not match the packed length {total}")
    return lens


def document_ids(seq_lens: Sequence[int], device: torch.device | str | None = None) -> Tensor:
    """Example index of each packed position: ``[2, 3] -> [0, 0, 1, 1, 1]`` (LongTensor[T])."""
    lens = torch.as_tensor(list(seq_lens), dtype=torch.long, device=device)
    return torch.repeat_interleave(torch.arange(len(lens), device=device), lens)


def packed_attention_mask(
    seq_lens: Sequence[int],
    attn_implementation: str,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
) -> Tensor | BlockMask:
    """Block-diagonal causal attention mask for one packed row, in the format ``attn_implementation`` expects.

    Args:
        seq_lens: lengths of the packed examples, in order; they must sum to the row length T.
        attn_implementation: ``"sdpa"`` (4D bool, True = attend), ``"eager"`` (4D additive float mask of
            ``dtype``) or ``"flex_attention"`` (a ``BlockMask``).
        device: where the mask lives (the device of the inputs).
        dtype: dtype of the additive mask for ``eager`` (the model's compute dtype); ignored otherwise.

    Returns:
        ``[1, 1, T, T]`` tensor, a ``BlockMask`` of shape ``(1, 1, T, T)``, or None for
        ``flash_attention_2`` (isolation comes from the restarting position ids).
    """
    lens = [int(n) for n in seq_lens]
    if attn_implementation == "flash_attention_2":
        return None
    if attn_implementation == "flex_attention":
        # Built from seq_lens at block granularity on the host: no transient T x T mask on the device.
        return document_block_mask(lens, device)
    total = sum(lens)
    doc = document_ids(lens, device=device)

    pos = torch.arange(total, device=device)
    allowed = (doc[:, None] == doc[None, :]) & (pos[None, :] <= pos[:, None])
    if attn_implementation == "sdpa":
        return allowed[None, None]
    if attn_implementation == "eager":
        # Eager attention adds the mask to the scores, so it must be 0 / -large, never bool.
        additive = torch.zeros((total, total), dtype=dtype, device=device)
        additive.masked_fill_(~allowed, torch.finfo(dtype).min)
        return additive[None, None]
    raise NotImplementedError(
        f"no isolating packed mask for attn_implementation={attn_implementation!r}; "
        f"use one of {SUPPORTED_ATTN_IMPLEMENTATIONS}"
    )


def target_positions(seq_lens: Sequence[int], loss_mask: Tensor) -> Tensor:
    """Packed positions t of the trainable target tokens, in order (LongTensor[n]).

    The prediction for target t comes from position t - 1, which belongs to the same example because
    t is never the first token of an example.

    Raises:
        ValueError: if ``loss_mask`` marks the first token of an example (it has no context to be
            predicted from; silently dropping it would misalign per-token scores with the losses).
    """
    lens = _check_seq_lens(seq_lens, loss_mask.numel())
    mask = loss_mask.reshape(-1).to(torch.bool)
    starts = torch.as_tensor([0] + lens[:-1], device=mask.device).cumsum(0)
    if bool(mask[starts].any()):
        bad = starts[mask[starts]].tolist()
        raise ValueError(
            f"loss_mask marks the first token of an example (packed positions {bad}); "
            "an example's first token predicts nothing and cannot be a trainable target"
        )
    return mask.nonzero().reshape(-1)


def _model_attn_implementation(model: nn.Module) -> str:
    return getattr(model.config, "_attn_implementation", None) or "eager"


def _model_dtype(model: nn.Module) -> torch.dtype:
    # PreTrainedModel.dtype reads the first floating parameter's dtype: valid under ZeRO-3 too, where
    # partitioned parameters keep their dtype but have an empty local shape.
    dtype = getattr(model, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def _backbone(model: nn.Module) -> nn.Module:
    """The decoder stack without the LM head (``model.model`` for Llama-style causal LMs)."""
    prefix = getattr(model, "base_model_prefix", "model")
    backbone = getattr(model, prefix, None)
    if backbone is None or backbone is model:
        raise TypeError(f"{type(model).__name__} has no backbone attribute {prefix!r}; pass a *ForCausalLM model")
    return backbone


def packed_hidden_states(
    model: nn.Module,
    input_ids: Tensor,
    position_ids: Tensor,
    seq_lens: Sequence[int],
    attn_implementation: str | None = None,
    row_multiple: int | None = None,
) -> Tensor:
    """Final hidden states ``[T, H]`` of one packed row, with examples isolated from each other.

    Args:
        model: a transformers ``*ForCausalLM`` (its backbone is run, not its LM head).
        input_ids: LongTensor[T], the packed row.
        position_ids: LongTensor[T]; normally restarting at 0 for each example (RoPE positions).
        seq_lens: lengths of the packed examples; must sum to T.
        attn_implementation: mask format to build; defaults to ``model.config._attn_implementation``.
            It must be the implementation the model actually runs (its attention layers read the
            config), otherwise the mask would be misread; a mismatch raises ``ValueError``.
        row_multiple: flex_attention only: pad the row to a multiple of this many tokens (one extra
            document, cut off again from the result) so that every row has the same compiled shape.
    """
    input_ids = input_ids.reshape(-1)
    position_ids = position_ids.reshape(-1).to(input_ids.device)
    total = input_ids.numel()
    lens = _check_seq_lens(seq_lens, total)
    model_impl = _model_attn_implementation(model)
    impl = attn_implementation or model_impl
    if impl != model_impl:
        raise ValueError(
            f"attn_implementation={impl!r} but the model runs {model_impl!r}; load the model with "
            f"attn_implementation={impl!r} (or call model.set_attn_implementation) so mask and kernel agree"
        )
    if impl == "flex_attention" and row_multiple:
        input_ids, position_ids, lens = pad_packed_row(input_ids, position_ids, lens, row_multiple)
    mask = packed_attention_mask(lens, impl, device=input_ids.device, dtype=_model_dtype(model))
    # flash-attn: the varlen boundaries from the host, so transformers does not infer them on the device.
    varlen = flash_varlen_kwargs(lens, input_ids.device) if impl == "flash_attention_2" else {}
    out = _backbone(model)(
        input_ids=input_ids[None],
        position_ids=position_ids[None],
        attention_mask=mask,
        # No KV cache in training: it would only hold K/V that autograd keeps anyway.
        use_cache=False,
        **varlen,
    )
    return out.last_hidden_state[0, :total]


def pad_packed_row(input_ids: Tensor, position_ids: Tensor, seq_lens: list[int], row_multiple: int) -> tuple[Tensor, Tensor, list[int]]:
    """Pad a packed row to a multiple of ``row_multiple`` tokens with one extra document (token 0,
    positions from 0), which no real token attends to: fixed shapes for compiled attention kernels."""
    pad = (-input_ids.numel()) % row_multiple
    if not pad:
        return input_ids, position_ids, list(seq_lens)
    input_ids = torch.cat([input_ids, input_ids.new_zeros(pad)])
    position_ids = torch.cat([position_ids, torch.arange(pad, device=position_ids.device, dtype=position_ids.dtype)])
    return input_ids, position_ids, [*seq_lens, pad]


@contextmanager
def _forward_replaced(module: nn.Module, forward: Callable[..., Any]) -> Iterator[nn.Module]:
    """``module`` with ``forward`` in place of its own forward for the duration: ``module(...)`` then runs
    ``forward`` inside ``nn.Module.__call__``, so every hook on the module (ZeRO-3's gather, release,
    pre-backward fetch and trace reset) fires exactly once around it."""
    previous = module.__dict__.get("forward")  # an instance-level forward someone else installed
    module.forward = forward  # instance attribute: shadows the class's forward (nn.Module.__call__ reads self.forward)
    try:
        yield module
    finally:
        if previous is not None:
            module.forward = previous
        else:
            del module.forward


def _chunk_ce(head: Callable[[Tensor], Tensor], softcap: LogitTransform, hidden: Tensor, src: Tensor, labels: Tensor) -> Tensor:
    """Per-token CE of one chunk (at least fp32): logits of the rows ``src`` of ``hidden`` against ``labels``."""
    return token_ce(head(hidden.index_select(0, src)), labels, softcap)


def _chunk_ce_hits(head: Callable[[Tensor], Tensor], softcap: LogitTransform, hidden: Tensor, src: Tensor,
                   labels: Tensor) -> Tensor:
    """``[n, 2]``: :func:`_chunk_ce`'s CE and 1.0 where the greedy prediction is the label. The argmax is
    taken on the head's raw logits: the final-logit transforms (a positive scale, a tanh soft-cap) are
    monotone, so they cannot change it."""
    logits = head(hidden.index_select(0, src))
    ce = token_ce(logits, labels, softcap)
    return torch.stack([ce, (logits.argmax(-1) == labels).to(ce.dtype)], 1)


def _chunk_ce_entropy(head: Callable[[Tensor], Tensor], softcap: LogitTransform, hidden: Tensor, src: Tensor,
                      labels: Tensor, k: int) -> Tensor:
    """``[n, 2]``: :func:`_chunk_ce`'s CE (with gradient) and the detached top-``k`` normalised entropy of
    the same logits (:func:`data.token_loss.top_k_entropy`): EAFT's weight from the one chunk of logits."""
    logits = final_logits(head(hidden.index_select(0, src)), softcap)
    ce = token_ce(logits, labels, None)  # the transform is applied once, above
    return torch.stack([ce, top_k_entropy(logits, k, None).to(ce.dtype)], 1)


def chunked_token_ce(
    model: nn.Module,
    hidden: Tensor,
    input_ids: Tensor,
    seq_lens: Sequence[int],
    loss_mask: Tensor,
    chunk_size: int = 4096,
    with_hits: bool = False,
    entropy_top_k: int | None = None,
) -> Tensor:
    """Per-token cross-entropy (fp32, or fp64 for an fp64 model) of the trainable targets from hidden states ``[T, H]``.

    ``lm_head`` runs on at most ``chunk_size`` target rows at a time, each chunk under a non-reentrant
    ``torch.utils.checkpoint`` so its logits are freed after the forward and recomputed in the backward.
    Without autograd (``torch.no_grad``, scoring) chunks run directly. The chunk loop is one call of the
    ``lm_head`` module whatever the number of chunks (ZeRO-3: one gather, the same on every rank).

    ``with_hits`` (evaluation, no autograd only): also whether each target is the greedy prediction.
    ``entropy_top_k`` (training with EAFT): also the live model's normalised top-k entropy of each target's
    distribution, from the same chunk of logits (no second logits tensor), without gradient.

    Returns:
        Tensor[n] (float32; float64 for a float64 model), n = ``loss_mask.sum()``, in packed order;
        with ``with_hits``, Tensor[n, 2]: the CE and 1.0 / 0.0 for a hit; with ``entropy_top_k``,
        Tensor[n, 2]: the CE (differentiable) and the entropy (detached).
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if with_hits and torch.is_grad_enabled():
        raise ValueError("with_hits is for evaluation: call it under torch.no_grad()")
    if with_hits and entropy_top_k is not None:
        raise ValueError("with_hits and entropy_top_k are two uses of the second column: ask for one")
    input_ids = input_ids.reshape(-1)
    targets = target_positions(seq_lens, loss_mask.to(input_ids.device))
    src = targets - 1
    labels = input_ids.index_select(0, targets)
    lm_head = model.get_output_embeddings()
    softcap = logit_transform(model)  # the model's own final-logit transform (scaling, soft-cap), not only Gemma's cap
    # The head's own computation without module hooks: inside the one lm_head call below (and in the
    # checkpoint recomputation, after ZeRO-3's pre-backward hook gathered the weight) the weight is whole.
    head_class_forward = type(lm_head).forward

    def head(rows: Tensor) -> Tensor:
        return head_class_forward(lm_head, rows)

    if entropy_top_k is not None:
        chunk_fn, extra = _chunk_ce_entropy, (int(entropy_top_k),)
    else:
        chunk_fn, extra = (_chunk_ce_hits if with_hits else _chunk_ce), ()

    # Checkpoint whenever autograd records (lm_head may be trainable even if hidden is not).
    use_checkpoint = torch.is_grad_enabled()

    def all_chunks(hidden_in: Tensor) -> Tensor:
        # hidden_in, not hidden: ZeRO-3's pre-forward hook hands the head a wrapped input whose backward
        # releases the gathered weight once every chunk's gradient has arrived.
        pieces = []
        # range(0, max(n, 1)): with no targets we still run one empty chunk so the result is attached to
        # the graph through lm_head (backward() then works and every rank touches the same parameters).
        for start in range(0, max(targets.numel(), 1), chunk_size):
            src_c, labels_c = src[start : start + chunk_size], labels[start : start + chunk_size]
            if use_checkpoint:
                # preserve_rng_state=False: the chunk has no randomness, so skip stashing RNG states.
                piece = checkpoint(
                    chunk_fn, head, softcap, hidden_in, src_c, labels_c, *extra, use_reentrant=False, preserve_rng_state=False
                )
            else:
                piece = chunk_fn(head, softcap, hidden_in, src_c, labels_c, *extra)
            pieces.append(piece)
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]

    # hidden positional: ZeRO-3's hooks see (and wrap) positional inputs only.
    with _forward_replaced(lm_head, all_chunks):
        return lm_head(hidden)


def token_losses(
    model: nn.Module,
    input_ids: Tensor,
    position_ids: Tensor,
    seq_lens: list[int],
    loss_mask: Tensor,
    chunk_size: int = 4096,
    attn_implementation: str | None = None,
    row_multiple: int | None = None,
    with_hits: bool = False,
    entropy_top_k: int | None = None,
) -> Tensor:
    """Per-token cross-entropy l_t = -log p(y_t | y_<t) of the trainable tokens of one packed row.

    Args:
        model: a transformers ``*ForCausalLM`` (may be the module inside a DeepSpeed engine).
        input_ids: LongTensor[T], several examples packed back to back (no batch dimension).
        position_ids: LongTensor[T], normally restarting at 0 for each example.
        seq_lens: lengths of the packed examples; must sum to T.
        loss_mask: BoolTensor[T], True at trainable target tokens; never True at an example's first token.
        chunk_size: number of target positions whose logits are materialised at once.
        attn_implementation: defaults to ``model.config._attn_implementation``; one of
            ``"sdpa"``, ``"eager"``, ``"flex_attention"``, ``"flash_attention_2"``.
        row_multiple: flex_attention pads the row to a multiple of this (see :func:`packed_hidden_states`).
        with_hits: evaluation under ``torch.no_grad()``: also 1.0 where the greedy prediction is the target.
        entropy_top_k: also the normalised top-k entropy of each target's distribution (EAFT's weight; detached).

    Returns:
        Tensor[n] float32 (float64 for a float64 model) with n = ``loss_mask.sum()``: the losses of the trainable tokens in packed order;
        differentiable w.r.t. the model's parameters. With ``with_hits``: Tensor[n, 2], losses and hits; with
        ``entropy_top_k``: Tensor[n, 2], losses and entropies.
    """

    def forward() -> Tensor:
        hidden = packed_hidden_states(model, input_ids, position_ids, seq_lens, attn_implementation, row_multiple)
        return chunked_token_ce(model, hidden, input_ids, seq_lens, loss_mask, chunk_size=chunk_size, with_hits=with_hits,
                                entropy_top_k=entropy_top_k)

    # One call of the top-level module: ZeRO-3 resets its prefetch trace in that module's forward
    # pre-hook (deepspeed/runtime/zero/parameter_offload.py), so the trace completes after one step.
    with _forward_replaced(model, forward):
        return model()

