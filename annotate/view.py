"""Inspect an annotated directory: totals, score statistics, rejects, scorer agreement, token viewer.

    python -m annotate.view shards/demo
    python -m annotate.view shards/demo --viewer runs/demo_tokens.html --rho 0.7
    python -m annotate.view shards/demo --json

Reads the shards lazily (data/shard_stats.py; the HTML is data/viewer.py): statistics stream over
loss_mask and the score columns, the viewer reads only the sampled rows. Exit status 0, or 2 with ``error: ...`` on stderr.
"""

from __future__ import annotations

import sys

import argparse
import json
import os
from pathlib import Path
from typing import Any

from data.formats import where
from schemas.shard import program


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4g}"


def _print_summary(summary: dict[str, Any], agreement: dict[str, Any] | None, out=None) -> None:
    out = out or sys.stdout

    def line(label: str, value: str) -> None:
        print(f"  {label:<17} {value}", file=out)

    print(summary["dir"], file=out)
    rows, tokens, trainable = summary["rows"], summary["tokens"], summary["trainable_tokens"]
    line("rows", f"{rows:,}" + (f"  ({summary['rows_without_trainable']:,} without a trainable token)"
                                 if summary["rows_without_trainable"] else ""))
    line("tokens", f"{tokens:,}" + (f"  ({tokens / rows:,.1f} per row)" if rows else ""))
    line("trainable tokens", f"{trainable:,}" + (f"  ({100 * trainable / tokens:.1f}%; loss_mask, position 0 excluded as in training)"
                                                 if tokens else ""))
    recorded = summary.get("manifest_totals", {})
    for key in ("rows", "tokens", "trainable_tokens"):
        if key in recorded and recorded[key] != summary[key]:
            line("note", f"the manifest records {key} = {recorded[key]:,}, the shards hold {summary[key]:,}")
    line("shards", f"{summary['shards']:,}")
    tok = summary.get("tokenizer") or {}
    line("tokenizer", f"{tok.get('name', '?')} (sha256 {str(tok.get('sha256', '?'))[:12]})")
    line("model", str(summary.get("model") or "-"))
    line("scorers", ", ".join(summary["scorers"]) or "-")
    for name, variant in (summary.get("variants") or {}).items():
        line("variant", f"{name}: {variant}")
    derived = [s for s in summary["scores"] if s not in summary["scorers"]]
    if derived:
        line("derived scores", ", ".join(derived))
    sources = summary.get("sources") or {}
    if sources:
        shown = list(sources.items())[:8]
        line("sources", ", ".join(f"{s}: {n:,}" for s, n in shown) + (f" (+{len(sources) - 8} more)" if len(sources) > 8 else ""))

    if summary["stats"]:
        print("\nscore statistics over trainable tokens (std: population; NaN and inf counted apart):", file=out)
        columns = ["count", "mean", "std", "min", "p05", "p50", "p95", "max", "nan", "inf"]
        width = max(12, *(len(s) + 1 for s in summary["stats"]))
        print("  " + "score".ljust(width) + "".join(f"{c:>11}" for c in columns), file=out)
        for name, stats in summary["stats"].items():
            print("  " + name.ljust(width) + "".join(f"{_fmt(stats[c]):>11}" for c in columns), file=out)

    rejects = summary["rejects"]
    if rejects["total"]:
        reasons = ", ".join(f"{r}: {n:,}" for r, n in rejects["by_reason"].items())
        print(f"\nrejected records: {rejects['total']:,} ({reasons}; see _rejects.jsonl)", file=out)
        for r in rejects["examples"]:
            print(f"  {r['reason']:<14} {where(r['file'], r['line'])}  {r['detail']}", file=out)
    else:
        print("\nrejected records: none", file=out)

    if agreement is not None:
        names = agreement["scores"]
        print(f"\nscorer agreement at rho = {agreement['rho']:g} ({agreement['scope']} scope): mean Jaccard "
              f"|A∩B|/|A∪B| of important tokens over {agreement['examples']:,} examples", file=out)
        width = max(12, *(len(s) + 1 for s in names))
        print("  " + "".ljust(width) + "".join(f"{n:>{width}}" for n in names), file=out)
        for name, values in zip(names, agreement["overlap"]):
            print("  " + name.ljust(width) + "".join(f"{'-' if v is None else f'{v:.3f}':>{width}}" for v in values), file=out)


def _rho(text: str) -> float:
    from data.grouping import check_rho

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    try:
        check_rho(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=program("python -m annotate.view"),
        description="Summarize an annotated directory (rows, tokens, per-score statistics over trainable tokens, "
                    "rejects, agreement between scorers) and optionally write an HTML token viewer.",
        epilog="example:\n  python -m annotate.view shards/demo --viewer runs/demo_tokens.html --rho 0.7 --examples 8",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("shards_dir", metavar="SHARDS_DIR", help="annotated directory (holds _manifest.json), or an s3:// / gs:// URI")
    parser.add_argument("--examples", type=_count, default=8, metavar="N",
                        help="examples sampled into the viewer (default: 8)")
    parser.add_argument("--id", dest="ids", action="append", metavar="ID",
                        help="show this example id in the viewer instead of a sample (repeatable)")
    parser.add_argument("--viewer", metavar="OUT.html",
                        help="write the token viewer page (tokens shaded by score, important ones marked) here")
    parser.add_argument("--rho", type=_rho, default=0.7,
                        help="threshold in [0, 1): the top ceil((1 - rho) * n) trainable tokens are important (default: 0.7)")
    parser.add_argument("--scope", choices=("sequence", "batch", "corpus"), default="sequence",
                        help="grouping scope as in training; batch ranks each example alone, corpus uses the "
                             "manifest's rho-quantile (default: sequence)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the example sample (default: 0)")
    parser.add_argument("--tokenizer", metavar="NAME_OR_PATH",
                        help="tokenizer for the viewer (default: the manifest's config model)")
    parser.add_argument("--agreement-examples", type=_count, default=2000, metavar="N",
                        help="first N rows used for scorer agreement (default: 2000)")
    parser.add_argument("--json", action="store_true", help="print the summary (and agreement) as JSON instead of text")
    return parser


def _load_tokenizer(name: str | None, manifest_fp: dict[str, Any]):
    from data.models import load_tokenizer, resolve_model

    if not name:
        raise ValueError("no tokenizer: the manifest names no model (config.model); pass --tokenizer NAME_OR_PATH")
    try:
        tokenizer = load_tokenizer(resolve_model(name))
    except Exception as exc:  # noqa: BLE001 - transformers / hub raise many types for a bad name
        raise ValueError(f"could not load tokenizer {name!r} ({type(exc).__name__}: {exc}); pass --tokenizer NAME_OR_PATH") from None
    try:
        from schemas.shard import tokenizer_fingerprint

        expected = manifest_fp.get("sha256")
        if expected and tokenizer_fingerprint(tokenizer)["sha256"] != expected:
            print(f"warning: tokenizer {name!r} differs from the one the shards were tokenized with "
                  f"({manifest_fp.get('name')}): tokens may be shown wrongly", file=sys.stderr)
    except Exception:  # noqa: BLE001 - the check is advisory
        pass
    return tokenizer


def _write_viewer(args: argparse.Namespace, summary: dict[str, Any], agreement: dict[str, Any] | None) -> Path:
    from data.shard_stats import corpus_thresholds, sample_examples
    from data.viewer import agreement_html, standalone_page, token_viewer_html

    tokenizer = _load_tokenizer(args.tokenizer or summary.get("model"), summary.get("tokenizer") or {})
    examples = sample_examples(args.shards_dir, n=args.examples, seed=args.seed, ids=args.ids)
    thresholds = corpus_thresholds(args.shards_dir, args.rho) if args.scope == "corpus" else None
    name = os.path.basename(str(args.shards_dir).rstrip("/")) or str(args.shards_dir)
    body = token_viewer_html(examples, tokenizer, args.rho, args.scope, thresholds,
                             title=f"{len(examples)} examples of {args.shards_dir}")
    if agreement is not None:
        body += "\n" + agreement_html(agreement)
    path = Path(args.viewer)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(standalone_page(f"Tokens of {name}", body), encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from data.shard_stats import scorer_agreement, summarize

    try:
        summary = summarize(args.shards_dir)
        agreement = None
        if len(summary["scores"]) >= 2 and summary["trainable_tokens"]:
            agreement = scorer_agreement(args.shards_dir, args.rho, args.agreement_examples, args.scope)
        viewer = _write_viewer(args, summary, agreement) if args.viewer else None
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({**summary, "agreement": agreement, "viewer": str(viewer) if viewer else None}, indent=2))
    else:
        _print_summary(summary, agreement)
        if viewer:
            print(f"\nviewer: {viewer}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
