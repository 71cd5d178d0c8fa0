"""Annotate job configuration: one dataclass holds every default and its help; YAML overrides it; the CLI overrides YAML.

The mechanism is data/config.py's, the one train uses: ``--config FILE`` (repeatable), then flags in
order. Key names are the same everywhere: YAML ``max_length`` is ``--max-length 256`` or
``max_length=256`` on the command line; ``--input a.jsonl b.jsonl`` takes several files; ``--strict``
stands alone; ``--scorer-option ref_loss.model=/path`` (repeatable) sets ``scorer_options``.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass
from typing import Any

from data import config as config_mechanism
from data.config import option
from data.formats import DEFAULT_MAX_RECORD_BYTES, FORMATS
from data.sources import COLUMNS, CONTAINERS, check_columns
from data.models import DEFAULT_MODEL
from schemas.shard import program

USAGE = [
    f"usage: {program('python annotate/run.py')} [--config FILE ...] [--KEY VALUE ...] [--list-scorers]",
    "",
    "Tokenize instruction corpora with a model's chat template and write Parquet shards of token ids, loss masks",
    "and per-token importance scores (shard schema v2). Every option is also a YAML key (--max-length is max_length);",
    "flags override --config. --list-scorers prints the registered scorers with their options and exits.",
    "",
    "examples:",
    "  python annotate/run.py --input ../shared/data/lima/train.jsonl --format lima --scorers tfidf,base_loss --output shards/lima",
    "  python annotate/run.py --output shards/lima --add-scorers ref_loss --scorer-option ref_loss.model=/path/to/reference",
    "  ray job submit --working-dir . -- python annotate/run.py --config my_annotate.yaml",
]


@dataclass
class AnnotateConfig:
    input: list[str] = option(factory=list, help="corpus files or folders: JSONL, a JSON array, CSV, TSV, Parquet (a file, or a folder of one split as the Hugging Face Hub stores it), a datasets save_to_disk folder (Arrow)")
    output: str = option("", "the annotated directory (shards, _manifest.json, _rejects.jsonl, _README.md)")
    format: str = option("auto", f"the record layout: auto (recognised from the first record's fields, after --columns) or one of {', '.join(FORMATS)}")
    columns: dict[str, str] = option(factory=dict, help=f"the layout's fields read from your columns, FIELD=COLUMN,... (e.g. instruction=Question,output='Best Answer'); fields: {', '.join(COLUMNS)}; in YAML a mapping")
    container: str = option("auto", f"the file container: auto (from the file name, the folder layout and the first bytes) or one of {', '.join(CONTAINERS)}")
    model: str = option(DEFAULT_MODEL, "HF id, local folder, or embedded name: tokenizer + chat template, base model for base_loss")
    scorers: list[str] = option(factory=lambda: ["tfidf"], help="comma-separated scorers: tfidf, llmlingua2, ref_loss, base_loss, entropy, given (--list-scorers)")
    scorer_options: dict[str, dict[str, Any]] = option(factory=dict, flag="scorer-option", help="per-scorer options {scorer: {option: value}}; on the command line --scorer-option SCORER.KEY=VALUE (repeatable)")
    add_scorers: list[str] = option(factory=list, help="add score columns to the existing annotated output without re-tokenizing; refuses another tokenizer")
    system_prompt: str = option("default", "the system turn: default (the chat template's own behaviour: SmolLM2's adds its 'You are a helpful AI assistant named SmolLM' turn to every example), none (no system turn: the one a template adds by itself is cut off; templates that cannot do without it are refused), or any other text (the system message of every record without one); a record's own system message is always kept; recorded in the manifest, the card and the tokenizer fingerprint, and the trainer's data.system_prompt must match it")
    max_length: int = option(4096, "tokens per example")
    overlength: str = option("truncate", "truncate (counted in the manifest's totals.truncated) or drop (a reject)")
    shard_size: int = option(1000, "input records per shard: the unit of work, of resume and of files")
    limit: int = option(0, "only the first N records of each input file (0 = all)")
    strict: bool = option(False, "stop at the first bad record instead of rejecting it")
    max_record_bytes: int = option(DEFAULT_MAX_RECORD_BYTES, "a record (JSONL line or JSON array item) longer than this is rejected as record_too_large without being read whole (JSON arrays are parsed whole: keep huge corpora in JSON lines)")
    tokenize_actors: int = option(0, "tokenizer actors; 0 = auto (one per CPU, at most one per shard); more than the CPUs left by the score actors hold is refused at start")
    scorer_actors: int = option(0, "actors per scorer; 0 = auto (model scorers: one per GPU, llmlingua2: llmlingua2.actors_per_gpu per GPU, else one; tfidf: the CPUs over the scorers); more than the cluster's GPUs (or CPUs) hold is refused at start")
    ray_address: str = option("", "a Ray cluster; '' = RAY_ADDRESS or a new local Ray; auto = an existing cluster")
    trust_remote_code: bool = option(False, "allow a model folder whose config asks for code shipped with it (auto_map); off: such a model is refused before any job starts (scorer models have their own base_loss.trust_remote_code / ref_loss.trust_remote_code)")
    license: list[str] = option(factory=list, help="the corpus license(s) as you know them (e.g. cc-by-nc-sa-4.0), for the dataset card: one for all inputs, or one per input")

    def validate(self) -> None:
        """Check option values; raise ValueError naming the option."""
        problems = []
        adding = bool(self.add_scorers)
        if not adding and not self.input:
            problems.append("input: give at least one corpus file (--input)")
        if not self.output:
            problems.append("output: give the annotated directory to write (--output)")
        if self.format in CONTAINERS:
            problems.append(f"format: {self.format!r} is a file container, recognised from the file (or --container "
                            f"{self.format}); --format names the record layout: auto, {', '.join(FORMATS)}")
        elif self.format not in ("auto", *FORMATS):
            problems.append(f"format: {self.format!r} is not one of auto, {', '.join(FORMATS)}")
        if self.container not in ("auto", *CONTAINERS):
            problems.append(f"container: {self.container!r} is not one of auto, {', '.join(CONTAINERS)}")
        problems.extend(check_columns(self.columns))
        if self.overlength not in ("truncate", "drop"):
            problems.append(f"overlength: {self.overlength!r} is not truncate or drop")
        if not self.system_prompt.strip():
            problems.append("system_prompt: empty; give default, none or the system text")
        if adding and self.system_prompt != "default":
            problems.append("system_prompt: --add-scorers keeps the existing rendering (its manifest records the choice); leave --system-prompt out")
        if self.max_length < 2:
            problems.append(f"max_length: {self.max_length} must be at least 2")
        if self.shard_size < 1:
            problems.append(f"shard_size: {self.shard_size} must be at least 1")
        if self.max_record_bytes < 1:
            problems.append(f"max_record_bytes: {self.max_record_bytes} must be at least 1")
        if self.limit < 0:
            problems.append(f"limit: {self.limit} must be >= 0")
        names = self.add_scorers if adding else self.scorers
        if not names:
            problems.append(f"{'add_scorers' if adding else 'scorers'}: names no scorer; --list-scorers shows them")
        if len(set(names)) != len(names):
            problems.append(f"{'add_scorers' if adding else 'scorers'}: {names} lists a scorer twice")
        if self.license and not adding and len(self.license) not in (1, len(self.input)):
            problems.append(f"license: {len(self.license)} values for {len(self.input)} inputs; give one for all, or one per input")
        for path in self.input:
            if not os.path.exists(path):
                problems.append(f"input: {path} does not exist")
        if problems:
            raise ValueError("invalid annotate config:\n  " + "\n  ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def help_text() -> str:
    """``--help``: usage, then every key with its type, default and meaning (the README table's source too)."""
    return config_mechanism.help_text(AnnotateConfig, USAGE, flags=True)


def markdown_reference() -> str:
    """The README's annotate option table: the same keys, defaults and help as ``--help``."""
    return config_mechanism.markdown_reference(AnnotateConfig, flags=True)


def load_config(argv: list[str] | None = None) -> tuple[AnnotateConfig, bool]:
    """Defaults <- ``--config`` YAML files <- flags, and whether ``--list-scorers`` was given.

    Raises ConfigError (a ValueError) naming every unknown key (with the file it came from and the
    nearest known key) and every badly typed value. Values are range-checked by ``validate``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    list_scorers = "--list-scorers" in argv
    argv = [arg for arg in argv if arg != "--list-scorers"]
    return config_mechanism.load(AnnotateConfig, argv, what="annotate", help=help_text), list_scorers
