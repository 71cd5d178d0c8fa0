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
    alone = [_scorer("ref_loss", tiny_llama_dir, max_batch_tokens=1).score(_table([r]))[0] for r in rows]
    together = _scorer("ref_loss", tiny_llama_dir, max_batch_tokens=4096, logits_chunk=16).score(_table(rows))
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
