"""Annotate job configuration: one dataclass holds every default; YAML overrides it; the CLI overrides YAML.

Key names are the same everywhere: YAML ``max_length`` is CLI ``--max-length``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from data.formats import DEFAULT_MAX_RECORD_BYTES, FORMATS
from data.models import DEFAULT_MODEL


@dataclass
class AnnotateConfig:
    input: list[str] = field(default_factory=list)  # corpus files (JSONL or a JSON array)
    output: str = ""  # annotated directory (shards, _manifest.json, _rejects.jsonl, _README.md)
    format: str = "auto"  # auto | alpaca | lima | messages | sharegpt | text
    model: str = DEFAULT_MODEL  # tokenizer + chat template (and base model for base_loss)
    scorers: list[str] = field(default_factory=lambda: ["tfidf"])
    scorer_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # {scorer: {option: value}}
    add_scorers: list[str] = field(default_factory=list)  # add columns to an existing `output`
    max_length: int = 4096  # tokens per example
    overlength: str = "truncate"  # truncate | drop (counted as rejects either way? drop: yes; truncate: counted)
    shard_size: int = 1000  # input records per shard (the unit of work, of resume and of files)
    limit: int = 0  # read only the first N records of each input file (0 = all)
    strict: bool = False  # stop at the first bad record instead of rejecting it
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES  # a longer JSONL line / array item is rejected unread
    tokenize_actors: int = 0  # 0 = auto (one per two CPUs, at least one)
    scorer_actors: int = 0  # per scorer; 0 = auto (one per GPU when the cluster has GPUs, else one)
    ray_address: str = ""  # "" = RAY_ADDRESS or a new local Ray; "auto" = an existing cluster
    trust_remote_code: bool = False  # allow a --model folder that asks for its own code (auto_map)
    license: list[str] = field(default_factory=list)  # the corpus license(s) as you give them: one for all inputs, or one per input

    def validate(self) -> None:
        """Check option values; raise ValueError naming the option."""
        problems = []
        adding = bool(self.add_scorers)
        if not adding and not self.input:
            problems.append("input: give at least one corpus file (--input)")
        if not self.output:
            problems.append("output: give the annotated directory to write (--output)")
        if self.format not in ("auto", *FORMATS):
            problems.append(f"format: {self.format!r} is not one of auto, {', '.join(FORMATS)}")
        if self.overlength not in ("truncate", "drop"):
            problems.append(f"overlength: {self.overlength!r} is not truncate or drop")
        if self.max_length < 2:
            problems.append(f"max_length: {self.max_length} must be at least 2")
        if self.shard_size < 1:
            problems.append(f"shard_size: {self.shard_size} must be at least 1")
        if self.max_record_bytes < 1:
            problems.append(f"max_record_bytes: {self.max_record_bytes} must be at least 1")
        if self.limit < 0:
            problems.append(f"limit: {self.limit} must be >= 0")
        names = self.add_scorers if adding else self.scorers
        if len(set(names)) != len(names):
            problems.append(f"{'add_scorers' if adding else 'scorers'}: {names} lists a scorer twice")
        if self.license and not adding and len(self.license) not in (1, len(self.input)):
            problems.append(f"license: {len(self.license)} values for {len(self.input)} inputs; give one for all, or one per input")
        for path in self.input:
            if not os.path.isfile(path):
                problems.append(f"input: {path} does not exist or is not a file")
        if problems:
            raise ValueError("invalid annotate config:\n  " + "\n  ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _split_list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _parse_scalar(text: str) -> Any:
    return yaml.safe_load(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python annotate/run.py",
        description="Tokenize instruction corpora with a model's chat template and write Parquet shards "
        "of token ids, loss masks and per-token importance scores (shard schema v2). "
        "Every option is also a YAML key (--max-length is max_length); CLI flags override --config.",
        epilog="examples:\n"
        "  python annotate/run.py --input ../shared/data/lima/train.jsonl --format lima --scorers tfidf,base_loss --output shards/lima\n"
        "  python annotate/run.py --output shards/lima --add-scorers ref_loss --scorer-option ref_loss.model=/path/to/reference\n"
        "  ray job submit --working-dir . -- python annotate/run.py --config my_annotate.yaml",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = AnnotateConfig()
    p.add_argument("--config", help="YAML file with any of the keys below (CLI flags override it)")
    p.add_argument("--input", nargs="+", help="corpus files: JSONL or one JSON array")
    p.add_argument("--output", help="annotated directory to write")
    p.add_argument("--format", help=f"corpus format: auto or one of {', '.join(FORMATS)} (default {d.format})")
    p.add_argument("--model", help=f"HF id, local folder, or an embedded name (default {d.model})")
    p.add_argument("--scorers", type=_split_list, help=f"comma-separated scorers (default {','.join(d.scorers)}); see --list-scorers")
    p.add_argument("--scorer-option", action="append", default=[], metavar="SCORER.KEY=VALUE",
                   help="a scorer option, e.g. ref_loss.model=/path or tfidf.term=word (repeatable)")
    p.add_argument("--add-scorers", type=_split_list,
                   help="add these score columns to the existing annotated --output, without re-tokenizing")
    p.add_argument("--max-length", type=int, help=f"tokens per example (default {d.max_length})")
    p.add_argument("--overlength", choices=["truncate", "drop"], help=f"what to do past --max-length (default {d.overlength})")
    p.add_argument("--shard-size", type=int, help=f"input records per shard (default {d.shard_size})")
    p.add_argument("--limit", type=int, help="only the first N records of each input file (default 0 = all)")
    p.add_argument("--strict", action="store_true", default=None, help="stop at the first bad record instead of rejecting it (default off)")
    p.add_argument("--max-record-bytes", type=int,
                   help=f"reject a record (JSONL line or JSON array item) longer than this without reading it whole (default {d.max_record_bytes:,})")
    p.add_argument("--tokenize-actors", type=int, help="tokenizer actors (default auto)")
    p.add_argument("--scorer-actors", type=int, help="actors per scorer (default auto)")
    p.add_argument("--ray-address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--trust-remote-code", action="store_true", default=None,
                   help="allow a --model folder whose config asks for code shipped with it (auto_map); off: such a model is refused (default off)")
    p.add_argument("--license", type=_split_list, metavar="ID[,ID...]",
                   help="the corpus license as you know it (e.g. cc-by-nc-sa-4.0), for the dataset card: one for all inputs, or one per input")
    p.add_argument("--list-scorers", action="store_true", help="print the registered scorers and exit")
    return p


def load_config(argv: list[str] | None = None) -> tuple[AnnotateConfig, argparse.Namespace]:
    """Defaults <- YAML (--config) <- CLI flags. Unknown YAML keys are errors that name the file."""
    args = build_parser().parse_args(argv)
    values: dict[str, Any] = {}
    known = {f.name for f in dataclasses.fields(AnnotateConfig)}
    if args.config:
        with open(args.config, encoding="utf-8") as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{args.config}: expected a mapping of option: value")
        unknown = sorted(set(loaded) - known)
        if unknown:
            raise ValueError(f"{args.config}: unknown option(s) {unknown}; known: {sorted(known)}")
        values.update(loaded)
        for key in ("scorers", "add_scorers", "input", "license"):
            if isinstance(values.get(key), str):
                values[key] = _split_list(values[key]) if key not in ("input", "license") else [values[key]]
    for key in known - {"scorer_options"}:
        value = getattr(args, key, None)
        if value is not None:
            values[key] = value
    options: dict[str, dict[str, Any]] = {k: dict(v) for k, v in (values.get("scorer_options") or {}).items()}
    for item in args.scorer_option:
        name_key, sep, raw = item.partition("=")
        scorer, dot, key = name_key.partition(".")
        if not sep or not dot or not scorer or not key:
            raise ValueError(f"--scorer-option {item!r}: expected SCORER.KEY=VALUE, e.g. ref_loss.model=/path")
        options.setdefault(scorer, {})[key] = _parse_scalar(raw)
    values["scorer_options"] = options
    return AnnotateConfig(**values), args
