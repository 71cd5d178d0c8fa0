"""train.forward: packed per-token losses are isolated per example and chunked CE is exact."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from train.forward import (
    chunked_token_ce,
    document_ids,
    packed_attention_mask,
    packed_hidden_states,
    target_positions,
    token_losses,
)

SEQ_LENS = [9, 14, 6, 11]  # 40 packed tokens; several examples so leaks have somewhere to come from
IMPLS = ["sdpa", "eager"]

# flex_attention on CPU (torch 2.13, measured here): forward works through inductor (needs a C++ compiler)
# but (a) backward raises NotImplementedError("FlexAttention does not support backward on CPU"),
# (b) a second distinct sequence length triggers a dynamic-shape recompile whose generated C++ does not
# compile ("cur_qSplitSize8 was not declared"), and (c) with head_dim 16 (the shared tiny Llama) the
# compiled kernel returns wrong values / NaN for some lengths (8, 24, 40, 56, 104 seen, not reproducibly);
# head_dim 64 (SmolLM2's) was right at every length tried (8..264).
# So the flex case runs forward-only, on a head_dim-64 model, at one static shape.
FLEX_CPU_BACKWARD = "FlexAttention does not support backward on CPU (torch 2.13: NotImplementedError)"


def _has_cxx_compiler() -> bool:
    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


def _load(model_dir, impl: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=impl, dtype=torch.float32)
    assert model.config._attn_implementation == impl
    return model.eval()


def _packed_batch(seed: int = 0, seq_lens: list[int] = SEQ_LENS, vocab: int = 49152):
    """Random packed row: ids, restarting position ids, and a loss mask that never marks an example start."""
    g = torch.Generator().manual_seed(seed)
    total = sum(seq_lens)
    input_ids = torch.randint(0, vocab, (total,), generator=g)
    position_ids = torch.cat([torch.arange(n) for n in seq_lens])
    loss_mask = torch.rand(total, generator=g) < 0.6
    loss_mask[position_ids == 0] = False
    return input_ids, position_ids, loss_mask


def _unpacked_reference(model, input_ids, seq_lens, loss_mask) -> torch.Tensor:
    """Each example alone through the plain HF model, standard shift (logits[t-1] scores token t)."""
    out, start = [], 0
    for n in seq_lens:
        ids = input_ids[start : start + n]
        logits = model(input_ids=ids[None], use_cache=False).logits[0].float()
        losses = F.cross_entropy(logits[:-1], ids[1:], reduction="none")
        out.append(losses[loss_mask[start + 1 : start + n]])
        start += n
    return torch.cat(out)


def _naive_token_losses(model, input_ids, position_ids, seq_lens, loss_mask) -> torch.Tensor:
    """Full-vocabulary fp32 logits for the whole row, then CE: the memory-hungry reference."""
    impl = model.config._attn_implementation
    mask = packed_attention_mask(seq_lens, impl, device=input_ids.device, dtype=model.dtype)
    out = model(input_ids=input_ids[None], position_ids=position_ids[None], attention_mask=mask, use_cache=False)
    logits = out.logits[0].to(torch.promote_types(out.logits.dtype, torch.float32))
    targets = target_positions(seq_lens, loss_mask)
    return F.cross_entropy(logits[targets - 1], input_ids[targets], reduction="none")


# (1) packed == unpacked ---------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_packed_losses_equal_unpacked(tiny_llama_dir, impl):
    model = _load(tiny_llama_dir, impl)
    input_ids, position_ids, loss_mask = _packed_batch()
    with torch.no_grad():
        packed = token_losses(model, input_ids, position_ids, SEQ_LENS, loss_mask, chunk_size=7)
        reference = _unpacked_reference(model, input_ids, SEQ_LENS, loss_mask)
    assert packed.dtype == torch.float32
    assert packed.shape == (int(loss_mask.sum()),)
    torch.testing.assert_close(packed, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_packed_gradient_equals_sum_of_unpacked_gradients(tiny_llama_dir, impl):
    """Training on a packed row is training on its examples: same loss sum, same parameter gradients."""
    model = _load(tiny_llama_dir, impl)
    input_ids, position_ids, loss_mask = _packed_batch(seed=1)
    token_losses(model, input_ids, position_ids, SEQ_LENS, loss_mask, chunk_size=5).sum().backward()
    packed_grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    _unpacked_reference(model, input_ids, SEQ_LENS, loss_mask).sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(packed_grads[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)


def _head_dim_64_llama(seed: int = 0):
    """Tiny random Llama with head_dim 64 (like SmolLM2), SmolLM2's vocabulary, sdpa to start with."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=4096, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=2, attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config).eval()


@pytest.mark.skipif(not _has_cxx_compiler(), reason="flex_attention on CPU is compiled by inductor: needs a C++ compiler")
def test_flex_attention_packed_losses_equal_unpacked_cpu():
    model = _head_dim_64_llama()
    input_ids, position_ids, loss_mask = _packed_batch(seed=9)
    with torch.no_grad():
        reference = _unpacked_reference(model, input_ids, SEQ_LENS, loss_mask)  # sdpa, one example at a time
        model.set_attn_implementation("flex_attention")
        assert model.config._attn_implementation == "flex_attention"
        # One static shape: no dynamic-shape recompile (broken on CPU, see above).
        with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
            packed = token_losses(model, input_ids, position_ids, SEQ_LENS, loss_mask, chunk_size=7)
    torch.testing.assert_close(packed, reference, atol=1e-5, rtol=0)


@pytest.mark.skipif(not _has_cxx_compiler(), reason="flex_attention on CPU is compiled by inductor: needs a C++ compiler")
def test_flex_attention_padded_row_equals_unpacked_cpu():
    """The trainer pads flex rows to a multiple of data.micro_batch_tokens (one compiled shape): the
    padding is a document of its own, so the real tokens' losses are unchanged and nothing is added."""
    model = _head_dim_64_llama(seed=2)
    input_ids, position_ids, loss_mask = _packed_batch(seed=10)
    with torch.no_grad():
        reference = _unpacked_reference(model, input_ids, SEQ_LENS, loss_mask)
        model.set_attn_implementation("flex_attention")
        with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
            hidden = packed_hidden_states(model, input_ids, position_ids, SEQ_LENS, row_multiple=64)
            packed = token_losses(model, input_ids, position_ids, SEQ_LENS, loss_mask, chunk_size=7, row_multiple=64)
    assert hidden.shape[0] == sum(SEQ_LENS)  # the padding is cut off again
    torch.testing.assert_close(packed, reference, atol=1e-5, rtol=0)


def test_pad_packed_row_adds_one_document():
    from train.forward import pad_packed_row

    ids, pos, lens = pad_packed_row(torch.arange(1, 41), torch.cat([torch.arange(n) for n in SEQ_LENS]), SEQ_LENS, 32)
    assert ids.numel() == 64 and lens == [*SEQ_LENS, 24]
    assert ids[40:].eq(0).all() and pos[40:].tolist() == list(range(24))
    same = pad_packed_row(torch.arange(64), torch.arange(64), [64], 32)
    assert same[0].numel() == 64 and same[2] == [64]


def test_attn_implementation_auto(monkeypatch):
    import transformers.utils

    from train.forward import resolve_attn_implementation

    assert resolve_attn_implementation("auto", "cpu", "float32") == "sdpa"
    assert resolve_attn_implementation("eager", "cuda", "bfloat16") == "eager"
    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: True)
    assert resolve_attn_implementation("auto", "cuda", "bfloat16") == "flash_attention_2"
    assert resolve_attn_implementation("auto", "cuda", torch.float16) == "flash_attention_2"
    # flash-attn has no fp32 kernel; an unknown dtype does not guess.
    assert resolve_attn_implementation("auto", "cuda", "float32") == "flex_attention"
    assert resolve_attn_implementation("auto", "cuda") == "flex_attention"
    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: False)  # transformers says no
    assert resolve_attn_implementation("auto", "cuda", "bfloat16") == "flex_attention"


def test_flash_varlen_kwargs_from_host_lengths():
    from train.forward import flash_varlen_kwargs

    kwargs = flash_varlen_kwargs([2, 3, 4], "cpu")
    assert kwargs["cu_seq_lens_q"].dtype == torch.int32 and kwargs["cu_seq_lens_q"].tolist() == [0, 2, 5, 9]
    assert kwargs["cu_seq_lens_k"] is kwargs["cu_seq_lens_q"]
    assert kwargs["max_length_q"] == kwargs["max_length_k"] == 4 and isinstance(kwargs["max_length_q"], int)


def test_flash_path_hands_the_kernel_host_built_varlen_arguments(tiny_llama_dir, monkeypatch):
    """With attn_implementation flash_attention_2, transformers' attention interface receives the row's
    cu_seq_lens / max_length as built from seq_lens. The kernel is stood in for (no flash-attn on CPU) by
    per-example sdpa over those boundaries: the losses then equal the unpacked ones."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    seen = []

    def varlen_sdpa(module, query, key, value, attention_mask, **kwargs):  # query [1, heads, T, d]
        seen.append({k: kwargs.get(k) for k in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")})
        assert attention_mask is None
        cu = kwargs["cu_seq_lens_q"].tolist()
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        out = torch.cat([F.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=True,
                                                        scale=module.scaling) for a, b in zip(cu[:-1], cu[1:])], dim=2)
        return out.transpose(1, 2).contiguous(), None

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "flash_attention_2", varlen_sdpa)
    model = _load(tiny_llama_dir, "sdpa")
    input_ids, position_ids, loss_mask = _packed_batch(seed=4)
    with torch.no_grad():
        reference = _unpacked_reference(model, input_ids, SEQ_LENS, loss_mask)
        model.config._attn_implementation = "flash_attention_2"  # the layers read the config at call time
        packed = token_losses(model, input_ids, position_ids, SEQ_LENS, loss_mask, chunk_size=7)
    assert len(seen) == model.config.num_hidden_layers
    for kwargs in seen:
        assert kwargs["cu_seq_lens_q"].tolist() == [0, 9, 23, 29, 40] and kwargs["max_length_q"] == 14
    torch.testing.assert_close(packed, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("seq_lens,block", [([5, 40, 3, 100, 60, 17], 16), ([300], 128), ([1] * 50, 16), ([37, 91], 128),
                                            ([128, 128, 5], 128), ([200, 56, 300], 64)])
def test_document_block_mask_equals_create_block_mask(seq_lens, block):
    """The BlockMask built on the host from seq_lens equals create_block_mask of the document-causal mask
    function (what the trainer built before), block for block: partial and full blocks, both directions."""
    from torch.nn.attention.flex_attention import create_block_mask

    from train.forward import document_block_mask

    doc = document_ids(seq_lens)

    def document_causal(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (kv_idx <= q_idx)

    total = sum(seq_lens)
    expected = create_block_mask(document_causal, None, None, total, total, device="cpu", BLOCK_SIZE=block)
    got = document_block_mask(seq_lens, "cpu", block_size=block)
    assert got.shape == expected.shape and got.BLOCK_SIZE == expected.BLOCK_SIZE
    assert torch.equal(got.to_dense(), expected.to_dense())
    for name in ("kv_num_blocks", "full_kv_num_blocks", "q_num_blocks", "full_q_num_blocks"):
        assert torch.equal(getattr(got, name), getattr(expected, name)), name
    for counts, indices in (("kv_num_blocks", "kv_indices"), ("full_kv_num_blocks", "full_kv_indices")):
        for row, n in enumerate(getattr(got, counts)[0, 0].tolist()):
            assert sorted(getattr(got, indices)[0, 0, row, :n].tolist()) == sorted(getattr(expected, indices)[0, 0, row, :n].tolist())
    # The mask function inside is the same rule (token level).
    q, k = torch.arange(total)[:, None], torch.arange(total)[None, :]
    assert torch.equal(got.mask_mod(0, 0, q, k), document_causal(0, 0, q, k))


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("impl", ["flex_attention", "flash_attention_2", "sdpa"])
def test_packed_losses_and_gradients_equal_unpacked_cuda(impl):
    """On the GPU paths (FlexAttention document BlockMask on a padded row, flash-attn varlen, sdpa 4D
    mask): packed per-token losses and gradients equal one-example-at-a-time ones (bf16 tolerances)."""
    import importlib.util

    if impl == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash-attn is not installed")
    model = _head_dim_64_llama(seed=4).to("cuda", torch.bfloat16).train()
    input_ids, position_ids, loss_mask = (t.cuda() for t in _packed_batch(seed=11))
    reference = _unpacked_reference(model, input_ids, SEQ_LENS, loss_mask)
    reference.sum().backward()
    ref_grads = {k: p.grad.float().clone() for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    model.set_attn_implementation(impl)
    packed = token_losses(model, input_ids, position_ids, SEQ_LENS, loss_mask, chunk_size=7, row_multiple=64)
    packed.sum().backward()
    torch.testing.assert_close(packed, reference, atol=3e-2, rtol=2e-2)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad.float(), ref_grads[name], atol=5e-2, rtol=5e-2, msg=name)


@pytest.mark.skip(reason=FLEX_CPU_BACKWARD)
def test_flex_attention_packed_gradient_cpu():  # pragma: no cover - documents the gap
    """Placeholder so the missing flex backward check shows up in the test report on CPU."""


# (2) negative controls: the comparison above can fail -------------------------------------------------


def _leaky_losses(model, input_ids, position_ids, loss_mask, mask) -> torch.Tensor:
    hidden = model.model(
        input_ids=input_ids[None], position_ids=position_ids[None], attention_mask=mask, use_cache=False
    ).last_hidden_state[0]
    return chunked_token_ce(model, hidden, input_ids, SEQ_LENS, loss_mask)


@pytest.mark.parametrize("impl,case", [("sdpa", "causal_only"), ("eager", "causal_only"), ("eager", "bool_mask")])
def test_negative_control_without_isolation_losses_differ(tiny_llama_dir, impl, case):
    """A plain causal mask (restarting position ids, no block diagonal) leaks across examples; so does a
    boolean block-diagonal mask under eager attention, which *adds* the mask to the scores (why eager
    gets an additive float mask). The first example has nothing before it, so it still matches."""
    model = _load(tiny_llama_dir, impl)
    input_ids, position_ids, loss_mask = _packed_batch()
    total = input_ids.numel()
    if case == "causal_only":
        mask = packed_attention_mask([total], impl, device="cpu", dtype=torch.float32)
    else:
        mask = packed_attention_mask(SEQ_LENS, "sdpa", device="cpu")  # bool, the sdpa format
    with torch.no_grad():
        leaky = _leaky_losses(model, input_ids, position_ids, loss_mask, mask)
        reference = _unpacked_reference(model, input_ids, SEQ_LENS, loss_mask)
    n_first = int(loss_mask[: SEQ_LENS[0]].sum())
    if case == "causal_only":
        torch.testing.assert_close(leaky[:n_first], reference[:n_first], atol=1e-5, rtol=0)
    assert (leaky[n_first:] - reference[n_first:]).abs().max() > 1e-3


# (3) chunked CE == naive CE, values and gradients ------------------------------------------------------


# fp32: chunking re-associates the lm_head weight-gradient sums (one partial sum per chunk), which moves
# entries of magnitude ~3 by up to ~2e-5 (bit-identical when one chunk holds all targets): hence rtol 1e-5.
# fp64 shows the computation itself is exact.
@pytest.mark.parametrize("dtype,atol,rtol", [(torch.float32, 1e-5, 1e-5), (torch.float64, 1e-10, 0)], ids=["fp32", "fp64"])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_chunked_ce_gradients_equal_naive(tmp_path, smol_tokenizer_dir, tiny_llama_dir, tie, dtype, atol, rtol):
    from tests.conftest import make_tiny_llama

    model_dir = tiny_llama_dir if tie else make_tiny_llama(tmp_path / "untied", smol_tokenizer_dir, seed=3, tie=False)
    model = _load(model_dir, "sdpa").to(dtype)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tie
    input_ids, position_ids, loss_mask = _packed_batch(seed=2)
    n = int(loss_mask.sum())
    chunk_size = 3
    assert chunk_size < n and n % chunk_size != 0  # several chunks, the last one partial
    weights = torch.rand(n, generator=torch.Generator().manual_seed(5), dtype=dtype)  # non-uniform, like group losses

    naive = _naive_token_losses(model, input_ids, position_ids, SEQ_LENS, loss_mask)
    (naive * weights).sum().backward()
    naive_grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    chunked = token_losses(model, input_ids, position_ids, SEQ_LENS, loss_mask, chunk_size=chunk_size)
    (chunked * weights).sum().backward()

    assert chunked.dtype == dtype
    torch.testing.assert_close(chunked, naive, atol=atol, rtol=rtol)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, naive_grads[name], atol=atol, rtol=rtol)


def test_chunks_do_not_keep_full_logits(tiny_llama_dir):
    """Autograd saves no vocabulary-sized activation outside the checkpointed chunks."""
    model = _load(tiny_llama_dir, "sdpa")
    vocab = model.config.vocab_size
    input_ids, position_ids, loss_mask = _packed_batch(seed=4)
    saved_shapes: list[torch.Size] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved_shapes.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        losses = token_losses(model, input_ids, position_ids, SEQ_LENS, loss_mask, chunk_size=4)
    assert saved_shapes  # the backbone's activations are seen, so the hook works
    assert not [s for s in saved_shapes if len(s) and s[-1] == vocab and s.numel() > vocab]
    losses.sum().backward()  # and the recomputation in backward still works

    saved_shapes.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _naive_token_losses(model, input_ids, position_ids, SEQ_LENS, loss_mask)
    assert [s for s in saved_shapes if s[-1:] == (vocab,) and s.numel() >= input_ids.numel() * vocab]


# (4) loss_mask selects exactly the trainable targets ---------------------------------------------------


def test_target_positions_small_example():
    # Two examples [a b c | d e]: positions 0 and 3 are starts and can never be targets.
    mask = torch.tensor([False, True, True, False, True])
    assert target_positions([3, 2], mask).tolist() == [1, 2, 4]
    with pytest.raises(ValueError, match="first token"):
        target_positions([3, 2], torch.tensor([False, True, True, True, True]))
    with pytest.raises(ValueError, match="does not match"):
        target_positions([3, 3], mask)


def test_loss_mask_selects_exact_targets(tiny_llama_dir):
    model = _load(tiny_llama_dir, "sdpa")
    input_ids, position_ids, _ = _packed_batch(seed=6)
    all_targets = position_ids != 0
    sub_mask = all_targets & (torch.rand(all_targets.shape, generator=torch.Generator().manual_seed(7)) < 0.5)
    with torch.no_grad():
        full = token_losses(model, input_ids, position_ids, SEQ_LENS, all_targets)
        sub = token_losses(model, input_ids, position_ids, SEQ_LENS, sub_mask, chunk_size=3)
        # Direct reference: -log softmax(logits[t-1])[y_t] of the unpacked model for every non-start t.
        reference = _unpacked_reference(model, input_ids, SEQ_LENS, all_targets)
    loss_at = dict(zip(all_targets.nonzero().reshape(-1).tolist(), full.tolist()))
    assert sub.shape == (int(sub_mask.sum()),)
    assert sub.tolist() == pytest.approx([loss_at[t] for t in sub_mask.nonzero().reshape(-1).tolist()], abs=1e-6)
    torch.testing.assert_close(full, reference, atol=1e-5, rtol=0)


def test_hits_are_the_unpacked_models_greedy_predictions(tiny_llama_dir):
    """with_hits: 1.0 exactly where argmax of the plain model's logits at t-1 is token t, per example."""
    model = _load(tiny_llama_dir, "sdpa")
    input_ids, position_ids, _ = _packed_batch(seed=6)
    targets = position_ids != 0
    # Make every other target the greedy continuation, so both hits and misses occur.
    with torch.no_grad():
        start = 0
        for n in SEQ_LENS:
            for t in range(start + 1, start + n, 2):
                input_ids[t] = model(input_ids=input_ids[start:t][None], use_cache=False).logits[0, -1].argmax()
            start += n
    expected, start = [], 0
    with torch.no_grad():
        loss_hits = token_losses(model, input_ids, position_ids, SEQ_LENS, targets, chunk_size=5, with_hits=True)
        for n in SEQ_LENS:
            ids = input_ids[start : start + n]
            expected.append((model(input_ids=ids[None], use_cache=False).logits[0, :-1].argmax(-1) == ids[1:]).float())
            start += n
        plain = token_losses(model, input_ids, position_ids, SEQ_LENS, targets, chunk_size=5)
    assert loss_hits.shape == (int(targets.sum()), 2)
    assert loss_hits[:, 1].tolist() == torch.cat(expected).tolist()
    assert 0.4 < loss_hits[:, 1].mean() < 1.0  # the planted half, and few chance hits
    assert torch.equal(loss_hits[:, 0], plain)
    with pytest.raises(ValueError, match="no_grad"):
        token_losses(model, input_ids, position_ids, SEQ_LENS, targets, with_hits=True)


def test_top_k_entropy_comes_from_the_same_chunks_as_the_loss(tiny_llama_dir):
    """entropy_top_k (eaft): column 0 is exactly the plain per-token CE with the same gradient, column 1 the
    top-k entropy of the plain model's own logits at t - 1 / ln k, detached."""
    from data.token_loss import top_k_entropy

    model = _load(tiny_llama_dir, "sdpa")
    input_ids, position_ids, loss_mask = _packed_batch(seed=9)
    both = token_losses(model, input_ids, position_ids, SEQ_LENS, loss_mask, chunk_size=5, entropy_top_k=20)
    plain = token_losses(model, input_ids, position_ids, SEQ_LENS, loss_mask, chunk_size=5)
    assert both.shape == (int(loss_mask.sum()), 2)
    torch.testing.assert_close(both[:, 0], plain, atol=0, rtol=0)
    expected, start = [], 0
    with torch.no_grad():
        for n in SEQ_LENS:
            ids = input_ids[start : start + n]
            logits = model(input_ids=ids[None], use_cache=False).logits[0, :-1].float()
            expected.append(top_k_entropy(logits, 20, None)[loss_mask[start + 1 : start + n]])
            start += n
    torch.testing.assert_close(both[:, 1], torch.cat(expected), atol=1e-5, rtol=0)
    assert ((both[:, 1] > 0) & (both[:, 1] <= 1)).all()
    # The gradient is the CE's alone: weighting by the detached column changes nothing but the weights.
    weights = both[:, 1].detach()
    grads = torch.autograd.grad((both[:, 0] * weights).sum(), model.lm_head.weight, retain_graph=True)[0]
    reference = torch.autograd.grad((plain * weights).sum(), model.lm_head.weight)[0]
    torch.testing.assert_close(grads, reference, atol=1e-6, rtol=0)
    detached = torch.autograd.grad(both[:, 1].sum(), model.lm_head.weight, allow_unused=True)[0]
    assert detached is None or not detached.any()
    with pytest.raises(ValueError, match="one"):
        with torch.no_grad():
            token_losses(model, input_ids, position_ids, SEQ_LENS, loss_mask, with_hits=True, entropy_top_k=20)


def test_empty_loss_mask_is_differentiable(tiny_llama_dir):
    model = _load(tiny_llama_dir, "sdpa")
    input_ids, position_ids, _ = _packed_batch(seed=8)
    losses = token_losses(model, input_ids, position_ids, SEQ_LENS, torch.zeros_like(input_ids, dtype=torch.bool))
    assert losses.shape == (0,) and losses.dtype == torch.float32
    losses.sum().backward()  # a rank whose micro-batch has no targets can still join the backward


def test_attn_implementation_must_match_model(tiny_llama_dir):
    model = _load(tiny_llama_dir, "sdpa")
    input_ids, position_ids, loss_mask = _packed_batch()
    with pytest.raises(ValueError, match="model runs 'sdpa'"):
        packed_hidden_states(model, input_ids, position_ids, SEQ_LENS, attn_implementation="eager")
    with pytest.raises(NotImplementedError):
        packed_attention_mask(SEQ_LENS, "flash_attention_3", device="cpu")
    # flash-attn isolates by the restarting position ids (varlen): no mask to build.
    assert packed_attention_mask(SEQ_LENS, "flash_attention_2", device="cpu") is None


# DeepSpeed ZeRO-3 ------------------------------------------------------------------------------------

_ZERO3_WORKER = r'''
"""token_losses under a ZeRO-3 engine (CPU, gloo, one rank) must equal plain torch: losses and full grads."""
import json, sys
import torch
import deepspeed
from deepspeed.utils import safe_get_full_grad
from transformers import AutoModelForCausalLM
from transformers.integrations import HfDeepSpeedConfig
from train.forward import token_losses

model_dir, seed = sys.argv[1], int(sys.argv[2])
lens = [9, 14, 6, 11]
g = torch.Generator().manual_seed(seed)
ids = torch.randint(0, 49152, (sum(lens),), generator=g)
pos = torch.cat([torch.arange(n) for n in lens])
mask = (torch.rand(sum(lens), generator=g) < 0.6) & (pos != 0)

ref_model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa", dtype=torch.float32)
ref = token_losses(ref_model, ids, pos, lens, mask, chunk_size=3)
ref.sum().backward()
ref_grads = {k: p.grad for k, p in ref_model.named_parameters()}

cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
       "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
keep = HfDeepSpeedConfig(cfg)  # partition at load time, as training does
deepspeed.init_distributed(dist_backend="gloo")
model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa", dtype=torch.float32)
engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=0.0), config=cfg)
out = token_losses(engine.module, ids, pos, lens, mask, chunk_size=3)
engine.backward(out.sum())
errs = {k: (safe_get_full_grad(p) - ref_grads[k]).abs().max().item() for k, p in engine.module.named_parameters()}
engine.step()
print("RESULT " + json.dumps({
    "lm_head_local_numel": engine.module.lm_head.weight.numel(),
    "loss_err": (out.detach() - ref.detach()).abs().max().item(),
    "grad_err": max(errs.values()),
}))
'''


@pytest.mark.slow
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_token_losses_under_deepspeed_zero3(tmp_path, smol_tokenizer_dir, tiny_llama_dir, tie):
    """lm_head partitioned by ZeRO-3 (local numel 0): chunked, checkpointed CE still matches plain torch."""
    import json
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("deepspeed")
    from tests.conftest import make_tiny_llama

    model_dir = tiny_llama_dir if tie else make_tiny_llama(tmp_path / "untied", smol_tokenizer_dir, seed=3, tie=False)
    script = tmp_path / "zero3_worker.py"
    script.write_text(_ZERO3_WORKER, encoding="utf-8")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, DS_ACCELERATOR="cpu", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               PYTHONPATH=os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(script), str(model_dir), "0"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["lm_head_local_numel"] == 0  # really partitioned: only hooks can gather it
    assert result["loss_err"] <= 1e-6
    assert result["grad_err"] <= 1e-5
