"""TF-IDF scorer: equals scikit-learn's TfidfVectorizer fitted on the whole corpus, however the corpus is split."""

import numpy as np
import pyarrow as pa
import pytest
from sklearn.feature_extraction.text import TfidfVectorizer

from annotate import scorers as registry
from annotate.scorers import ScorerContext
from data.formats import read_lima
from data.render import render
from schemas.shard import INPUT_IDS, LOSS_MASK
from tests.conftest import LIMA


def _corpus_table(tokenizer, n=12):
    import json

    rows = []
    for line in LIMA.read_text().splitlines()[:n]:
        r = render(tokenizer, read_lima(json.loads(line)))
        rows.append(r)
    return pa.table({INPUT_IDS: pa.array([r.input_ids for r in rows], pa.list_(pa.int32())),
                     LOSS_MASK: pa.array([r.loss_mask for r in rows], pa.list_(pa.bool_()))})


def _scorer(tokenizer_dir, **options):
    cls = registry.get("tfidf")
    scorer = cls(registry.build_options("tfidf", options), ScorerContext(model=str(tokenizer_dir)))
    scorer.setup()
    return scorer


@pytest.mark.parametrize("sublinear_tf", [False, True], ids=["raw_tf(default, the paper's)", "sublinear_tf"])
def test_token_tfidf_equals_sklearn_whole_corpus_fit(smol_tokenizer, smol_tokenizer_dir, sublinear_tf):
    table = _corpus_table(smol_tokenizer)
    scorer = _scorer(smol_tokenizer_dir, sublinear_tf=True) if sublinear_tf else _scorer(smol_tokenizer_dir)
    assert scorer.options.sublinear_tf is sublinear_tf
    # The corpus pass in three uneven parts (as three workers would) ...
    parts = [scorer.collect(table.slice(0, 5)), scorer.collect(table.slice(5, 1)), scorer.collect(table.slice(6))]
    scorer.fit(type(scorer).combine(parts))
    scores = scorer.score(table.slice(3, 4))  # ... and scoring one batch of it.

    docs = [list(map(str, ids)) for ids in table[INPUT_IDS].to_pylist()]
    reference = TfidfVectorizer(analyzer=lambda d: d, norm="l2", smooth_idf=True, sublinear_tf=sublinear_tf)
    matrix = reference.fit_transform(docs)
    for k, doc_scores in enumerate(scores):
        doc = 3 + k
        row = matrix.getrow(doc).toarray()[0]
        expected = np.array([row[reference.vocabulary_[t]] for t in docs[doc]], dtype=np.float32)
        assert len(doc_scores) == len(docs[doc])
        np.testing.assert_allclose(doc_scores, expected, rtol=1e-6, atol=1e-7)
    # Every occurrence of a term in an example gets the same score.
    ids = np.asarray(docs[3])
    first = scores[0][ids == ids[0]]
    assert np.all(first == first[0])


def test_word_level_terms_map_to_tokens(smol_tokenizer, smol_tokenizer_dir):
    table = _corpus_table(smol_tokenizer, n=6)
    scorer = _scorer(smol_tokenizer_dir, term="word")
    scorer.fit(type(scorer).combine([scorer.collect(table)]))
    scores = scorer.score(table.slice(0, 1))[0]
    ids = table[INPUT_IDS].to_pylist()[0]
    tokens = smol_tokenizer.convert_ids_to_tokens(ids)
    assert scores.dtype == np.float32 and len(scores) == len(ids) and np.isfinite(scores).all()
    # Special tokens are outside any word: score 0. Word pieces of one word share its score.
    assert all(s == 0.0 for s, t in zip(scores, tokens) if t in ("<|im_start|>", "<|im_end|>"))
    assert (scores > 0).mean() > 0.5


def test_bad_options_fail_clearly(smol_tokenizer_dir):
    import pytest

    with pytest.raises(ValueError, match="tfidf.term"):
        registry.get("tfidf")(registry.build_options("tfidf", {"term": "char"}), ScorerContext(model="x"))
    with pytest.raises(ValueError, match="unknown option"):
        registry.build_options("tfidf", {"terms": "word"})
    with pytest.raises(ValueError, match="unknown scorer 'tf_idf'"):
        registry.get("tf_idf")
