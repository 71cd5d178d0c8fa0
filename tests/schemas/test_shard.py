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


def _manifest(stats, scorers=()):
    from schemas.shard import Manifest

    return Manifest(2, {"name": "t", "sha256": "x"}, list(scorers), [], {}, {}, stats, {})


def test_score_spread_problem_reads_the_exact_min_and_max():
    from schemas.shard import score_spread_problem

    rng = np.random.default_rng(0)
    base = rng.random(500).astype(np.float32) * 4
    # Two shards merged: min and max stay exact, so a constant score is told apart from a narrow one.
    spread = merge_summaries([summarize_scores(base[:200]), summarize_scores(base[200:])])
    flat = merge_summaries([summarize_scores(np.zeros(200)), summarize_scores(np.zeros(300))])
    narrow = merge_summaries([summarize_scores(np.full(300, 2.0)), summarize_scores(np.array([2.0, 2.001]))])
    m = _manifest({"tfidf": spread, EXCESS_LOSS: flat, "base_loss": narrow})
    assert score_spread_problem(m, "tfidf") is None and score_spread_problem(m, "base_loss") is None
    problem = score_spread_problem(m, EXCESS_LOSS, "shards/lima")
    assert problem == ("importance.scorer: 'excess_loss' has no spread in shards/lima: 0 on all 500 trainable tokens, so "
                       "its important / unimportant groups (or weights) would be arbitrary; likely cause: ref_loss was "
                       "computed with the base model itself (excess_loss of a model against itself); re-annotate with "
                       "--add-scorers ref_loss --scorer-option ref_loss.model=REFERENCE (another model)")
    tied = _manifest({"entropy": merge_summaries([summarize_scores(np.full(40, 3.25))])})
    assert "'entropy' has no spread in the data: 3.25 on all 40" in score_spread_problem(tied, "entropy")
    assert score_spread_problem(_manifest({}), "tfidf") is None  # no statistics: other checks name that


def test_excess_loss_of_a_model_against_itself_is_named_from_the_metadata():
    """bf16 or another batching leaves rounding noise in base - ref: the scorer metadata still tells."""
    from schemas.shard import ScorerInfo, score_spread_problem

    noise = merge_summaries([summarize_scores(np.random.default_rng(1).normal(0, 0.02, 300))])
    same = [ScorerInfo("base_loss", "models/base/", "sha256:ab"), ScorerInfo("ref_loss", "models/base", "sha256:ab")]
    problem = score_spread_problem(_manifest({EXCESS_LOSS: noise}, same), EXCESS_LOSS, "d")
    assert problem.startswith("importance.scorer: excess_loss in d is 0 up to rounding: ref_loss and base_loss were "
                              "computed with the same model (models/base, revision sha256:ab)")
    other = [ScorerInfo("base_loss", "models/base", "sha256:ab"), ScorerInfo("ref_loss", "runs/sft/model", "sha256:ab")]
    assert score_spread_problem(_manifest({EXCESS_LOSS: noise}, other), EXCESS_LOSS) is None
