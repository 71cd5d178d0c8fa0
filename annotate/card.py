"""The dataset card of an annotated directory: ``_README.md``, Hugging Face format (YAML front matter).

    python -m annotate.card DIR     # (re)write the card of a finished directory, e.g. a migrated v1 one

Annotate writes it at every finalize (so --add-scorers updates it), from the manifest and the
shards' ``source`` column: what the rows came from (inputs, format, licenses as given), the model
whose tokenizer and chat template rendered them, each scorer with its model and options, and row /
token / reject counts. Its name starts with ``_`` so pyarrow's discovery skips it; on the Hugging
Face Hub, upload it as ``README.md``.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from data.render import describe_system_prompt
from schemas.shard import (CARD_NAME, REJECTS_NAME, SHARD_GLOB, SOURCE, SYSTEM_PROMPT_DEFAULT, Manifest, arrow_schema,
                          atomic_write_text, scorer_variant, system_prompt_of)


_HF_DTYPES = {"float": "float32", "double": "float64", "halffloat": "float16"}  # Arrow's names -> the Hub's


def _hf_feature(name: str, kind: pa.DataType) -> dict[str, str]:
    """One column in the Hub's ``dataset_info.features`` notation (``list: int32`` for a list column)."""
    if pa.types.is_list(kind):
        return {"name": name, "list": _HF_DTYPES.get(str(kind.value_type), str(kind.value_type))}
    return {"name": name, "dtype": _HF_DTYPES.get(str(kind), str(kind))}


def source_counts(directory: str | Path, manifest: Manifest) -> dict[str, int]:
    """Rows per value of the ``source`` column, over the manifest's shards (reads that column only)."""
    counts: Counter[str] = Counter()
    for entry in manifest.shards:
        column = pq.read_table(Path(directory) / entry.path, columns=[SOURCE])[SOURCE]
        counts.update(column.to_pylist())
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def dataset_card(manifest: Manifest, sources: dict[str, int]) -> str:
    """The card's text: YAML front matter the Hub and ``huggingface_hub.DatasetCard`` read, then prose."""
    config = manifest.config or {}
    inputs = [str(p) for p in config.get("input", [])]
    licenses = list(config.get("license") or [])
    per_input = licenses * len(inputs) if len(licenses) == 1 else licenses
    distinct = sorted(set(licenses))
    schema = arrow_schema(manifest.scorer_names)
    front: dict[str, Any] = {}
    if len(distinct) == 1:
        front["license"] = distinct[0]
    elif distinct:
        front["license"] = "other"
        front["license_details"] = "several corpora: " + ", ".join(distinct)
    front["tags"] = ["sftgo", "token-importance", "sft"] + [f"score-{name}" for name in manifest.scorer_names]
    front["configs"] = [{"config_name": "default", "data_files": [{"split": "train", "path": SHARD_GLOB}]}]
    front["dataset_info"] = {
        "features": [_hf_feature(field.name, field.type) for field in schema],
        "splits": [{"name": "train", "num_examples": int(manifest.totals.get("rows", 0))}],
    }
    totals = manifest.totals
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "",
             "# Annotated instruction data (sftgo)", "",
             "Token ids, trainable-token mask and per-token importance scores, one row per example, written by "
             "`sftgo annotate` for token-importance fine-tuning (SFT-GO, Rho-1, ...). Columns: `id` (sha256 of the "
             "example's messages), `source`, `input_ids`, `loss_mask` (assistant tokens), and one `score_<scorer>` "
             "list per scorer, aligned with `input_ids`.", "",
             "## Sources", ""]
    if inputs:
        lines += ["| input | format | license (as given) |", "|---|---|---|"]
        for index, path in enumerate(inputs):
            license_text = per_input[index] if index < len(per_input) else "not given"
            lines.append(f"| `{path}` | {config.get('format', '?')} | {license_text} |")
    else:
        lines.append("Inputs not recorded.")
    if sources:
        lines += ["", "Rows by `source` column: " + ", ".join(f"`{name}` {count:,}" for name, count in sources.items()) + "."]
    tokenizer = manifest.tokenizer
    lines += ["", "## Tokenizer", "",
              f"Rendered with the chat template of `{config.get('model', tokenizer.get('name'))}`; tokenizer fingerprint "
              f"`{tokenizer.get('name')}:{tokenizer.get('sha256')}` (vocabulary, special tokens and chat template). "
              f"max_length {config.get('max_length', '?')}, overlength `{config.get('overlength', '?')}`.", "",
              f"System prompt: {system_prompt_line(manifest.system_prompt or {'choice': system_prompt_of(tokenizer)})} "
              f"(annotate `--system-prompt`; train with `data.system_prompt` set to the same choice).", "",
              "## Scorers", "", "| scorer | column | model | options |", "|---|---|---|---|"]
    for scorer in manifest.scorers:
        options = ", ".join(f"{k}={v!r}" for k, v in sorted(scorer.params.items())) or "-"
        lines.append(f"| {scorer.name} | `score_{scorer.name}` | {scorer.model or '-'} | {options} |")
    variants = [f"{scorer.name}: {variant}." for scorer in manifest.scorers if (variant := scorer_variant(scorer))]
    if variants:
        lines += [""] + variants
    rejected = manifest.rejected
    reasons = ", ".join(f"{reason} {count:,}" for reason, count in rejected.items())
    lines += ["", "## Counts", "",
              f"{totals.get('rows', 0):,} rows, {totals.get('tokens', 0):,} tokens ({totals.get('trainable_tokens', 0):,} trainable), "
              f"{totals.get('shards', len(manifest.shards)):,} shards; {totals.get('truncated', 0):,} examples truncated at max_length; "
              f"{sum(rejected.values()):,} records rejected" + (f" ({reasons}; each with file and line in `{REJECTS_NAME}`)." if rejected else "."),
              "", "## Loading", "", "DIR is this folder; each line reads it as one table.", "", "```python",
              'import pyarrow.parquet as pq; table = pq.read_table("DIR")',
              'import duckdb; duckdb.sql("select count(*) from read_parquet(\'DIR\')")',
              'import datasets; ds = datasets.load_dataset("DIR")',
              'import polars as pl; df = pl.scan_parquet("DIR", hidden_file_prefix="_").collect()  # or pl.read_parquet("DIR/*.parquet")',
              "```", "",
              "Train on it with `python train/main.py data.train=DIR importance.scorer=<scorer> ...`; check it with "
              "`python -m schemas.validate DIR`; look inside with `python -m annotate.view DIR`.", ""]
    return "\n".join(lines)


def system_prompt_line(record: dict[str, Any]) -> str:
    """The system-prompt choice of a manifest's ``system_prompt`` record in one line, with the share of tokens the
    chat template's own system turn takes under ``default`` (the annotate summary's line, the card's)."""
    if not record:
        return ""
    choice = record.get("choice", SYSTEM_PROMPT_DEFAULT)
    turn = record.get("template_turn")
    if choice == SYSTEM_PROMPT_DEFAULT:
        if not turn:
            return "default (the chat template's own behaviour; it adds no system turn by itself)"
        share = record.get("template_turn_token_share")
        counted = (f": {record.get('template_turn_tokens', 0)} tokens in {record.get('rows_with_template_turn', 0):,} rows, "
                   f"{100 * share:.1f}% of all tokens" if share is not None else "")
        return (f"default (the chat template's own behaviour: it adds the system turn {turn.strip()!r} to every example "
                f"without a system message{counted}; --system-prompt none leaves it out)")
    if choice == "none":
        removed = f"; the template's own system turn {turn.strip()!r} was cut off" if turn else ""
        return f"none (no system turn except a record's own{removed})"
    return f"{describe_system_prompt(choice)} (the system message of every record without one of its own)"


def write_card(directory: str | Path, manifest: Manifest) -> Path:
    """Write ``DIR/_README.md`` atomically; return its path."""
    path = Path(directory) / CARD_NAME
    atomic_write_text(path, dataset_card(manifest, source_counts(directory, manifest)))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m annotate.card", description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", metavar="DIR", help="a finished annotated directory (local)")
    args = parser.parse_args(argv)
    try:
        manifest = Manifest.load(args.directory)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)  # the message names the directory or its manifest
        return 2
    print(write_card(args.directory, manifest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
