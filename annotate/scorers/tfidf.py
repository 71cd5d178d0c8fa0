"""TF-IDF importance: a token's score is the TF-IDF of its term within its example (scikit-learn).

The IDF is fitted over the whole corpus in a pass before scoring (``collect`` per shard on the
workers, ``combine`` on the driver, ``fit`` in every actor), never per batch. A document is one
example (all its tokens, prompt included). Terms are LM token ids by default; ``term: word`` uses
lower-cased words (``\\w+``) hashed into ``n_features`` buckets, mapped onto LM tokens by character
offsets (a token outside any word scores 0). Every occurrence of a term in an example gets the same
score, as the paper notes. Term frequencies are raw counts by default, as the paper's plain TF-IDF
(``sublinear_tf`` = 1 + log(tf) is an option); the IDF is sklearn's smoothed one.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import scipy.sparse as sp

from annotate.scorers import ScorerContext, register
from schemas.shard import INPUT_IDS, ScorerInfo

_WORD = re.compile(r"\w+", re.UNICODE)


@register
class TfidfScorer:
    """TF-IDF of each token (or word) in its example, IDF over the whole corpus (higher = more important)."""

    name = "tfidf"
    uses_gpu = False

    @dataclass
    class Options:
        term: str = "token"  # token | word
        norm: str = "l2"  # l2 | l1 | none: per-example normalisation (makes scores comparable across examples)
        # 1 + log(tf) instead of tf. Off by default: the paper's TF-IDF is raw counts with smoothed IDF (its Appendix H
        # finds function words at the top, as raw counts do). Our study found the top 10% of LIMA's tokens 89% newlines,
        # punctuation and " the" with raw counts, 43% with 1 + log(tf) (bench/results/study_lima_small): an option.
        sublinear_tf: bool = False
        n_features: int = 1 << 20  # word-level hashing buckets

    def __init__(self, options: Options, context: ScorerContext):
        if options.term not in ("token", "word"):
            raise ValueError(f"tfidf.term: {options.term!r} is not token or word")
        if options.norm not in ("l2", "l1", "none"):
            raise ValueError(f"tfidf.norm: {options.norm!r} is not l2, l1 or none")
        self.options = options
        self.context = context
        self.tokenizer = None
        self.transformer = None
        self.vocabulary: np.ndarray | None = None  # sorted term ids seen in the corpus

    def setup(self) -> None:
        # scikit-learn takes a second or more to import: here it overlaps the job's tokenizing; in fit() it
        # would hold up the first shard's scoring.
        from sklearn.feature_extraction.text import TfidfTransformer  # noqa: F401

        if self.options.term == "word":
            from data.models import load_tokenizer

            self.tokenizer = load_tokenizer(self.context.model, self.context.trust_remote_code,
                                            tokenizer_class=self.context.tokenizer_class)
            self.special_ids = np.asarray(self.tokenizer.all_special_ids, dtype=np.int64)

    def info(self) -> ScorerInfo:
        return ScorerInfo(self.name, model=None, revision=None, params=asdict(self.options))

    # -- terms ----------------------------------------------------------------------------------

    def _token_terms(self, input_ids: np.ndarray) -> np.ndarray:
        """The term of every LM token (-1 for a token outside any word, in word mode)."""
        if self.options.term == "token":
            return input_ids.astype(np.int64)
        from sklearn.utils import murmurhash3_32

        from data.render import token_offsets

        text, offsets = token_offsets(self.tokenizer, input_ids)
        terms = np.full(len(input_ids), -1, dtype=np.int64)
        starts = offsets[:, 0]
        ends = offsets[:, 1]
        # Template tokens (<|im_start|> ...) are not words: blank their text before finding words.
        special = np.isin(input_ids, self.special_ids)
        if special.any():
            chars = list(text)
            for s, e in offsets[special]:
                chars[s:e] = " " * (e - s)
            text = "".join(chars)
        for match in _WORD.finditer(text):
            term = murmurhash3_32(match.group().lower(), positive=True) % self.options.n_features
            inside = (starts < match.end()) & (ends > match.start())
            terms[inside] = term
        return terms

    def _batch_terms(self, batch: pa.Table) -> list[np.ndarray]:
        return [self._token_terms(np.asarray(ids, dtype=np.int64)) for ids in batch[INPUT_IDS].to_numpy(zero_copy_only=False)]

    # -- corpus pass ----------------------------------------------------------------------------

    def collect(self, batch: pa.Table) -> dict[str, Any]:
        """Document frequencies of this batch's terms: a part for :meth:`combine`."""
        per_doc = [np.unique(t[t >= 0]) for t in self._batch_terms(batch)]
        terms, df = np.unique(np.concatenate(per_doc) if per_doc else np.zeros(0, np.int64), return_counts=True)
        return {"n_docs": len(per_doc), "terms": terms, "df": df}

    @staticmethod
    def combine(parts: list[dict[str, Any]]) -> dict[str, Any]:
        """Sum document frequencies over every part of the corpus (any order gives the same result)."""
        terms = np.concatenate([p["terms"] for p in parts]) if parts else np.zeros(0, np.int64)
        df = np.concatenate([p["df"] for p in parts]) if parts else np.zeros(0, np.int64)
        vocabulary, inverse = np.unique(terms, return_inverse=True)
        return {"n_docs": int(sum(p["n_docs"] for p in parts)), "terms": vocabulary,
                "df": np.bincount(inverse, weights=df, minlength=len(vocabulary)).astype(np.int64)}

    def fit(self, state: dict[str, Any]) -> None:
        from sklearn.feature_extraction.text import TfidfTransformer

        norm = None if self.options.norm == "none" else self.options.norm
        self.transformer = TfidfTransformer(norm=norm, smooth_idf=True, sublinear_tf=self.options.sublinear_tf)
        # sklearn's smooth IDF, from corpus-wide document frequencies: ln((1 + n) / (1 + df)) + 1.
        self.transformer.idf_ = np.log((1.0 + state["n_docs"]) / (1.0 + state["df"])) + 1.0
        self.vocabulary = state["terms"]

    # -- scoring ----------------------------------------------------------------------------------

    def score(self, batch: pa.Table) -> list[np.ndarray]:
        if self.transformer is None or self.vocabulary is None:
            raise RuntimeError("tfidf: fit() must run (the corpus pass) before score()")
        terms = self._batch_terms(batch)
        rows, cols, columns = [], [], []
        for doc, t in enumerate(terms):
            known = t >= 0
            col = np.searchsorted(self.vocabulary, t[known])
            if np.any(col >= len(self.vocabulary)) or np.any(self.vocabulary[np.minimum(col, len(self.vocabulary) - 1)] != t[known]):
                raise ValueError("tfidf: a term was not seen in the corpus pass; the IDF must be fitted on this corpus")
            full = np.full(len(t), -1, dtype=np.int64)
            full[known] = col
            columns.append(full)
            rows.append(np.full(known.sum(), doc))
            cols.append(col)
        counts = sp.csr_matrix(
            (np.ones(sum(len(c) for c in cols)), (np.concatenate(rows) if rows else [], np.concatenate(cols) if cols else [])),
            shape=(len(terms), len(self.vocabulary)),
        )
        counts.sum_duplicates()  # term frequency within each example
        weights = self.transformer.transform(counts).tocsr()
        weights.sort_indices()
        # Every token's weight at once: (doc, term) keys of the nonzero weights ascend (rows in order, sorted
        # indices within each), so one searchsorted finds each token's entry.
        width = len(self.vocabulary)
        nonzero_keys = np.repeat(np.arange(len(terms), dtype=np.int64), np.diff(weights.indptr)) * width + weights.indices
        lengths = [len(c) for c in columns]
        token_cols = np.concatenate(columns) if columns else np.zeros(0, np.int64)
        token_docs = np.repeat(np.arange(len(columns), dtype=np.int64), lengths)
        values = np.zeros(len(token_cols), dtype=np.float32)
        known = token_cols >= 0
        keys = token_docs[known] * width + token_cols[known]
        at = np.minimum(np.searchsorted(nonzero_keys, keys), max(len(nonzero_keys) - 1, 0))
        found = nonzero_keys[at] == keys if len(nonzero_keys) else np.zeros(len(keys), bool)
        values[np.flatnonzero(known)[found]] = weights.data[at[found]]
        return np.split(values, np.cumsum(lengths)[:-1]) if columns else []
