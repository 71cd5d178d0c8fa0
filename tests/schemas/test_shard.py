"""Schema v1 helpers: column names, fingerprint, quantile sketch."""

import numpy as np

from schemas.shard import (
    EXCESS_LOSS,
    arrow_schema,
    ceil_count,
    example_id,
    merge_summaries,
    quantile_from_summary,
    score_column,
    score_names,
    scorer_of_column,
    summarize_scores,
    tokenizer_fingerprint,
)


def test_score_columns_round_trip():
    assert score_column("tfidf") == "score_tfidf"
    assert scorer_of_column("score_tfidf") == "tfidf"
    assert scorer_of_column("input_ids") is None
    assert arrow_schema(["tfidf"]).names == ["id", "source", "input_ids", "loss_mask", "score_tfidf"]
    assert score_names(["tfidf", "base_loss", "ref_loss"])[-1] == EXCESS_LOSS
    assert EXCESS_LOSS not in score_names(["tfidf", "ref_loss"])


def test_example_id_is_content_derived():
    a = [{"role": "user", "content": "x"}]
    assert example_id(a) == example_id([{"content": "x", "role": "user"}])
    assert example_id(a) != example_id([{"role": "user", "content": "y"}])


def test_ceil_count_is_robust_to_float_error():
    assert ceil_count(1 - 0.7, 10) == 3
    assert ceil_count(0.25, 10) == 3
    assert ceil_count(1.0, 7) == 7


def test_quantile_sketch_merge_matches_exact_quantiles():
    rng = np.random.default_rng(0)
    parts = [rng.gamma(2.0, size=n) for n in (5000, 20000, 300)]
    merged = merge_summaries(summarize_scores(p) for p in parts)
    everything = np.concatenate(parts)
    assert merged["count"] == everything.size
    assert np.isclose(merged["mean"], everything.mean())
    for rho in (0.1, 0.5, 0.7, 0.9, 0.99):
        estimate = quantile_from_summary(merged, rho)
        # Rank error of the estimate: within 0.2% of the data.
        assert abs((everything <= estimate).mean() - rho) < 2e-3
    assert sum(merged["histogram"]["counts"]) in range(everything.size - 60, everything.size + 60)


def test_tokenizer_fingerprint_changes_with_template(smol_tokenizer):
    fp = tokenizer_fingerprint(smol_tokenizer)
    original = smol_tokenizer.chat_template
    try:
        smol_tokenizer.chat_template = original + " "
        assert tokenizer_fingerprint(smol_tokenizer)["sha256"] != fp["sha256"]
    finally:
        smol_tokenizer.chat_template = original
    assert tokenizer_fingerprint(smol_tokenizer) == fp
