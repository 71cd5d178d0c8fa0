"""Scorer registry. Adding a scorer = adding one file in this package with one registered class.

A scorer class follows :class:`Scorer`: it is built once per Ray actor from its options, loads its
models in ``setup()``, and turns a batch of rows (an Arrow table with the shard's ``input_ids`` and
``loss_mask`` columns) into one float32 array per row, aligned with ``input_ids``. Higher = more
important. The Ray plumbing (annotate/pipeline.py) only ever uses this interface.

A scorer that needs statistics over the whole corpus before it can score (TF-IDF's IDF) also has
``collect(batch) -> part``, ``combine(parts) -> state`` (a staticmethod) and ``fit(state)``; the
pipeline runs ``collect`` over every shard, ``combine`` on the driver, then ``fit`` in every actor.

Scorers that can share one model pass (base_loss and entropy of the same model) have
``share_key() -> hashable`` (equal keys: one actor, one forward pass) and
``score_columns(batch, names) -> {name: arrays}``; the pipeline hosts such a group in one actor.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import pyarrow as pa

from schemas.shard import ScorerInfo


@dataclass(frozen=True)
class ScorerContext:
    """What every scorer may know about the job: the LM whose tokens it scores, and the device."""

    model: str  # name or path of the LM (its tokenizer produced input_ids; base model for base_loss)
    device: str = "cpu"  # "cuda" when the actor holds a GPU
    trust_remote_code: bool = False  # the job's --trust-remote-code: its model may ship its own code
    tokenizer_class: str = ""  # the class AutoTokenizer chose for ``model`` (data.models.load_tokenizer)
    cpu_threads: int = 0  # on CPU, torch threads: the actor's share of the cluster's CPUs, at most its node's (0 = every core)


@runtime_checkable
class Scorer(Protocol):
    name: ClassVar[str]
    Options: ClassVar[type]  # a dataclass of the scorer's options (defaults visible there)

    def __init__(self, options: Any, context: ScorerContext) -> None: ...

    def setup(self) -> None:
        """Load models and tokenizers; called once per actor, on the worker."""

    def score(self, batch: pa.Table) -> list[np.ndarray]:
        """One float32 array per row of ``batch``, each as long as that row's input_ids."""

    def info(self) -> ScorerInfo:
        """Name, model, revision and parameters, stored in shard metadata and the manifest."""


_REGISTRY: dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator: make a scorer available under ``cls.name``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"two scorers named {cls.name!r}: {_REGISTRY[cls.name]} and {cls}")
    _REGISTRY[cls.name] = cls
    return cls


def _load_all() -> None:
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


def available() -> list[str]:
    """Names of every registered scorer."""
    _load_all()
    return sorted(_REGISTRY)


def get(name: str) -> type:
    """The scorer class registered as ``name``; a clear error listing the known ones otherwise."""
    _load_all()
    if name not in _REGISTRY:
        raise ValueError(f"unknown scorer {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def build_options(name: str, raw: dict[str, Any] | None) -> Any:
    """The scorer's Options dataclass from a dict, rejecting unknown keys by name."""
    cls = get(name)
    raw = dict(raw or {})
    known = {f.name for f in dataclasses.fields(cls.Options)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for scorer {name!r}; known: {sorted(known)}")
    return cls.Options(**raw)


def needs_corpus_pass(name: str) -> bool:
    """True for scorers that must see the whole corpus (collect/combine/fit) before scoring."""
    return hasattr(get(name), "collect")
