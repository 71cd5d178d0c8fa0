"""ref_loss / base_loss: per-token CE equals a plain HF forward; batching and padding do not change it."""

import numpy as np
import pyarrow as pa
import pytest
import torch
from transformers import AutoModelForCausalLM

from annotate import scorers as registry
from annotate.scorers import ScorerContext
from schemas.shard import INPUT_IDS


def _table(rows):
    return pa.table({INPUT_IDS: pa.array(rows, pa.list_(pa.int32()))})


def _scorer(name, model_dir, **options):
    scorer = registry.get(name)(registry.build_options(name, options), ScorerContext(model=str(model_dir)))
    scorer.setup()
    return scorer


def _reference(model_dir, ids):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    losses = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="none")
    return np.concatenate([[0.0], losses.numpy()])


def test_ref_loss_equals_hf_forward_and_is_batch_invariant(tiny_llama_dir):
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, 49152, size=n).tolist() for n in (7, 31, 12, 64, 3)]
    alone = [_scorer("ref_loss", tiny_llama_dir, model=str(tiny_llama_dir), max_batch_tokens=1).score(_table([r]))[0] for r in rows]
    together = _scorer("ref_loss", tiny_llama_dir, model=str(tiny_llama_dir), max_batch_tokens=4096, logits_chunk=16).score(_table(rows))
    for r, a, b in zip(rows, alone, together):
        assert a.dtype == np.float32 and len(a) == len(r) and a[0] == 0.0
        np.testing.assert_allclose(a, _reference(tiny_llama_dir, r), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)  # padding and batch composition do not matter


def test_base_and_ref_use_their_own_models(tiny_llama_dir, tiny_llama_ref_dir):
    rows = [[1, 2, 3, 4, 5, 6, 7, 8]]
    base = _scorer("base_loss", tiny_llama_dir).score(_table(rows))[0]
    ref = _scorer("ref_loss", tiny_llama_dir, model=str(tiny_llama_ref_dir)).score(_table(rows))[0]
    assert not np.allclose(base, ref)
    info = registry.get("ref_loss")(registry.build_options("ref_loss", {"model": str(tiny_llama_ref_dir)}),
                                    ScorerContext(model=str(tiny_llama_dir))).info()
    assert info.model == str(tiny_llama_ref_dir) and info.revision.startswith("sha256:")


def test_missing_model_path_fails_before_loading(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        registry.get("ref_loss")(registry.build_options("ref_loss", {"model": str(tmp_path / "nope")}), ScorerContext(model="x"))


def _save_with_tokenizer(model, out, smol_tokenizer_dir):
    import shutil
    from pathlib import Path

    model.save_pretrained(out, safe_serialization=True)
    for item in Path(smol_tokenizer_dir).iterdir():
        shutil.copy(item, out / item.name)
    return out


@pytest.fixture(scope="module")
def tiny_softcapped_dir(tmp_path_factory, smol_tokenizer_dir):
    """A tiny random Gemma-2 (final-logit soft-capping, small cap so it matters) with SmolLM2's tokenizer."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, max_position_embeddings=512, final_logit_softcapping=0.5,
                          attn_logit_softcapping=None, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return _save_with_tokenizer(Gemma2ForCausalLM(config), tmp_path_factory.mktemp("tiny_gemma2"), smol_tokenizer_dir)


@pytest.fixture(scope="module")
def tiny_granite_dir(tmp_path_factory, smol_tokenizer_dir):
    """A tiny random Granite: its forward divides the logits by config.logits_scaling (0.125 here, so it matters)."""
    from transformers import GraniteConfig, GraniteForCausalLM

    torch.manual_seed(0)
    config = GraniteConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=512, logits_scaling=0.125, embedding_multiplier=2.0,
                           residual_multiplier=0.5, attention_multiplier=0.25, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return _save_with_tokenizer(GraniteForCausalLM(config), tmp_path_factory.mktemp("tiny_granite"), smol_tokenizer_dir)


@pytest.fixture(scope="module")
def tiny_cohere_dir(tmp_path_factory, smol_tokenizer_dir):
    """A tiny random Cohere: its forward multiplies the logits by config.logit_scale (8 here, so it matters)."""
    from transformers import CohereConfig, CohereForCausalLM

    torch.manual_seed(0)
    config = CohereConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=512, logit_scale=8.0, bos_token_id=1, eos_token_id=2,
                          pad_token_id=2)
    return _save_with_tokenizer(CohereForCausalLM(config), tmp_path_factory.mktemp("tiny_cohere"), smol_tokenizer_dir)


#: fixture -> (attention implementation, the transform data.token_loss must find)
FAMILIES = {
    "tiny_llama_dir": ("sdpa", {}),
    "tiny_softcapped_dir": ("eager", {"softcap": 0.5}),  # Gemma-2 has no sdpa path in transformers
    "tiny_granite_dir": ("sdpa", {"divide": 0.125}),
    "tiny_cohere_dir": ("sdpa", {"multiply": 8.0}),
}


@pytest.mark.parametrize("model_fixture", list(FAMILIES))
def test_stored_base_loss_is_the_trainers_per_token_loss(request, model_fixture):
    """annotate's base_loss on rows = train.forward.token_losses on the same rows packed = CE of the HF model's own
    logits (1e-5): each family's final-logit transform (Gemma-2's soft-cap, Granite's logits_scaling, Cohere's
    logit_scale) included."""
    from data.token_loss import LogitTransform, check_logit_transform, logit_transform
    from train.forward import token_losses

    model_dir = request.getfixturevalue(model_fixture)
    attn, transform = FAMILIES[model_fixture]
    rng = np.random.default_rng(1)
    rows = [rng.integers(3, 49152, size=n).tolist() for n in (9, 23, 5)]
    stored = _scorer("base_loss", model_dir, max_batch_tokens=4096, logits_chunk=7).score(_table(rows))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attn).eval()
    assert logit_transform(model) == LogitTransform(**transform)
    packed = torch.tensor([t for r in rows for t in r])
    positions = torch.tensor([p for r in rows for p in range(len(r))])
    loss_mask = positions > 0  # every token but each example's first is a target
    with torch.no_grad():
        trainer = token_losses(model, packed, positions, [len(r) for r in rows], loss_mask, chunk_size=5).numpy()
    np.testing.assert_allclose(np.concatenate([s[1:] for s in stored]), trainer, rtol=1e-5, atol=1e-5)
    # HF's own forward transforms its logits: the same losses.
    own = np.concatenate([_reference(model_dir, r)[1:] for r in rows])
    np.testing.assert_allclose(own, trainer, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.concatenate([s[1:] for s in stored]), own, rtol=1e-5, atol=1e-5)
    assert check_logit_transform(model, torch.tensor([rows[0]])) < 1e-4
    if transform:  # raw lm_head logits without the transform differ: the test means something
        with torch.no_grad():
            raw = [model.lm_head(model.model(torch.tensor([r])).last_hidden_state[0, :-1]) for r in rows]
            untransformed = torch.cat([torch.nn.functional.cross_entropy(l, torch.tensor(r[1:]), reduction="none") for l, r in zip(raw, rows)])
        assert np.abs(untransformed.numpy() - trainer).max() > 1e-3, "the transform must matter for this test to mean anything"


def test_an_unknown_final_logit_transform_is_refused(tiny_granite_dir, monkeypatch):
    from types import SimpleNamespace

    from transformers import LlamaConfig

    import data.token_loss as token_loss

    # A model type outside the known list that announces a transform: refused, naming the attribute.
    config = LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1)
    config.logit_scale = 2.0
    with pytest.raises(ValueError, match=r"model type 'llama' sets config.logit_scale = 2.0"):
        token_loss.logit_transform(SimpleNamespace(config=config))
    config.logit_scale = 1.0  # neutral values are no transform
    assert token_loss.logit_transform(SimpleNamespace(config=config)) == token_loss.IDENTITY
    assert token_loss.logit_transform(SimpleNamespace(config=SimpleNamespace(final_logit_softcapping=None))) == token_loss.IDENTITY
    # The start-up check against the model's own logits catches a transform the table gets wrong.
    model = AutoModelForCausalLM.from_pretrained(tiny_granite_dir, dtype=torch.float32).eval()
    monkeypatch.setattr(token_loss, "logit_transform", lambda m: token_loss.IDENTITY)
    with pytest.raises(ValueError, match="differ from sftgo's"):
        token_loss.check_logit_transform(model, torch.tensor([[5, 6, 7, 8]]))


def test_entropy_is_the_base_models_predictive_entropy_and_shares_its_pass(tiny_llama_dir):
    rows = [[5, 17, 300, 4000, 9], [11, 12, 13]]
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = []
        for ids in rows:
            logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
            entropy = -(logprobs.exp() * logprobs).sum(-1)
            expected.append(np.concatenate([[0.0], entropy[:-1].numpy()]))  # H before token t, from position t - 1
    alone = _scorer("entropy", tiny_llama_dir).score(_table(rows))
    for got, want in zip(alone, expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.log(49152) > max(a.max() for a in alone) > 0  # nats, below the uniform distribution's

    # base_loss and entropy of one model: one forward pass per batch gives both columns.
    base = _scorer("base_loss", tiny_llama_dir)
    passes = []
    base.model.base_model.register_forward_hook(lambda module, args, output: passes.append(1))
    both = base.score_columns(_table(rows), ["base_loss", "entropy"])
    assert len(passes) == 1
    for got, want in zip(both["entropy"], alone):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    for got, want in zip(both["base_loss"], _scorer("base_loss", tiny_llama_dir).score(_table(rows))):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_the_pipeline_hosts_base_loss_and_entropy_in_one_actor(tmp_path, lima_slice, tiny_llama_dir, tiny_llama_ref_dir):
    from annotate.config import AnnotateConfig
    from annotate.pipeline import prepare, share_groups

    config = AnnotateConfig(input=[str(lima_slice)], output=str(tmp_path / "out"), model=str(tiny_llama_dir),
                            scorers=["base_loss", "tfidf", "entropy", "ref_loss"],
                            scorer_options={"ref_loss": {"model": str(tiny_llama_ref_dir)}})
    assert share_groups(prepare(config)) == {"base_loss": ["base_loss", "entropy"], "tfidf": ["tfidf"], "ref_loss": ["ref_loss"]}


def test_a_model_actor_on_cpu_runs_its_share_of_the_cores_as_torch_threads(tiny_llama_dir):
    """Its share of the cluster's CPUs (the pipeline's cpu_share), capped by the CPUs Ray manages on its node
    (not the machine's core count: two `ray start --num-cpus 1` nodes on one machine get one thread each)."""
    import ray

    from annotate.pipeline import ScoreActor, cpu_threads

    assert [cpu_threads(2, 2.0), cpu_threads(4, 1.5), cpu_threads(1, 4.0), cpu_threads(8, 0.3), cpu_threads(8, 4.0)] == [2, 1, 1, 1, 4]
    before = torch.get_num_threads()
    ray.init(num_cpus=3, include_dashboard=False)
    try:
        context = ScorerContext(model=str(tiny_llama_dir), device="cpu")
        chosen = []
        for share in (6.0, 2.0, 0.5):
            ScoreActor("base_loss", registry.build_options("base_loss", {}), context, cpu_share=share)
            chosen.append(torch.get_num_threads())
        assert chosen == [3, 2, 1]
        # An explicit base_loss.threads wins over the share.
        ScoreActor("base_loss", registry.build_options("base_loss", {"threads": 1}), context, cpu_share=6.0)
        assert torch.get_num_threads() == 1
    finally:
        ray.shutdown()
        torch.set_num_threads(before)
