"""The Ray plumbing of the annotate job: the one place that knows about Ray, and nothing of any scorer.

    plan_work (driver) -> tokenize (actor pool) -> drop_duplicates (driver) -> corpus_pass (scorers that need one)
        -> score_and_write, per shard: scorer 1 actor (reads it) -> scorer 2 actor ... -> last (writes it, atomic)
        -> finalize (driver: the manifest, last)

Shards flow through per-scorer actor pools as Ray object refs, with a bounded number in flight, so
scorers run concurrently on different shards and a slow GPU scorer keeps its GPU busy. Each actor
reserves a fraction of a CPU (whole CPUs per actor would leave the tokenize actors none on a 2-core
machine) and, for model scorers on a GPU cluster, a share of a GPU (so every GPU scorer fits beside
the others on each GPU instead of waiting for a whole one); a model scorer on CPU runs as many torch
threads as its share of the cluster's cores.

Read from :func:`run`: it calls the stages in order, each a short function below it; :func:`add_scorers` is
the --add-scorers job (the corpus pass and score-and-write over finished shards); :func:`plan_actors` sizes
every actor from the cluster's totals (a pure function); :func:`dispatch` is the one loop that waits on Ray.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from annotate import scorers as registry
from annotate import steps
from annotate.config import AnnotateConfig
from annotate.scorers import ScorerContext
from annotate.card import system_prompt_line
from data.models import check_model, load_tokenizer, tokenizer_class_name
from data.render import check_system_prompt, template_system_ids, template_system_turn
from schemas.migrate import is_v1_directory, migrate_directory
from schemas.shard import ID, INPUT_IDS, MANIFEST_NAME, REJECTS_NAME, SHARD_GLOB, Manifest, ScorerInfo, score_column, tokenizer_fingerprint

REPO_ROOT = str(Path(__file__).resolve().parents[1])


# ---------------------------------------------------------------------------------------------
# Pre-flight: everything that can fail fails here, before Ray starts.
# ---------------------------------------------------------------------------------------------


@dataclass
class Job:
    config: AnnotateConfig
    out: Path
    model_path: str
    tokenizer_fp: dict[str, str]
    tokenizer_class: str  # data.models.tokenizer_class_name of the model's tokenizer: actors load it directly
    scorer_names: list[str]  # the scorers this run computes
    scorer_options: dict[str, Any]
    scorer_infos: list[ScorerInfo]  # every score column the finished shards hold, in order
    existing: Manifest | None = None  # --add-scorers: what is there already
    system_turn: dict[str, Any] | None = None  # the template's own system turn (steps.finalize), None: it writes none


def prepare(config: AnnotateConfig) -> Job:
    """Validate options, scorers, models and the output directory; raise ValueError/OSError with a clear message."""
    config.validate()
    adding = bool(config.add_scorers)
    if not adding:  # the inputs' containers, layouts and --columns (data/sources.py)
        steps.check_inputs(config.input, config.format, config.container, config.columns, config.max_record_bytes)
    names = list(config.add_scorers if adding else config.scorers)
    for name in names:
        registry.get(name)  # unknown scorer -> clear error listing the known ones
        if adding and getattr(registry.get(name), "needs_records", False):  # (given: values come from the records)
            raise ValueError(f"--add-scorers {name}: {name} reads the corpus records, which finished shards do not hold; "
                             f"annotate the corpus again with --scorers ...,{name}")
    unknown = sorted(set(config.scorer_options) - set(names))
    if unknown:
        raise ValueError(f"scorer_options for {unknown}, which this run does not compute ({names})")
    model_path = check_model(config.model)
    tokenizer = load_tokenizer(model_path, config.trust_remote_code, option="--trust-remote-code")
    check_system_prompt(tokenizer, config.system_prompt)  # a template that cannot render the choice: refused here
    fp = tokenizer_fingerprint(tokenizer, config.system_prompt)
    fp["name"] = os.path.basename(config.model.rstrip("/")) or fp["name"]
    # The model name as given: recorded in metadata.
    tokenizer_class = tokenizer_class_name(tokenizer)
    context = ScorerContext(model=config.model, device="cpu", trust_remote_code=config.trust_remote_code,
                            tokenizer_class=tokenizer_class)
    options = {name: registry.build_options(name, config.scorer_options.get(name)) for name in names}
    # Constructing a scorer checks its options (model paths, names) without loading any model.
    built = {name: registry.get(name)(options[name], context) for name in names}
    infos = [scorer.info() for scorer in built.values()]
    out = Path(config.output)
    check_scorer_tokenizers(built, config, model_path, tokenizer, lambda: _probe_texts(config, out, tokenizer, adding))
    if is_v1_directory(out):
        for line in migrate_directory(out):  # resume and --add-scorers write v2 names
            print(f"{out}: schema v1 -> v2: {line}")
    existing = None
    if adding:
        existing = _existing_annotation(out)
        if existing.tokenizer["sha256"] != fp["sha256"]:
            raise ValueError(
                f"{out}: annotated with tokenizer {existing.tokenizer['name']} ({existing.tokenizer['sha256'][:12]}), "
                f"--model {config.model} has {fp['sha256'][:12]}; --add-scorers needs the same tokenizer"
            )
        clash = [n for n in names if n in existing.scorer_names and n not in _partially_added(out, names)]
        if clash:
            raise ValueError(f"{out}: already has score columns {clash}; nothing to add")
        infos = [s for s in existing.scorers if s.name not in names] + infos
    system_turn = _system_turn(tokenizer)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise OSError(f"output {out} is not writable: {exc}") from None
    return Job(config, out, model_path, fp, tokenizer_class, names, options, infos, existing, system_turn)


def _system_turn(tokenizer: Any) -> dict[str, Any] | None:
    """The chat template's own system turn: its text and where it sits in token ids (None: it writes none)."""
    try:
        text = template_system_turn(tokenizer) if getattr(tokenizer, "chat_template", None) else None
    except ValueError:  # a template that cannot do without it: default keeps it, none and text were refused
        return None
    where = template_system_ids(tokenizer) if text else None
    return {"text": text, "offset": where[0], "ids": where[1]} if where else None


PROBE_ROWS = 4  # of the job's rows, tokenized by both tokenizers in check_scorer_tokenizers


def check_scorer_tokenizers(scorers: dict[str, Any], config: AnnotateConfig, model_path: str, tokenizer: Any,
                            texts: Callable[[], list[str]]) -> None:
    """ValueError naming both models when a scorer runs a causal LM of its own (``ref_loss.model``,
    ``base_loss.model``, ``entropy.model``) whose tokenizer would give other ids than the job's ``--model``:
    that model would score tokens it does not mean (:func:`data.models.token_id_mismatch`), or ids past its
    embeddings. ``texts``: a few of the job's rows (called only when some scorer has a model of its own)."""
    from data.models import model_vocab_size, token_id_mismatch

    rows: list[str] | None = None
    for name, scorer in scorers.items():
        other = getattr(scorer, "model_path", None)
        if not isinstance(other, str) or not hasattr(scorer, "model_name") or other == model_path:
            continue
        option = f"--scorer-option {name}.model={scorer.model_name}"
        needed = max(tokenizer.get_vocab().values()) + 1
        size = model_vocab_size(other)
        if size is not None and size < needed:
            raise ValueError(f"{option}: its embeddings have {size} rows, but --model {config.model}'s tokenizer gives ids up "
                             f"to {needed - 1}; a scorer's model must use the job's tokenizer")
        try:
            other_tokenizer = load_tokenizer(other, scorer.options.trust_remote_code,
                                             option=f"--scorer-option {name}.trust_remote_code=true")
        except (OSError, ValueError) as exc:
            raise ValueError(f"{option}: cannot load its tokenizer, needed to check that it gives --model "
                             f"{config.model}'s token ids: {exc}") from None
        if rows is None:
            rows = texts()
        why = token_id_mismatch(tokenizer, other_tokenizer, rows)
        if why is not None:
            raise ValueError(f"{option}: its tokenizer gives other token ids than --model {config.model}'s ({why}); "
                             f"{name} scores the job's token ids, so its model must share the job's tokenizer")


def _probe_texts(config: AnnotateConfig, out: Path, tokenizer: Any, adding: bool) -> list[str]:
    """A few of the job's rows as text: the first readable records of the first input rendered with the chat
    template, or (--add-scorers) the first rows of the first shard that has any, decoded."""
    texts: list[str] = []
    if adding:
        for shard in sorted(out.glob(SHARD_GLOB)):
            parquet = pq.ParquetFile(shard)
            if parquet.metadata.num_rows:  # a shard whose records were all rejected has none
                ids = parquet.read_row_group(0, columns=[INPUT_IDS])[INPUT_IDS].to_pylist()
                return [tokenizer.decode(row) for row in ids[:PROBE_ROWS]]
        return texts
    for messages in steps.first_messages(config.input, config.format, config.container, config.columns,
                                         config.max_record_bytes):
        try:
            texts.append(tokenizer.apply_chat_template(messages, tokenize=False))
        except Exception:  # noqa: BLE001 - a tokenizer without a chat template: the contents alone
            texts.append("\n".join(m["content"] for m in messages))
        if len(texts) >= PROBE_ROWS:
            break
    return texts


def _existing_annotation(out: Path) -> Manifest:
    """The manifest of an annotated dir, or (an interrupted --add-scorers run) one rebuilt from shard metadata."""
    if (out / MANIFEST_NAME).exists():
        return Manifest.load(out)
    shards = sorted(out.glob(SHARD_GLOB))
    if not shards:
        raise FileNotFoundError(f"{out}: no {MANIFEST_NAME} and no shards; --add-scorers needs an annotated directory")
    meta = steps.read_shard_metadata(shards[0])
    if meta is None:
        raise ValueError(f"{shards[0]}: not an sftgo shard")
    base = [s for s in meta.scorers]
    return Manifest(meta.schema_version, meta.tokenizer, base, [], {}, {}, {}, {})


def _partially_added(out: Path, names: list[str]) -> set[str]:
    """Scorers an interrupted --add-scorers run already wrote into some (not all) shards."""
    have = [set(s.name for s in (steps.read_shard_metadata(p) or steps.ShardMetadata(1, {}, [], 0)).scorers) for p in sorted(out.glob(SHARD_GLOB))]
    if (out / MANIFEST_NAME).exists() or not have:
        return set()
    return {n for n in names if any(n in h for h in have)}


# ---------------------------------------------------------------------------------------------
# Ray
# ---------------------------------------------------------------------------------------------


# The job's own local Ray lives and dies with this process, on this machine: a node that misses Ray's health checks
# there is one starved of CPU (a loaded laptop, a niced job), not a lost machine, and Ray's default (5 missed checks
# 3 s apart) then declares it dead and fails the job; it happened to a study's annotate at load 7 on 2 cores. Patient
# here: ~5 minutes. A raylet that really dies still ends the job at once (the driver loses its socket).
LOCAL_RAY_SYSTEM_CONFIG = {"health_check_failure_threshold": 100, "health_check_timeout_ms": 30000}


def init_ray(address: str) -> None:
    import ray

    if ray.is_initialized():
        return
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address or None)  # a cluster (or a submitted job): its own resources
        return
    # A new local Ray keeps Ray's default token authentication. Its warning on every run ("token
    # authentication is enabled ... set RAY_AUTH_MODE=disabled to opt out") asks nothing of the user.
    # (Setting RAY_AUTH_MODE=token here instead would be too late: Ray reads it when first imported.)
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    env = {"PYTHONPATH": os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH", "")) if p),
           "TOKENIZERS_PARALLELISM": "false"}  # workers import this repo even when it is not pip-installed
    if _local_ray_running():
        # The one `ray start` left on this machine, which ray.init() finds by itself: its workers have
        # their own environment, so ours goes in the job's runtime_env.
        ray.init(runtime_env={"env_vars": env})
        return
    # A new local Ray: its workers inherit this process's environment, so what they need goes there.
    # (A runtime_env would make Ray start a fresh worker process, seconds each on a small machine, for
    # every actor and task instead of using the ones it has already started.) No dashboard for a job's
    # own short-lived Ray: it costs seconds of start-up and a share of a core all along; `ray start
    # --head` first for a Ray with its dashboard.
    os.environ.update(env)
    ray.init(include_dashboard=False, _system_config=LOCAL_RAY_SYSTEM_CONFIG)


def _local_ray_running() -> bool:
    """Whether ray.init() without an address would join a Ray that `ray start` left on this machine."""
    try:
        from ray._private import services

        return services.canonicalize_bootstrap_address(None) is not None
    except Exception:  # noqa: BLE001 - a private helper; assume a running Ray, the path that works for both
        return True


# A worker process that dies (killed, out of memory, its node gone) is restarted by Ray, and the calls it
# had in flight are run again on the new one: every call is a pure function of its shard, and every write
# is atomic, so a retried shard comes out the same. A call is retried for as long as its actor lives
# (while the actor restarts, calls fail fast as unavailable: a count of them would run out at once);
# an actor that dies more than RETRIES times fails the job.
RETRIES = 3


def _node() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def cpu_threads(node_cpus: float, cpu_share: float) -> int:
    """Torch threads for a model-running actor on CPU: its share of the cluster's CPUs (the cluster's CPUs
    over the job's model actors on CPU), never more than its node has; at least one."""
    return max(1, int(min(node_cpus, cpu_share)))


def _node_cpus() -> float:
    """The CPUs Ray manages on this process's node (``ray start --num-cpus``; not the machine's core count)."""
    import ray

    here = _node()
    return next(float(n["Resources"].get("CPU", 1)) for n in ray.nodes() if n["NodeID"] == here)


class TokenizeActor:
    """Renders and tokenizes whole shards; loads the tokenizer once."""

    def __init__(self, model_path: str, max_length: int, overlength: str, strict: bool, trust_remote_code: bool = False,
                 tokenizer_class: str = "", system_prompt: str = "default"):
        self.tokenizer = load_tokenizer(model_path, trust_remote_code, tokenizer_class=tokenizer_class)
        self.max_length, self.overlength, self.strict = max_length, overlength, strict
        self.system_prompt = system_prompt

    def run(self, plan: steps.ShardPlan, out: str) -> dict[str, Any]:
        start = time.perf_counter()
        table, rejects, truncated = steps.tokenize_shard(plan, self.tokenizer, self.max_length, self.overlength, self.strict,
                                                       self.system_prompt)
        out_dir = Path(out)
        steps.write_rejects(rejects, steps.staging_rejects_path(out_dir, plan.index))
        steps.write_table_atomic(table.replace_schema_metadata({b"truncated": str(truncated).encode()}), steps.staging_path(out_dir, plan.index))
        return {"rows": table.num_rows, "tokens": _tokens(table), "rejects": len(rejects), "seconds": time.perf_counter() - start,
                "node": _node()}


def _tokens(table: pa.Table) -> int:
    """The tokens of a shard's rows (every row's input_ids)."""
    return int(pc.sum(pc.list_value_length(table[INPUT_IDS])).as_py() or 0)


class ScoreActor:
    """Hosts one scorer (or a group sharing one model pass, see ``share_key``): built and set up once,
    then fed whole shards (Arrow tables). A scorer with a corpus pass collects with the same actors, and
    each score call carries the fitted state's ref: an actor fits on its first call, so one that Ray
    restarts (built again from its constructor's arguments) is fitted again.

    ``cpu_share``: on CPU, the cluster's CPUs over the job's model actors on CPU. The actor reserves only
    a fraction of a CPU (so tokenizing and writing are never starved), yet its forward passes are the
    job's bottleneck: it runs as many torch threads as its share allows, capped by its node's CPUs."""

    def __init__(self, name: str, options: Any, context: ScorerContext, names: list[str] | None = None,
                 cpu_share: float = 0.0):
        self.name = name
        self.names = names or [name]  # the columns this actor adds: its scorer's, and its group's
        if context.device == "cpu" and cpu_share > 0:
            context = replace(context, cpu_threads=cpu_threads(_node_cpus(), cpu_share))
        self.scorer = registry.get(name)(options, context)
        self.scorer.setup()
        self.fitted = False

    def collect(self, source: ShardSource) -> tuple[int, Any, dict[str, int]]:
        """(the shard's index, its part of the corpus pass, the rows and tokens it read)."""
        table = source.load()[0]
        return source.index, self.scorer.collect(table), {"rows": table.num_rows, "tokens": _tokens(table)}

    def score(self, shard: ShardSource | tuple[pa.Table, dict[str, Any]], fit_state: list | None = None,
              sink: ShardSink | None = None) -> tuple[tuple[pa.Table, dict[str, Any]] | None, dict[str, Any]]:
        """Score one shard: read from its ``ShardSource`` (the first actor of a job's chain) or handed on by
        the previous actor as (table, what its write needs). The last actor of the chain writes it through
        ``sink``. Reading and writing here, not in tasks of their own, keeps a shard in one warm process
        (a task would start a fresh worker process, a second or more on a small machine).
        ``fit_state``: [ref of the corpus pass's state] (in a list, so Ray hands over the ref, not a copy per call)."""
        import ray

        table, extra = shard.load() if isinstance(shard, ShardSource) else shard
        start = time.perf_counter()
        if fit_state is not None and not self.fitted:
            self.scorer.fit(ray.get(fit_state[0]))
            self.fitted = True
        # A shard whose records were all rejected still gets its (empty) columns.
        if not table.num_rows:
            columns = {name: [] for name in self.names}
        elif len(self.names) > 1:
            columns = self.scorer.score_columns(table, self.names)
        else:
            columns = {self.name: self.scorer.score(table)}
        lengths = pc.list_value_length(table[INPUT_IDS]).to_numpy(zero_copy_only=False).astype(np.int64)
        offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
        for name in self.names:
            got = np.fromiter((len(v) for v in columns[name]), dtype=np.int64, count=len(columns[name]))
            if len(got) != len(lengths) or (got != lengths).any():
                row = int(np.flatnonzero(got != lengths)[0]) if len(got) == len(lengths) else -1
                raise ValueError(f"scorer {name!r} returned {len(columns[name])} rows for {len(lengths)}" if row < 0 else
                                 f"scorer {name!r} returned {got[row]} scores for {lengths[row]} tokens (row {row})")
            values = np.concatenate(columns[name]).astype(np.float32, copy=False) if len(got) else np.zeros(0, np.float32)
            table = table.append_column(score_column(name), pa.ListArray.from_arrays(offsets, pa.array(values)))
        stats = {"rows": table.num_rows, "tokens": int(lengths.sum()), "seconds": time.perf_counter() - start, "node": _node()}
        if sink is None:
            return (table, extra), stats
        return None, {**stats, "write": sink.write(table, extra)}


@dataclass(frozen=True)
class ShardSource:
    """Where a shard's rows come from: its staging file (tokenized this run; duplicates dropped) or, for a
    shard finished earlier (--add-scorers, or the corpus pass of a resumed job), the shard itself."""

    out: str
    index: int
    staged: bool
    duplicate_rows: tuple[int, ...] = ()
    drop_columns: tuple[str, ...] = ()  # --add-scorers: columns this run adds, should a retried call find them

    def load(self) -> tuple[pa.Table, dict[str, Any]]:
        """(table, what its write needs: rejects and the truncated count; empty for a finished shard)."""
        out_dir = Path(self.out)
        if not self.staged:
            table = pq.read_table(out_dir / steps.shard_name(self.index)).replace_schema_metadata(None)
            return table.drop_columns([c for c in self.drop_columns if c in table.column_names]), {}
        table = pq.read_table(steps.staging_path(out_dir, self.index))
        truncated = int((table.schema.metadata or {}).get(b"truncated", b"0"))
        table, dup_rejects = steps.drop_duplicates(table.replace_schema_metadata(None), list(self.duplicate_rows))
        rejects = steps.read_rejects(steps.staging_rejects_path(out_dir, self.index)) + [r.to_dict() for r in dup_rejects]
        rejects.sort(key=lambda r: (r["file"], r["line"]))
        return table, {"rejects": rejects, "truncated": truncated}


@dataclass(frozen=True)
class ShardSink:
    """How a scored shard is written: a new shard (its rejects, then the shard, atomically) or, with
    --add-scorers (``plan_key`` None), the existing shard rewritten with its old metadata and the new columns.
    Its staging files stay until the driver has seen the write finish, so a retried call can read them again."""

    out: str
    index: int
    infos: tuple[ScorerInfo, ...]
    tokenizer_fp: dict[str, str]
    plan_key: dict[str, Any] | None

    def write(self, table: pa.Table, extra: dict[str, Any]) -> dict[str, Any]:
        start = time.perf_counter()
        out_dir = Path(self.out)
        if self.plan_key is None:
            meta = steps.read_shard_metadata(out_dir / steps.shard_name(self.index))
            assert meta is not None
            plan = dict(meta.plan)
            counts = plan.pop("rejected", {})
            steps.write_shard(out_dir, self.index, table, list(self.infos), meta.tokenizer, plan, counts)
        else:
            rejects = extra["rejects"]
            counts = dict(sorted(Counter(r["reason"] for r in rejects).items()))
            steps.write_rejects([steps.Rejected(**r) for r in rejects], steps.shard_rejects_path(out_dir, self.index))
            steps.write_shard(out_dir, self.index, table, list(self.infos), self.tokenizer_fp,
                              {**self.plan_key, "truncated": extra["truncated"]}, counts)
        return {"index": self.index, "rows": table.num_rows, "tokens": _tokens(table), "seconds": time.perf_counter() - start,
                "node": _node()}


# The interrupts (KeyboardInterrupt, run.py's Terminated) the driver's signal handlers received. A
# handler's raise can be lost when the signal lands inside Ray's own code (which defers SIGINT during
# task submission, and wraps exceptions raised inside its compiled calls): the job loop raises it again
# between waits, so a Ctrl-C or SIGTERM always stops the job within a second.
received_interrupts: list[type[BaseException]] = []


def dispatch(lanes: list, items: list, call: Callable[[Any, Any], Any], desc: str, on_done: Callable[[Any], None]) -> None:
    """``call(lane, item)`` (which returns an object ref) for every item, one call in flight per lane; report
    each result as it finishes, in any order. A lane is an actor, or the chain of actors a shard passes
    through; an actor listed twice takes a second call while it runs the first (its next shard is there
    when it finishes), and the number of lanes bounds what is in flight: the other items wait in the driver.

    ray.util.ActorPool does the bookkeeping. It replaced a hand-rolled ray.wait loop (commit ed4c112 has both):
    with bench/annotate.py --dispatch-passes the two were equal within the noise of a shared 2-core box (job wall
    ActorPool / hand-rolled, medians: 1.27 over 3 passes, 0.86 over 5; bench/results/annotate_dispatch_actorpool_vs_wait_cpu
    {_trial,}.json),
    so the one with less code of our own stays. Its results carry no item: each stage's results name their shard."""
    from ray.util import ActorPool

    pool = ActorPool(lanes)
    for item in items:
        pool.submit(call, item)  # called when a lane is free
    with tqdm(total=len(items), desc=desc, unit="shard", dynamic_ncols=True) as bar:
        while pool.has_next():
            # A short timeout, so the main thread runs Python between waits: a SIGTERM handler cannot run
            # inside ray.wait, and after a process-group kill the same signal has stopped the raylet, whose
            # death the core worker answers by exiting the process (status 1, no line) within about a second
            # (one CI run of the sigterm-group test lost that race at 1.0 s). 0.1 s answers first.
            try:
                result = pool.get_next_unordered(timeout=0.1)
            except TimeoutError:
                result = _NOTHING
            if received_interrupts:
                raise received_interrupts[0]()
            if result is not _NOTHING:
                on_done(result)
                bar.update(1)


_NOTHING = object()


def in_turn(actors: list, n: int) -> list:
    """``n`` lanes over ``actors`` in turn: ``n`` calls in flight, at most ``ceil(n / len(actors))`` on each."""
    return [actors[k % len(actors)] for k in range(n)]


# ---------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------


def run(job: Job) -> dict[str, Any]:
    """Run the whole job on the current Ray (call init_ray first). Returns the summary.

    Size the actors for the cluster; plan the shards (a finished directory stops here); tokenize what no
    earlier run did; drop duplicate rows across shards; run the corpus pass of scorers that need one; score
    and write each shard; finalize (the manifest, written last). ``--add-scorers`` is :func:`add_scorers`."""
    if job.existing is not None:
        return add_scorers(job)
    wall = time.perf_counter()
    groups = share_groups(job)  # leader -> the scorers it hosts (base_loss + entropy of one model: one pass)
    resources = size_actors(job, groups)
    work = plan_work(job)
    if (summary := already_complete(job, work)) is not None:
        return summary
    open_output(job, work)
    tally = Tally()
    tokenizers = start_tokenize_actors(job, resources, len(work.to_tokenize))
    # The score actors after them: the worker processes Ray has already started go to tokenizing, the
    # first stage; the score actors load their models while it runs.
    pools = start_score_actors(job, groups, resources)
    tokenize(job, work.to_tokenize, tokenizers, tally)
    sources = drop_duplicates(job, work)
    fitted = corpus_pass(groups, pools, [sources[i] for i in work.indices], tally)
    sinks = {i: ShardSink(str(job.out), i, tuple(job.scorer_infos), job.tokenizer_fp, work.keys[i]) for i in work.pending}
    score_and_write(groups, pools, fitted, [(sources[i], sinks[i]) for i in work.pending], tally)
    return finalize(job, job.config.to_dict(), job.tokenizer_fp, work.indices, tally, wall)


def add_scorers(job: Job) -> dict[str, Any]:
    """``--add-scorers``: score the finished shards of ``job.out`` with the new scorers and rewrite each with
    its new columns (its rows, rejects and metadata stay); then a new manifest. No plan, tokenize or dedupe:
    the shards are the rows. A rerun after an interrupt skips the shards that already hold the new columns."""
    assert job.existing is not None
    out, wall = job.out, time.perf_counter()
    groups = share_groups(job)
    resources = size_actors(job, groups)
    indices = sorted(int(p.stem.split("-")[1]) for p in out.glob(SHARD_GLOB))
    (out / MANIFEST_NAME).unlink(missing_ok=True)  # the directory is unfinished until finalize
    names = set(job.scorer_names)
    pending = [i for i in indices if not names <= {s.name for s in steps.read_shard_metadata(out / steps.shard_name(i)).scorers}]
    tally = Tally()
    pools = start_score_actors(job, groups, resources)
    added = tuple(score_column(n) for n in job.scorer_names)
    sources = {i: ShardSource(str(out), i, staged=False, drop_columns=added) for i in indices}
    fitted = corpus_pass(groups, pools, [sources[i] for i in indices], tally)
    sinks = {i: ShardSink(str(out), i, tuple(job.scorer_infos), job.tokenizer_fp, None) for i in pending}
    score_and_write(groups, pools, fitted, [(sources[i], sinks[i]) for i in pending], tally)
    config = job.config.to_dict()
    if job.existing.config:  # the directory's own settings, with the added scorers
        config = {**job.existing.config, "scorers": [s.name for s in job.scorer_infos], "scorer_options": {
            **job.existing.config.get("scorer_options", {}), **job.config.scorer_options}}
    return finalize(job, config, job.existing.tokenizer, indices, tally, wall)


@dataclass
class Tally:
    """What the summary reports, filled as results come back: each stage's rows, tokens and actor seconds,
    overall (in the order the stages first report) and per Ray node."""

    timers: dict[str, steps.StageTimer] = field(default_factory=dict)
    nodes: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # node id -> stage -> rows, seconds

    def stage(self, name: str) -> steps.StageTimer:
        return self.timers.setdefault(name, steps.StageTimer(name))

    def account(self, stage: str, result: dict[str, Any]) -> None:
        """Add one actor call's ``result`` (rows, tokens, seconds, node) to ``stage``."""
        self.stage(stage).add(result["rows"], result.get("tokens", 0), result["seconds"])
        here = self.nodes.setdefault(result["node"], {}).setdefault(stage, {"rows": 0, "seconds": 0.0})
        here["rows"] += result["rows"]
        here["seconds"] += result["seconds"]


def size_actors(job: Job, groups: dict[str, list[str]]) -> ActorPlan:
    """:func:`plan_actors` for this job's scorer groups on the current Ray cluster's totals."""
    import ray

    resources = ray.cluster_resources()
    model_names = [n for n in groups if getattr(registry.get(n), "uses_gpu", False)]  # scorers that run a torch model
    per_gpu = {n: o.actors_per_gpu for n in groups if hasattr(o := job.scorer_options[n], "actors_per_gpu")}
    return plan_actors(list(groups), model_names, int(resources.get("GPU", 0)), float(resources.get("CPU", 1)),
                       job.config.scorer_actors, job.config.tokenize_actors, per_gpu)


@dataclass
class Work:
    """A fresh annotation's shards: every planned one, those an earlier run finished, those left to tokenize
    (no staging file yet) and to score."""

    keys: dict[int, dict[str, Any]]  # shard index -> its plan key (in its metadata: a rerun knows its own shards)
    done: set[int]
    shard_infos: dict[int, list[ScorerInfo]]  # finished shards -> their scorers (this job's, perhaps more added)
    to_tokenize: list[steps.ShardPlan]
    pending: list[int]

    @property
    def indices(self) -> list[int]:
        return list(self.keys)


def plan_work(job: Job) -> Work:
    """Plan the shards (which records each holds) and find those an earlier run of this job finished."""
    cfg, out = job.config, job.out
    plans = steps.plan_shards(cfg.input, cfg.format, cfg.shard_size, cfg.limit, cfg.max_record_bytes, cfg.container,
                              cfg.columns)
    if not plans:
        raise ValueError(f"no records in {cfg.input}")
    job_key = {"tokenizer": job.tokenizer_fp["sha256"], "max_length": cfg.max_length, "overlength": cfg.overlength,
               **({"system_prompt": cfg.system_prompt} if cfg.system_prompt != "default" else {})}
    keys = {p.index: p.key(job_key) for p in plans}
    done, shard_infos = _finished_shards(out, keys, job.scorer_infos)
    to_tokenize = [p for p in plans if p.index not in done and not steps.staging_path(out, p.index).exists()]
    return Work(keys, done, shard_infos, to_tokenize, [p.index for p in plans if p.index not in done])


def already_complete(job: Job, work: Work) -> dict[str, Any] | None:
    """The summary of a directory with nothing left to do (None when there is work): complete, or every
    shard finished with columns an --add-scorers run added before it stopped short of its manifest."""
    out, n = job.out, len(work.keys)
    if len(work.done) < n:
        return None
    added = _common_prefix(list(work.shard_infos.values()))[len(job.scorer_infos):]
    if (out / MANIFEST_NAME).exists():
        extra = f"; it also has {[s.name for s in added]}, added by --add-scorers" if added else ""
        print(f"{out}: already complete ({n} shards){extra}; nothing to do")
        manifest = Manifest.load(out)
        return {"already_complete": True, "totals": manifest.totals, "rejected": manifest.rejected}
    if not added:
        return None
    # Every shard is this job's, extended by an --add-scorers run that stopped before its manifest: finish
    # the manifest with the columns all shards have; a rerun of that --add-scorers adds the rest.
    print(f"{out}: all {n} shards finished earlier, with {[s.name for s in added]} added by --add-scorers; writing the manifest")
    config = job.config.to_dict()
    config["scorers"] = [s.name for s in job.scorer_infos + added]
    config["scorer_options"] = {**{s.name: s.params for s in added}, **job.config.scorer_options}
    manifest = steps.finalize(out, config, job.tokenizer_fp, job.scorer_infos + added, expected_shards=work.indices,
                              system_turn=job.system_turn)
    return {"already_complete": True, "totals": manifest.totals, "rejected": manifest.rejected}


def open_output(job: Job, work: Work) -> None:
    """Mark the output unfinished (no manifest until finalize), make its staging folder, say what is left."""
    out = job.out
    partial = sorted({s.name for infos in work.shard_infos.values() for s in infos[len(job.scorer_infos):]})
    if partial:
        print(f"note: {out}: some shards also have {partial}, from an --add-scorers run that was interrupted; the "
              f"manifest lists only the columns every shard has. Rerun that --add-scorers command to finish it.")
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    (out / steps.WORK_DIR).mkdir(parents=True, exist_ok=True)
    print(f"{len(work.keys)} shards planned: {len(work.done)} finished earlier, {len(work.to_tokenize)} to tokenize, "
          f"{len(work.pending)} to score")


def start_tokenize_actors(job: Job, resources: ActorPlan, shards: int) -> list:
    """The tokenize actors for ``shards`` shards (none for none); each loads the tokenizer once."""
    import ray

    if not shards:
        return []
    cfg = job.config
    actor_cls = ray.remote(num_cpus=TOKENIZE_CPUS, max_restarts=RETRIES, max_task_retries=-1)(TokenizeActor)
    return [actor_cls.remote(job.model_path, cfg.max_length, cfg.overlength, cfg.strict, cfg.trust_remote_code,
                             job.tokenizer_class, cfg.system_prompt)
            for _ in range(resources.tokenize_actors_for(shards))]


def start_score_actors(job: Job, groups: dict[str, list[str]], resources: ActorPlan) -> dict[str, list]:
    """Each scorer group's actors (leader -> its actors), sized and placed by ``resources``; they build and
    set up their scorers (load their models) as soon as Ray places them."""
    import ray

    pools: dict[str, list] = {}
    for name, members in groups.items():
        actor_cls = ray.remote(num_cpus=resources.score_cpus, num_gpus=resources.gpus_per_actor[name], max_restarts=RETRIES,
                               max_task_retries=-1)(ScoreActor)
        context = ScorerContext(model=job.config.model, device=resources.device(name),
                                trust_remote_code=job.config.trust_remote_code, tokenizer_class=job.tokenizer_class)
        pools[name] = [actor_cls.remote(name, job.scorer_options[name], context, members, resources.cpu_shares[name])
                       for _ in range(resources.pool_sizes[name])]
    return pools


def tokenize(job: Job, plans: list[steps.ShardPlan], actors: list, tally: Tally) -> None:
    """Render and tokenize each shard into its staging file (and its rejects beside it); then stop the actors."""
    import ray

    tally.stage("tokenize")
    if not plans:
        return
    # One call in flight per actor and one more: a shard goes to whichever actor is free first (shards differ
    # in length; a fixed turn would leave one actor idle while the other works through its queue).
    dispatch(in_turn(actors, len(actors) + 1), plans, lambda actor, plan: actor.run.remote(plan, str(job.out)), "tokenize",
             lambda result: tally.account("tokenize", result))
    for actor in actors:
        ray.kill(actor)


def drop_duplicates(job: Job, work: Work) -> dict[int, ShardSource]:
    """Find the rows whose ids an earlier row has (across all shards, in plan order: deterministic) and
    return each shard's source: its staging file less those rows, or the shard itself if finished earlier.
    (The rows are dropped, and counted as rejects, where the source is read: in the first score actor.)"""
    out = job.out
    ids = {}
    for index in work.indices:
        path = out / steps.shard_name(index) if index in work.done else steps.staging_path(out, index)
        ids[index] = pq.read_table(path, columns=[ID])[ID].to_pylist()
    duplicates = steps.find_duplicates(ids)
    return {i: ShardSource(str(out), i, staged=False) if i in work.done else
            ShardSource(str(out), i, staged=True, duplicate_rows=tuple(duplicates.get(i, [])))
            for i in work.indices}


def corpus_pass(groups: dict[str, list[str]], pools: dict[str, list], sources: list[ShardSource],
                tally: Tally) -> dict[str, Any]:
    """For each scorer that needs one (TF-IDF's IDF): collect a part from every shard on its actors, combine
    the parts in shard order; returns leader -> the ref of its fitted state."""
    import ray

    fitted: dict[str, Any] = {}
    for name in groups:
        if not registry.needs_corpus_pass(name):
            continue
        timer = tally.stage(f"{name}:fit")
        start = time.perf_counter()
        parts: dict[int, Any] = {}
        read = {"rows": 0, "tokens": 0}  # what the pass read: every shard's rows and tokens

        def collected(result: tuple[int, Any, dict[str, int]]) -> None:
            index, part, counts = result
            parts[index] = part
            read["rows"] += counts["rows"]
            read["tokens"] += counts["tokens"]

        actors = pools[name]
        dispatch(in_turn(actors, 2 * len(actors) + 1), sources, lambda actor, source: actor.collect.remote(source),
                 f"{name} corpus pass", collected)
        # Held until the job ends: every score call of this scorer carries it (a restarted actor fits again).
        fitted[name] = ray.put(registry.get(name).combine([parts[i] for i in sorted(parts)]))
        timer.add(read["rows"], read["tokens"], time.perf_counter() - start)
    return fitted


def score_and_write(groups: dict[str, list[str]], pools: dict[str, list], fitted: dict[str, Any],
                    shards: list[tuple[ShardSource, ShardSink]], tally: Tally) -> None:
    """Each shard through the chain of the scorer groups' actors: the first reads it, each adds its columns,
    the last writes it (atomically). A staged shard's staging files go once the driver has seen it written.
    Then the score actors stop."""
    import ray

    names = list(groups)
    # Lane k: the k-th actor (in turn) of every group. 2 x the largest pool + 1 shards in flight: each actor
    # has its next shard queued, and the driver holds at most that many shards' refs.
    chains = [tuple(pools[name][k % len(pools[name])] for name in names) for k in range(2 * max(len(p) for p in pools.values()) + 1)]
    stat_refs: dict[int, list] = {}

    def call(chain: tuple, shard: tuple[ShardSource, ShardSink]):
        data: Any
        data, sink = shard
        stat_refs[sink.index] = []
        for position, (name, actor) in enumerate(zip(names, chain)):
            fit_state = [fitted[name]] if name in fitted else None
            last = position == len(names) - 1
            data, stats_ref = actor.score.options(num_returns=2).remote(data, fit_state, sink if last else None)
            stat_refs[sink.index].append(("+".join(groups[name]), stats_ref))  # a shared pass is timed once
        return stats_ref

    tally.stage("write")
    staged = {sink.index: source for source, sink in shards if source.staged}

    def written(last_stats: dict) -> None:
        index = last_stats["write"]["index"]
        tally.account("write", last_stats["write"])
        for name, ref in stat_refs.pop(index):
            tally.account(name, ray.get(ref))
        if index in staged:  # written: a retry can no longer need them
            steps.staging_path(Path(staged[index].out), index).unlink(missing_ok=True)
            steps.staging_rejects_path(Path(staged[index].out), index).unlink(missing_ok=True)

    dispatch(chains, shards, call, "score+write", written)
    for actors in pools.values():
        for actor in actors:
            ray.kill(actor)


def finalize(job: Job, config: dict[str, Any], tokenizer_fp: dict[str, str], indices: list[int], tally: Tally,
             wall: float) -> dict[str, Any]:
    """Check every planned shard is there, write the rejects and the manifest (last: the directory is now
    finished), and return the summary (``wall``: when the job started)."""
    manifest = steps.finalize(job.out, config, tokenizer_fp, job.scorer_infos, expected_shards=indices, system_turn=job.system_turn)
    seconds = time.perf_counter() - wall
    return {
        "output": str(job.out), "shards": len(manifest.shards), "totals": manifest.totals, "rejected": manifest.rejected,
        "stages": {k: t.to_dict() for k, t in tally.timers.items()}, "nodes": _node_summary(tally.nodes),
        "wall_seconds": seconds, "tokens_per_s": manifest.totals.get("tokens", 0) / seconds if seconds > 0 else None,
        "system_prompt": manifest.system_prompt,
    }


def _node_summary(nodes: dict[str, dict[str, dict[str, float]]]) -> list[dict[str, Any]]:
    """Per Ray node: its id and address, and the rows and actor seconds of each stage run there."""
    import ray

    addresses = {n["NodeID"]: n.get("NodeManagerAddress", "") for n in ray.nodes()}
    return [{"node_id": node, "address": addresses.get(node, "gone"), "stages": stages} for node, stages in sorted(nodes.items())]


class ClusterTooSmall(ValueError):
    """The job asks for more actors than the cluster can host at once (Ray would wait for ever for the rest)."""


@dataclass(frozen=True)
class ActorPlan:
    """The job's actors and what each reserves: :func:`plan_actors`' answer, everything Ray is asked for."""

    pool_sizes: dict[str, int]  # scorer group leader -> its actors
    gpus_per_actor: dict[str, float]  # scorer group leader -> each actor's num_gpus (0 on CPU)
    score_cpus: float  # num_cpus of each score actor
    # Scorer group leader -> the CPUs whose cores each of its actors runs as torch threads (see ScoreActor): for a
    # model scorer on CPU, the cluster's CPUs over the job's model actors on CPU; 0 for the others.
    cpu_shares: dict[str, float]
    tokenize_cpus_free: float  # the CPUs the score actors leave for tokenize actors
    tokenize_actors: int  # --tokenize-actors (0: auto, see tokenize_actors_for)
    cpu_total: float  # the cluster's CPUs

    def device(self, name: str) -> str:
        """Where scorer group ``name``'s actors run their models."""
        return "cuda" if self.gpus_per_actor[name] else "cpu"

    def tokenize_actors_for(self, shards: int) -> int:
        """Tokenize actors for ``shards`` shards to tokenize: --tokenize-actors, or one per CPU in what the score
        actors leave (tokenizing runs before any scoring), at most one a shard; at least one."""
        return self.tokenize_actors or max(1, min(shards, max(1, int(self.cpu_total)), int(self.tokenize_cpus_free / TOKENIZE_CPUS)))


TOKENIZE_CPUS = 0.5  # num_cpus of a tokenize actor


def plan_actors(groups: list[str], model_names: list[str], gpus: int, cpu_total: float, scorer_actors: int = 0,
                tokenize_actors: int = 0, actors_per_gpu: dict[str, int] | None = None) -> ActorPlan:
    """How many actors each scorer group gets and what each reserves, from the cluster's totals; a pure function.

    Model scorers (``model_names``) run on GPUs when the cluster has some: each GPU is split evenly between
    them, and a scorer's share between its ``actors_per_gpu`` actors (a host-bound scorer, llmlingua2, keeps a
    GPU busy only with several), so auto = ``gpus x actors_per_gpu`` actors, each ``1 / (len(model_names) x
    actors_per_gpu)`` of a GPU. On CPU a model scorer gets one actor (its torch threads use the cores); the
    cheap CPU scorers (tfidf) split the CPUs among the groups, which would otherwise score on one core while
    the rest idle once tokenizing is done. ``scorer_actors`` (``--scorer-actors``) overrides every group's size.
    Model actors on CPU split the cluster's CPUs between them as torch threads (``cpu_shares``); tokenize actors
    get what the score actors leave (:meth:`ActorPlan.tokenize_actors_for`).

    ClusterTooSmall, naming the option, when the actors could not all be placed at once: more GPU actors than
    the GPUs' shares hold, or more score and tokenize actors than the CPUs hold (a check of the cluster's
    totals: Ray would start what fits and wait for ever for the rest)."""
    apg = {name: (actors_per_gpu or {}).get(name, 1) for name in groups}
    gpu_names = [n for n in groups if n in model_names] if gpus else []
    cheap_size = max(1, int(cpu_total) // max(1, len(groups)))
    sizes = {name: scorer_actors or (gpus * apg[name] if name in gpu_names else 1 if name in model_names else cheap_size)
             for name in groups}
    per_actor = {name: 1.0 / (len(gpu_names) * apg[name]) if name in gpu_names else 0.0 for name in groups}
    for name in gpu_names:
        fit = gpus * apg[name]
        if sizes[name] > fit:
            hint = (f" (--scorer-option {name}.actors_per_gpu=N lets N share a GPU)" if apg[name] == 1 and
                    name in (actors_per_gpu or {}) else "")
            shared = f", each GPU split between {', '.join(gpu_names)}" if len(gpu_names) > 1 else ""
            raise ClusterTooSmall(
                f"--scorer-actors {scorer_actors}: {sizes[name]} {name} actors of {per_actor[name]:g} GPU each need "
                f"{sizes[name] * per_actor[name]:g} GPUs, the cluster has {gpus}{shared}: at most {fit} fit, and Ray would "
                f"wait for ever for the rest. Use --scorer-actors {fit} or less, or 0 (auto){hint}")
    total = sum(sizes.values())
    # Half a CPU per actor, less when the scorers would take all but half a CPU: that half is left for the
    # tokenize actors, which would otherwise wait for ever beside idle score actors.
    score_cpus = min(0.5, max(0.01, (cpu_total - TOKENIZE_CPUS) / max(1, total)))
    free = cpu_total - score_cpus * total
    if free < TOKENIZE_CPUS - 1e-9:
        raise ClusterTooSmall(f"--scorer-actors {scorer_actors}: {total} score actors leave no room for a tokenize actor "
                              f"on the cluster's {cpu_total:g} CPUs; use fewer, or 0 (auto)")
    if tokenize_actors and tokenize_actors * TOKENIZE_CPUS > free + 1e-9:
        raise ClusterTooSmall(f"--tokenize-actors {tokenize_actors}: each takes {TOKENIZE_CPUS:g} CPU and the score actors "
                              f"leave {free:g} of the cluster's {cpu_total:g} CPUs: at most {int(free / TOKENIZE_CPUS + 1e-9)} "
                              f"fit; Ray would wait for ever for the rest. Use fewer, or 0 (auto)")
    # Model actors on CPU (base_loss, llmlingua2 without a GPU) split the cluster's cores between them.
    cpu_models = [n for n in groups if n in model_names and n not in gpu_names]
    cpu_model_actors = sum(sizes[n] for n in cpu_models)
    shares = {name: cpu_total / cpu_model_actors if name in cpu_models else 0.0 for name in groups}
    return ActorPlan(sizes, per_actor, score_cpus, shares, free, tokenize_actors, cpu_total)


def share_groups(job: Job) -> dict[str, list[str]]:
    """The job's scorers grouped by ``share_key`` (first of each group -> its members, in job order);
    a scorer without one, or with a corpus pass, is a group of its own."""
    context = ScorerContext(model=job.config.model, trust_remote_code=job.config.trust_remote_code)
    groups: dict[str, list[str]] = {}
    leaders: dict[Any, str] = {}
    for name in job.scorer_names:
        cls = registry.get(name)
        key = None
        if hasattr(cls, "share_key") and not registry.needs_corpus_pass(name):
            key = cls(job.scorer_options[name], context).share_key()
        if key is not None and key in leaders:
            groups[leaders[key]].append(name)
            continue
        if key is not None:
            leaders[key] = name
        groups[name] = [name]
    return groups


def _finished_shards(out: Path, plan_keys: dict[int, dict], infos: list[ScorerInfo]) -> tuple[set[int], dict[int, list[ScorerInfo]]]:
    """Shards already on disk for exactly this plan and these scorers, and each one's scorers: this
    job's, possibly followed by columns a later --add-scorers appended. A foreign shard is an error."""
    done, shard_infos = set(), {}
    wanted = [vars(s) for s in infos]
    for index, key in plan_keys.items():
        path = out / steps.shard_name(index)
        if not path.exists():
            continue
        meta = steps.read_shard_metadata(path)
        same_plan = meta is not None and all(meta.plan.get(k) == v for k, v in key.items())
        if not same_plan or [vars(s) for s in meta.scorers][:len(wanted)] != wanted:
            raise ValueError(
                f"{path} was written by a different job (other input, model, system prompt, max_length or scorers); "
                f"use a new --output, or --add-scorers to add score columns"
            )
        done.add(index)
        shard_infos[index] = meta.scorers
    return done, shard_infos


def finished_shards(job: Job) -> tuple[int, int | None]:
    """(shards finished, shards planned or None when unknown) of this job's output, for the interrupt line:
    a written shard file is finished (writes are atomic); under --add-scorers, one holding the new columns."""
    paths = sorted(job.out.glob(SHARD_GLOB))
    if job.existing is not None:
        names = set(job.scorer_names)
        done = sum(1 for p in paths if names <= {s.name for s in (steps.read_shard_metadata(p) or steps.ShardMetadata(1, {}, [], 0)).scorers})
        return done, len(paths)
    try:
        total = len(steps.plan_shards(job.config.input, job.config.format, job.config.shard_size, job.config.limit,
                                      job.config.max_record_bytes, job.config.container, job.config.columns))
    except Exception:  # noqa: BLE001 - only for the message
        total = None
    return len(paths), total


def _common_prefix(lists: list[list[ScorerInfo]]) -> list[ScorerInfo]:
    """The scorers every shard has, in column order (the longest common prefix)."""
    if not lists:
        return []
    common = lists[0]
    for infos in lists[1:]:
        n = 0
        while n < min(len(common), len(infos)) and vars(common[n]) == vars(infos[n]):
            n += 1
        common = common[:n]
    return list(common)


def print_summary(summary: dict[str, Any]) -> None:
    if summary.get("already_complete"):
        return
    totals = summary["totals"]
    print("\n== annotate summary ==")
    print(f"output      {summary['output']}  ({summary['shards']} shards)")
    print(f"rows        {totals.get('rows', 0):,}   tokens {totals.get('tokens', 0):,}   trainable {totals.get('trainable_tokens', 0):,}   truncated {totals.get('truncated', 0):,}")
    line = system_prompt_line(summary.get("system_prompt") or {})
    if line:
        print(f"system      {line}")
    rejected = summary["rejected"]
    print(f"rejected    {sum(rejected.values()):,}" + (f"  ({', '.join(f'{k}: {v}' for k, v in rejected.items())}; see {REJECTS_NAME})" if rejected else ""))
    for stage in summary["stages"].values():
        rate = f"{stage['tokens_per_s']:,.0f} tokens/s" if stage.get("tokens_per_s") else ""
        print(f"  {stage['name']:<16} {stage['rows']:>8,} rows {stage['tokens']:>11,} tokens {stage['seconds']:>8.1f} s (actor time)  {rate}")
    if len(summary.get("nodes", [])) > 1:
        for node in summary["nodes"]:
            work = ", ".join(f"{stage} {v['rows']:,} rows {v['seconds']:.1f} s" for stage, v in node["stages"].items())
            print(f"  node {node['node_id'][-8:]} ({node['address']}): {work}")  # tail: fake nodes' ids differ only there
    print(f"wall        {summary['wall_seconds']:.1f} s   {summary['tokens_per_s'] or 0:,.0f} tokens/s overall")
