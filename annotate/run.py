"""Annotate instruction corpora into scored Parquet shards (shard schema v1).

    python annotate/run.py --input ../shared/data/lima/train.jsonl --format lima \\
        --model smollm2-135m-instruct --scorers tfidf,ref_loss,base_loss --output shards/lima
    ray job submit --working-dir . -- python annotate/run.py ...    # on a running Ray cluster
    ray submit docker/ray-cluster.yaml annotate/run.py ...          # on a cluster launched from a config

With no cluster it starts a local Ray. Rerunning an interrupted job finishes it (finished shards are
kept); --add-scorers adds score columns to a finished directory without re-tokenizing.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# Runnable as a script (python annotate/run.py, ray job submit) without installing the repo. The
# script's own folder leaves sys.path: its modules (inspect.py, evaluate.py, config.py) would
# otherwise shadow the standard library's and other packages' modules of the same name.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402

from annotate import scorers as registry  # noqa: E402
from annotate.config import load_config  # noqa: E402
from annotate.pipeline import init_ray, prepare, print_summary, run  # noqa: E402
from annotate.steps import StrictModeError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    try:
        config, args = load_config(argv)
    except (ValueError, OSError, yaml.YAMLError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.list_scorers:
        import dataclasses

        for name in registry.available():
            scorer = registry.get(name)
            print(f"{name:<12} {((scorer.__doc__ or '').strip().splitlines() or [''])[0]}")
            for option in dataclasses.fields(scorer.Options):
                print(f"{'':<12}   --scorer-option {name}.{option.name}={option.default!r}")
        return 0
    try:
        job = prepare(config)  # every check that can fail, before Ray starts
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("== annotate config ==")
    print(yaml.safe_dump(config.to_dict(), sort_keys=False).rstrip())
    init_ray(config.ray_address)
    import ray

    try:
        summary = run(job)
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause if hasattr(exc, "cause") else exc
        if isinstance(cause, StrictModeError):
            print(f"error: {cause}", file=sys.stderr)
            return 1
        raise
    except (ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print_summary(summary)
    if not summary.get("already_complete"):
        # Timings vary run to run, so they live beside the data, not in the manifest.
        (Path(config.output) / "annotate_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
