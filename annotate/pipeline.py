"""The Ray plumbing of the annotate job: the one place that knows about Ray, and nothing of any scorer.

    plan (driver) -> tokenize (actor pool) -> dedupe (driver) -> corpus pass (only scorers that need one)
                  -> per shard: scorer 1 actor (reads it) -> scorer 2 actor ... -> last (writes it, atomic)
                  -> finalize

Shards flow through per-scorer actor pools as Ray object refs, with a bounded number in flight, so
scorers run concurrently on different shards and a slow GPU scorer keeps its GPU busy. Each actor
reserves a fraction of a CPU (whole CPUs per actor would leave the tokenize actors none on a 2-core
machine) and, for model scorers on a GPU cluster, a share of a GPU (so every GPU scorer fits beside
the others on each GPU instead of waiting for a whole one); a model scorer on CPU runs as many torch
threads as its share of the cluster's cores.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter, deque
from dataclasses import dataclass, replace
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
from data.models import check_model, load_tokenizer, tokenizer_class_name
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
    fp = tokenizer_fingerprint(tokenizer)
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
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise OSError(f"output {out} is not writable: {exc}") from None
    return Job(config, out, model_path, fp, tokenizer_class, names, options, infos, existing)


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
    ray.init(include_dashboard=False)


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
                 tokenizer_class: str = ""):
        self.tokenizer = load_tokenizer(model_path, trust_remote_code, tokenizer_class=tokenizer_class)
        self.max_length, self.overlength, self.strict = max_length, overlength, strict

    def run(self, plan: steps.ShardPlan, out: str) -> dict[str, Any]:
        start = time.perf_counter()
        table, rejects, truncated = steps.tokenize_shard(plan, self.tokenizer, self.max_length, self.overlength, self.strict)
        out_dir = Path(out)
        steps.write_rejects(rejects, steps.staging_rejects_path(out_dir, plan.index))
        steps.write_table_atomic(table.replace_schema_metadata({b"truncated": str(truncated).encode()}), steps.staging_path(out_dir, plan.index))
        tokens = int(pc.sum(pc.list_value_length(table[INPUT_IDS])).as_py() or 0)
        return {"rows": table.num_rows, "tokens": tokens, "rejects": len(rejects), "seconds": time.perf_counter() - start,
                "node": _node()}


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

    def collect(self, source: ShardSource) -> Any:
        return self.scorer.collect(source.load()[0])

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
        return {"index": self.index, "rows": table.num_rows, "seconds": time.perf_counter() - start, "node": _node()}


# The interrupts (KeyboardInterrupt, run.py's Terminated) the driver's signal handlers received. A
# handler's raise can be lost when the signal lands inside Ray's own code (which defers SIGINT during
# task submission, and wraps exceptions raised inside its compiled calls): the job loop raises it again
# between waits, so a Ctrl-C or SIGTERM always stops the job within a second.
received_interrupts: list[type[BaseException]] = []


def _run_bounded(items: list, submit: Callable[[Any], Any], max_in_flight: int, desc: str,
                 on_done: Callable[[Any, Any], None]) -> None:
    """Submit work item by item, keep at most ``max_in_flight`` running, report each as it finishes."""
    import ray

    pending: dict[Any, Any] = {}
    queue = deque(items)
    with tqdm(total=len(items), desc=desc, unit="shard", dynamic_ncols=True) as bar:
        while queue or pending:
            while queue and len(pending) < max_in_flight:
                item = queue.popleft()
                pending[submit(item)] = item
            # A short timeout, so the main thread runs Python between waits: a SIGTERM handler cannot run
            # inside ray.wait, and after a process-group kill the same signal has stopped the raylet, whose
            # death the core worker answers by exiting the process (status 1, no line) within about a second
            # (one CI run of the sigterm-group test lost that race at 1.0 s). 0.1 s answers first.
            done, _ = ray.wait(list(pending), num_returns=1, timeout=0.1)
            if received_interrupts:
                raise received_interrupts[0]()
            for ref in done:
                item = pending.pop(ref)
                on_done(item, ray.get(ref))
                bar.update(1)


# ---------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------


def run(job: Job) -> dict[str, Any]:
    """Run the whole job on the current Ray (call init_ray first). Returns the summary."""
    import ray

    cfg, out = job.config, job.out
    wall = time.perf_counter()
    timers: dict[str, steps.StageTimer] = {}
    adding = job.existing is not None
    gpus = int(ray.cluster_resources().get("GPU", 0))
    cpu_total = float(ray.cluster_resources().get("CPU", 1))
    cpus = max(1, int(cpu_total))

    # -- scorer actors: started before tokenizing, so they load their models meanwhile -------------------
    groups = share_groups(job)  # leader -> the scorers it hosts (base_loss + entropy of one model: one pass)
    model_names = [n for n in groups if getattr(registry.get(n), "uses_gpu", False)]  # scorers that run a torch model
    gpu_names = model_names if gpus else []
    pools: dict[str, list] = {}  # scorer group leader -> its actors
    plan = plan_actors(list(groups), model_names, gpus, cpu_total, cfg.scorer_actors, cfg.tokenize_actors,
                       {n: o.actors_per_gpu for n in groups if hasattr(o := job.scorer_options[n], "actors_per_gpu")})
    pool_sizes, score_cpus = plan.pool_sizes, plan.score_cpus
    # Model actors on CPU (base_loss, llmlingua2 without a GPU) split the cluster's cores between them.
    cpu_model_names = [n for n in model_names if n not in gpu_names]
    cpu_model_actors = sum(pool_sizes[n] for n in cpu_model_names)
    cpu_share = cpu_total / cpu_model_actors if cpu_model_actors else 0.0

    def start_pool(name: str) -> None:
        on_gpu = name in gpu_names
        n_actors = pool_sizes[name]
        actor_cls = ray.remote(num_cpus=score_cpus, num_gpus=plan.gpus_per_actor[name], max_restarts=RETRIES,
                               max_task_retries=-1)(ScoreActor)
        context = ScorerContext(model=cfg.model, device="cuda" if on_gpu else "cpu", trust_remote_code=cfg.trust_remote_code,
                                tokenizer_class=job.tokenizer_class)
        share = cpu_share if name in cpu_model_names else 0.0
        pools[name] = [actor_cls.remote(name, job.scorer_options[name], context, groups[name], share) for _ in range(n_actors)]

    def start_pools() -> None:
        for name in groups:
            start_pool(name)

    nodes: dict[str, dict[str, dict[str, float]]] = {}  # node id -> stage -> rows and actor seconds there

    def account(stage: str, result: dict[str, Any]) -> None:
        timers.setdefault(stage, steps.StageTimer(stage)).add(result["rows"], result.get("tokens", 0), result["seconds"])
        here = nodes.setdefault(result["node"], {}).setdefault(stage, {"rows": 0, "seconds": 0.0})
        here["rows"] += result["rows"]
        here["seconds"] += result["seconds"]

    if adding:
        indices = sorted(int(p.stem.split("-")[1]) for p in out.glob(SHARD_GLOB))
        (out / MANIFEST_NAME).unlink(missing_ok=True)  # the directory is unfinished until finalize
        pending = [i for i in indices if not {n for n in job.scorer_names} <= {s.name for s in steps.read_shard_metadata(out / steps.shard_name(i)).scorers}]
        duplicates: dict[int, list[int]] = {}
        plan_keys: dict[int, dict] = {}
        start_pools()
    else:
        plans = steps.plan_shards(cfg.input, cfg.format, cfg.shard_size, cfg.limit, cfg.max_record_bytes, cfg.container,
                                  cfg.columns)
        if not plans:
            raise ValueError(f"no records in {cfg.input}")
        job_key = {"tokenizer": job.tokenizer_fp["sha256"], "max_length": cfg.max_length, "overlength": cfg.overlength}
        plan_keys = {p.index: p.key(job_key) for p in plans}
        indices = [p.index for p in plans]
        done, shard_infos = _finished_shards(out, plan_keys, job.scorer_infos)
        added = _common_prefix(list(shard_infos.values()))[len(job.scorer_infos):] if len(done) == len(plans) else []
        if (out / MANIFEST_NAME).exists() and len(done) == len(plans):
            extra = f"; it also has {[s.name for s in added]}, added by --add-scorers" if added else ""
            print(f"{out}: already complete ({len(plans)} shards){extra}; nothing to do")
            manifest = Manifest.load(out)
            return {"already_complete": True, "totals": manifest.totals, "rejected": manifest.rejected}
        if added:
            # Every shard is this job's, extended by an --add-scorers run that stopped before its manifest:
            # finish the manifest with the columns all shards have; a rerun of that --add-scorers adds the rest.
            print(f"{out}: all {len(plans)} shards finished earlier, with {[s.name for s in added]} added by --add-scorers; "
                  f"writing the manifest")
            config = cfg.to_dict()
            config["scorers"] = [s.name for s in job.scorer_infos + added]
            config["scorer_options"] = {**{s.name: s.params for s in added}, **cfg.scorer_options}
            manifest = steps.finalize(out, config, job.tokenizer_fp, job.scorer_infos + added, expected_shards=indices)
            return {"already_complete": True, "totals": manifest.totals, "rejected": manifest.rejected}
        partial = sorted({s.name for infos in shard_infos.values() for s in infos[len(job.scorer_infos):]})
        if partial:
            print(f"note: {out}: some shards also have {partial}, from an --add-scorers run that was interrupted; the "
                  f"manifest lists only the columns every shard has. Rerun that --add-scorers command to finish it.")
        (out / MANIFEST_NAME).unlink(missing_ok=True)
        (out / steps.WORK_DIR).mkdir(parents=True, exist_ok=True)
        to_tokenize = [p for p in plans if p.index not in done and not steps.staging_path(out, p.index).exists()]
        pending = [p.index for p in plans if p.index not in done]
        print(f"{len(plans)} shards planned: {len(done)} finished earlier, {len(to_tokenize)} to tokenize, {len(pending)} to score")

        # -- tokenize ------------------------------------------------------------------------
        timers.setdefault("tokenize", steps.StageTimer("tokenize"))
        if not to_tokenize:
            start_pools()
        else:
            # One per CPU, in what the score actors leave (tokenizing runs before any scoring).
            free = cpu_total - score_cpus * sum(pool_sizes.values())
            n_actors = cfg.tokenize_actors or max(1, min(len(to_tokenize), cpus, int(free / 0.5)))
            actor_cls = ray.remote(num_cpus=0.5, max_restarts=RETRIES, max_task_retries=-1)(TokenizeActor)
            actors = [actor_cls.remote(job.model_path, cfg.max_length, cfg.overlength, cfg.strict, cfg.trust_remote_code,
                                       job.tokenizer_class)
                      for _ in range(n_actors)]
            # The score actors after them: the worker processes Ray has already started go to tokenizing,
            # the first stage; the score actors load their models while it runs.
            start_pools()
            # Each shard goes to the actor with the fewest in flight, one queued beyond one each: shards differ in
            # length, and a fixed turn would leave one actor idle while the other works through its queue.
            in_flight = [0] * n_actors
            owner: dict[int, int] = {}

            def submit_tokenize(plan: steps.ShardPlan):
                k = owner[plan.index] = min(range(n_actors), key=in_flight.__getitem__)
                in_flight[k] += 1
                return actors[k].run.remote(plan, str(out))

            def tokenized(plan: steps.ShardPlan, result: dict[str, Any]) -> None:
                in_flight[owner.pop(plan.index)] -= 1
                account("tokenize", result)

            _run_bounded(to_tokenize, submit_tokenize, n_actors + 1, "tokenize", tokenized)
            for actor in actors:
                ray.kill(actor)

        # -- dedupe (global, deterministic) ---------------------------------------------------
        ids = {}
        for index in indices:
            path = out / steps.shard_name(index) if index in done else steps.staging_path(out, index)
            ids[index] = pq.read_table(path, columns=[ID])[ID].to_pylist()
        duplicates = steps.find_duplicates(ids)

    added_columns = tuple(score_column(n) for n in job.scorer_names) if adding else ()

    def source(index: int, finished: bool = False) -> ShardSource:
        if adding or finished:
            return ShardSource(str(out), index, staged=False, drop_columns=added_columns)
        return ShardSource(str(out), index, staged=True, duplicate_rows=tuple(duplicates.get(index, [])))

    # -- corpus pass (e.g. TF-IDF's IDF over every shard, aggregated across workers) -------------
    fit_states: dict[str, Any] = {}
    for name in groups:
        if not registry.needs_corpus_pass(name):
            continue
        timer = timers.setdefault(f"{name}:fit", steps.StageTimer(f"{name}:fit"))
        start = time.perf_counter()
        parts: dict[int, Any] = {}
        actors = pools[name]
        turn = iter(range(1 << 62))

        def submit_collect(index: int):
            return actors[next(turn) % len(actors)].collect.remote(source(index, finished=index in done_for_collect))

        done_for_collect = set() if adding else set(i for i in indices if (out / steps.shard_name(i)).exists() and i not in pending)
        _run_bounded(indices, submit_collect, 2 * len(actors) + 1, f"{name} corpus pass", lambda i, r: parts.__setitem__(i, r))
        # Held until the job ends: every score call of this scorer carries it (a restarted actor fits again).
        fit_states[name] = ray.put(registry.get(name).combine([parts[i] for i in sorted(parts)]))
        timer.add(0, 0, time.perf_counter() - start)

    # -- score and write ----------------------------------------------------------------------
    stat_refs: dict[int, list] = {}
    turn = iter(range(1 << 62))

    def submit_shard(index: int):
        # The chain of the job's scorer groups: the first reads the shard, each adds its columns, the last writes.
        shard: Any = source(index)
        sink = ShardSink(str(out), index, tuple(job.scorer_infos), job.tokenizer_fp, None if adding else plan_keys[index])
        k = next(turn)
        stat_refs[index] = []
        names = list(groups)
        for position, name in enumerate(names):
            actors = pools[name]
            fit_state = [fit_states[name]] if name in fit_states else None
            last = position == len(names) - 1
            shard, stats_ref = actors[k % len(actors)].score.options(num_returns=2).remote(shard, fit_state, sink if last else None)
            stat_refs[index].append(("+".join(groups[name]), stats_ref))  # a shared pass is timed once
        return stats_ref

    timers.setdefault("write", steps.StageTimer("write"))

    def shard_done(index: int, last_stats: dict) -> None:
        account("write", last_stats["write"])
        for name, ref in stat_refs.pop(index):
            account(name, ray.get(ref))
        if not adding:  # written: a retry can no longer need them
            steps.staging_path(out, index).unlink(missing_ok=True)
            steps.staging_rejects_path(out, index).unlink(missing_ok=True)

    max_in_flight = 2 * max(len(p) for p in pools.values()) + 1 if pools else 4
    _run_bounded(pending, submit_shard, max_in_flight, "score+write", shard_done)
    for actors in pools.values():
        for actor in actors:
            ray.kill(actor)

    # -- finalize ---------------------------------------------------------------------------------
    config = cfg.to_dict()
    if adding and job.existing is not None and job.existing.config:
        config = {**job.existing.config, "scorers": [s.name for s in job.scorer_infos], "scorer_options": {
            **job.existing.config.get("scorer_options", {}), **cfg.scorer_options}}
    manifest = steps.finalize(out, config, job.tokenizer_fp if not adding else job.existing.tokenizer, job.scorer_infos,
                              expected_shards=indices)
    seconds = time.perf_counter() - wall
    summary = {
        "output": str(out), "shards": len(manifest.shards), "totals": manifest.totals, "rejected": manifest.rejected,
        "stages": {k: t.to_dict() for k, t in timers.items()}, "nodes": _node_summary(nodes), "wall_seconds": seconds,
        "tokens_per_s": manifest.totals.get("tokens", 0) / seconds if seconds > 0 else None,
    }
    return summary


def _node_summary(nodes: dict[str, dict[str, dict[str, float]]]) -> list[dict[str, Any]]:
    """Per Ray node: its id and address, and the rows and actor seconds of each stage run there."""
    import ray

    addresses = {n["NodeID"]: n.get("NodeManagerAddress", "") for n in ray.nodes()}
    return [{"node_id": node, "address": addresses.get(node, "gone"), "stages": stages} for node, stages in sorted(nodes.items())]


class ClusterTooSmall(ValueError):
    """The job asks for more actors than the cluster can host at once (Ray would wait for ever for the rest)."""


@dataclass(frozen=True)
class ActorPlan:
    pool_sizes: dict[str, int]  # scorer group leader -> its actors
    gpus_per_actor: dict[str, float]  # scorer group leader -> each actor's num_gpus (0 on CPU)
    score_cpus: float  # num_cpus of each score actor


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
    return ActorPlan(sizes, per_actor, score_cpus)


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
                f"{path} was written by a different job (other input, model, max_length or scorers); "
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
