"""Annotate instruction corpora into scored Parquet shards (shard schema v1).

    python annotate/run.py --input ../shared/data/lima/train.jsonl --format lima \\
        --model smollm2-135m-instruct --scorers tfidf,ref_loss,base_loss --scorer-option ref_loss.model=/path/to/reference \\
        --output shards/lima
    ray job submit --working-dir . -- python annotate/run.py ...    # on a running Ray cluster
    ray submit docker/ray-cluster.yaml annotate/run.py ...          # on a cluster launched from a config

With no cluster it starts a local Ray. Rerunning an interrupted job finishes it (finished shards are
kept); --add-scorers adds score columns to a finished directory without re-tokenizing.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Any

if not __package__:  # run as a file: this checkout, not the file's folder, leads sys.path (tests/test_layers.py)
    sys.path[:] = [str(Path(__file__).resolve().parents[1])] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import yaml

from annotate import scorers as registry
from annotate.config import load_config
from annotate.pipeline import ClusterTooSmall, finished_shards, init_ray, prepare, print_summary, received_interrupts, run
from annotate.steps import OutputLock, StrictModeError
from data.formats import where
from schemas.shard import REJECTS_NAME, SUMMARY_NAME, atomic_write_text


def main(argv: list[str] | None = None) -> int:
    try:
        config, list_scorers = load_config(argv)
    except (ValueError, OSError, yaml.YAMLError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if list_scorers:
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
    print(yaml.safe_dump(shown_config(job), sort_keys=False).rstrip())
    previous = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    received_interrupts.clear()
    try:
        lock = OutputLock(job.out)
        lock.acquire()
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        init_ray(config.ray_address)
        # After ray.init, which installs its own SIGTERM handling in the driver.
        signal.signal(signal.SIGTERM, _raise_terminated)
        signal.signal(signal.SIGINT, _raise_keyboard_interrupt)
        summary = run(job)
    except BaseException as exc:  # interrupts are told apart from failures below
        interrupt = _interrupt(exc)
        if interrupt is None:
            import ray

            # Stop the job's other shards in flight: run on (in a Ray that outlives this call) they would
            # still write, under the feet of the rerun.
            ray.shutdown()
            if isinstance(exc, ClusterTooSmall):  # refused at the start, as a pre-flight error
                print(f"error: {exc}", file=sys.stderr)
                return 2
            if isinstance(exc, Exception):
                return _report_failure(exc)
            raise
        code, name = (143, "SIGTERM") if isinstance(interrupt, Terminated) else (130, "Ctrl-C")
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        import ray

        ray.shutdown()  # stops the actors, so the count below is final (shard writes are atomic)
        done, total = finished_shards(job)
        what = f"scoring {', '.join(job.scorer_names)} into" if job.existing is not None else "writing"
        left = f"the other {total - done}" if total is not None else "the rest"
        print(f"\ninterrupted ({name}) {what} {job.out}: {done} of {total if total is not None else '?'} shards finished and kept; "
              f"the same command resumes with {left}", file=sys.stderr, flush=True)
        return code
    finally:
        # Restored on every path: a caller (and the processes it starts later) must not inherit the
        # SIG_IGN set while the interrupt is reported.
        signal.signal(signal.SIGTERM, previous[0] if previous[0] is not None else signal.SIG_DFL)
        signal.signal(signal.SIGINT, previous[1] if previous[1] is not None else signal.default_int_handler)
        lock.release()
    print_summary(summary)
    if not summary.get("already_complete"):
        # Timings vary run to run, so they live beside the data, not in the manifest.
        atomic_write_text(Path(config.output) / SUMMARY_NAME, json.dumps(summary, indent=2) + "\n")
    if not summary.get("totals", {}).get("rows"):
        print(f"error: {no_rows_message(Path(config.output), summary.get('rejected', {}), config)}", file=sys.stderr)
        return NO_ROWS
    return 0


#: The exit status of a job that finished but wrote no row (every record rejected): nothing to train on.
NO_ROWS = 3


def no_rows_message(out: Path, rejected: dict[str, int], config: Any) -> str:
    """Why a finished job wrote no row: the reject counts by reason and the first reject (file, line, reason)."""
    total = sum(rejected.values())
    counts = ", ".join(f"{reason}: {n}" for reason, n in sorted(rejected.items(), key=lambda kv: (-kv[1], kv[0])))
    first = ""
    path = out / REJECTS_NAME
    if path.exists():
        with open(path, encoding="utf-8") as f:
            line = f.readline()
        if line.strip():
            r = json.loads(line)
            first = f"; the first: {where(r['file'], r['line'])}: {r['reason']}: {r['detail']}{_columns_of(r['file'], config)}"
    what = f"all {total} records were rejected ({counts}){first}; every reject is in {path}" if total else "the input holds no record"
    hint = (f". Check that --format {config.format} and --columns match the input's fields (python annotate/run.py --help)"
            if total else "")
    return f"{out}: no row written: {what}{hint}"


def _columns_of(path: str, config: Any) -> str:
    """`` (its columns: [...])`` of an input file, for the message of a job that wrote no row; '' if unreadable."""
    from data import sources

    try:
        names = sources.column_names(sources.InputFile(path, sources.container_of(path, config.container)),
                                     config.max_record_bytes)
    except (OSError, ValueError):
        return ""
    return f" (its columns: {names})" if names else ""


class Terminated(Exception):
    """SIGTERM, raised in the main thread as SIGINT raises KeyboardInterrupt."""


def _raise_terminated(signum: int, frame: Any) -> None:
    received_interrupts.append(Terminated)
    raise Terminated()


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    received_interrupts.append(KeyboardInterrupt)
    raise KeyboardInterrupt()


def _interrupt(exc: BaseException) -> BaseException | None:
    """The Ctrl-C or SIGTERM behind ``exc``, if any. Raised inside Ray's compiled wait, the handler's
    exception comes back as the ``__cause__`` of a SystemError ("returned a result with an exception set")."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, (KeyboardInterrupt, Terminated)):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def shown_config(job: Any) -> dict[str, Any]:
    """The settings of this run as printed: for --add-scorers, the directory's own (input, model,
    shard size, scorers) with the columns being added, not this command line's defaults."""
    config = job.config.to_dict()
    if job.existing is None or not job.existing.config:
        return config
    existing = job.existing.config
    return {**existing, "output": config["output"], "add_scorers": config["add_scorers"],
            "scorers": [s.name for s in job.scorer_infos],
            "scorer_options": {**existing.get("scorer_options", {}), **config["scorer_options"]}}


def _report_failure(exc: Exception) -> int:
    import ray

    if isinstance(exc, ray.exceptions.RayTaskError):
        cause = exc.cause if hasattr(exc, "cause") else exc
        if isinstance(cause, (StrictModeError, OSError)):
            exc = cause
        else:
            raise exc
    if isinstance(exc, (ValueError, RuntimeError, OSError)):  # StrictModeError is a ValueError
        # A failed write (a full disk) loses nothing finished: shard writes are atomic, reruns resume.
        hint = ("; the shards finished before it are kept: free space (or fix the cause) and rerun the same "
                "command to finish") if isinstance(exc, OSError) else ""
        print(f"error: {exc}{hint}", file=sys.stderr)
        return 1
    raise exc


if __name__ == "__main__":
    sys.exit(main())
