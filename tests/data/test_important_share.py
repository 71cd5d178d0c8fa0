"""The realised important share of a directory (data/shard_stats.realised_important_share) against the
grouping rule applied example by example (data/shard_stats.important_masks, training's rule)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from data.shard_stats import corpus_thresholds, important_masks, important_share_warning, realised_important_share, sample_examples
from tests.train.conftest import make_examples, write_annotated_dir


def count_by_rule(path, rho: float, scope: str, name: str) -> tuple[int, int]:
    """(important, trainable) tokens over every example, by important_masks."""
    examples = sample_examples(str(path), n=10_000)
    cuts = corpus_thresholds(str(path), rho) if scope == "corpus" else None
    important = trainable = 0
    for ex in examples:
        mask = np.asarray(ex["loss_mask"], bool)
        mask[0] = False
        important += int(np.sum(important_masks(ex, rho, scope, cuts)[name]))
        trainable += int(mask.sum())
    return important, trainable


@pytest.fixture(scope="module")
def point_mass_dir(tmp_path_factory):
    """LLMLingua-2-like scores: about half the trainable tokens score exactly 0."""
    examples = make_examples(300, ["llmlingua2"], seed=3, min_len=10, max_len=60)
    rng = np.random.default_rng(4)
    for ex in examples:
        values = ex["scores"]["llmlingua2"]
        values[rng.random(values.size) < 0.5] = 0.0
    path = tmp_path_factory.mktemp("point_mass")
    write_annotated_dir(path, examples, ["llmlingua2"], rows_per_shard=64)
    return path


@pytest.mark.parametrize("rho", [0.3, 0.4])
def test_corpus_share_is_one_minus_rho_with_a_point_mass_at_the_threshold(point_mass_dir, rho):
    sketch = realised_important_share(str(point_mass_dir), "llmlingua2", rho, "corpus")
    exact = realised_important_share(str(point_mass_dir), "llmlingua2", rho, "corpus", exact=True)
    assert sketch["share"] == pytest.approx(1 - rho, abs=0.005)
    assert exact["share"] == pytest.approx(1 - rho, abs=0.02)  # `score >= threshold` made it 100%
    assert not exact["differs"] and important_share_warning(exact) is None
    # The exact pass counts what the rule (viewer = training) marks, token for token.
    important, trainable = count_by_rule(point_mass_dir, rho, "corpus", "llmlingua2")
    assert (exact["important_tokens"], exact["tokens"]) == (important, trainable)


def test_sequence_share_counts_the_ceilings_of_short_responses(tmp_path):
    # Responses of 1-3 tokens: ceil(0.1 * n) = 1 each, so the share is far above 1 - rho = 0.1.
    examples = make_examples(50, ["tfidf"], seed=5, min_len=2, max_len=4)
    write_annotated_dir(tmp_path, examples, ["tfidf"])
    result = realised_important_share(str(tmp_path), "tfidf", 0.9, "sequence")
    counts = [int(np.asarray(ex["loss_mask"])[1:].sum()) for ex in examples]
    expected = sum(math.ceil(0.1 * n - 1e-9) for n in counts if n) / sum(counts)
    assert result["share"] == pytest.approx(expected) and result["tokens"] == sum(counts)
    assert (result["important_tokens"], result["tokens"]) == count_by_rule(tmp_path, 0.9, "sequence", "tfidf")
    assert result["differs"] and result["share"] > 0.5
    warning = important_share_warning(result)
    assert warning.startswith(f"realised important share {result['share']:.3f} differs from 1 - rho = 0.100")
    batch = realised_important_share(str(tmp_path), "tfidf", 0.9, "batch")
    assert batch["share"] == pytest.approx(0.1) and not batch["differs"]
    with pytest.raises(ValueError, match="no score"):
        realised_important_share(str(tmp_path), "llmlingua2", 0.9, "sequence")
