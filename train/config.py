"""Train job configuration: nested dataclasses hold every default; YAML overrides them; ``a.b=c`` overrides YAML.

    python -m train.main --config train/configs/lima_sftgo.yaml optim.lr=2e-5 loss.lambda=0.8
    python -m train.main --help                       # every key, its type, default and meaning

Keys are the dataclass field names, dotted by section (``optim.lr``), with one exception: the
field ``LossConfig.lambda_`` is the key ``loss.lambda`` in YAML, on the command line and in saved
configs (``lambda`` is a Python keyword). Values on the command line are parsed with
``yaml.safe_load`` (``loss.rho1_rho=null``, ``optim.betas=[0.9,0.95]``) except for string options,
which take the text as written (``data.train=007``) unless it is quoted (``data.validation="''"``
is empty; so is ``data.validation=``). Every value is checked against the field's type (``1e-5``
is accepted for a float although YAML 1.1 reads it as a string); unknown keys are errors that
name the key, where it came from and the nearest known key.

Order: defaults <- each ``--config FILE`` in turn <- each ``a.b=c`` in turn (``--a.b=c`` and
``--a.b c`` are accepted too). :func:`load_config` only parses; :func:`validate` checks values and
:func:`validate_against_data` checks them against an annotated directory's manifest.

DeepSpeed: ``deepspeed_config`` names a checked-in ZeRO JSON without "optimizer" or "scheduler"
sections (the trainer passes a client ``torch.optim.AdamW`` and a LambdaLR built from ``optim``).
Values written as the string ``"auto"`` are filled from this config by :func:`deepspeed_dict`:

    gradient_accumulation_steps  <- train.grad_accum
    gradient_clipping            <- optim.grad_clip (0 where the trainer clips: :func:`trainer_clips_gradients`)
    bf16.enabled                 <- the resolved train.dtype == "bfloat16"
    train_micro_batch_size_per_gpu <- 1 (one packed row of up to data.micro_batch_tokens tokens)
    train_batch_size             <- grad_accum * world_size (packed rows per optimizer step)
    zero_optimization.stage      <- train.zero_stage, resolved (``auto``: :func:`train.main.choose_zero_stage`)

Any other "auto" is an error, so a new placeholder cannot pass silently.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from schemas.shard import EXCESS_LOSS, EXCESS_LOSS_PARTS, Manifest, atomic_write_text, score_names
from train.schedule import SCHEDULES

REPO = Path(__file__).resolve().parents[1]
REPORTERS = ("jsonl", "tensorboard", "wandb")
LR_SCHEDULES = SCHEDULES  # train.schedule owns the names
DTYPES = ("auto", "float32", "bfloat16")
RESUME_MODES = ("auto", "never")
ZERO_STAGES = ("auto", "0", "1", "2", "3")
REF_LOSS = EXCESS_LOSS_PARTS[1]


class ConfigError(ValueError):
    """A bad key or value; the message names the option (and the file it came from)."""


def _opt(default: Any = dataclasses.MISSING, help: str = "", *, key: str | None = None, factory: Any = None) -> Any:
    """A dataclass field with its help text (and, for ``lambda_``, its YAML/CLI key) kept beside it."""
    metadata = {"help": help}
    if key is not None:
        metadata["key"] = key
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class DataConfig:
    train: str = _opt("", "annotated directory or fsspec URI (s3://, gs://) to train on (required)")
    validation: str = _opt("", "held-out annotated directory for eval; '' = none")
    micro_batch_tokens: int = _opt(4096, "packing budget: tokens per micro-batch (one packed row); an example longer than it is a micro-batch alone")
    num_workers: int = _opt(0, "DataLoader workers reading shards (0 = in the main process)")
    shuffle: bool = _opt(True, "shuffle row groups and rows each epoch (seeded by seed and epoch)")
    deep_validate: bool = _opt(True, "read every shard once before step 1 (checksums, list lengths, NaN/inf scores, unique ids) so bad data fails before training; false: footer checks only (faster on huge data; the stream still refuses a NaN it meets)")


@dataclass
class ImportanceConfig:
    scorer: str = _opt("tfidf", "score that groups tokens: any stored scorer name (tfidf, llmlingua2, ref_loss, ...) or excess_loss (= base_loss - ref_loss)")
    rho: float = _opt(0.7, "threshold in [0, 1): the top ceil((1 - rho) * n) tokens of each scope are important (0.7 = the paper's 70th percentile)")
    scope: str = _opt("sequence", "where the top tokens are ranked: sequence (SFT-GO, per example) | batch (Rho-1, per global batch) | corpus (one threshold from the manifest)")


@dataclass
class LossConfig:
    name: str = _opt("sftgo", "objective: sft | sftgo | rho1 | infosft | dft | select | weighted (METHOD.md 'Losses'; select = CE over the important group only, Token Cleaning; weighted = sum w*CE / sum w, w from the score)")
    lambda_: float = _opt(0.9, "SFT-GO's weight on max(L_1, L_0) with lambda_schedule static, in [0, 1]", key="lambda")
    lambda_schedule: str = _opt("static", "static (lambda) | linear (lambda_max -> lambda_min over the training steps)")
    lambda_max: float = _opt(0.9, "linear schedule: lambda at the first step")
    lambda_min: float = _opt(0.05, "linear schedule: lambda at the last step")
    infosft_p: float = _opt(0.93, "InfoSFT: confidence above which a token gets no weight, in (0.5, 1)")
    rho1_rho: float | None = _opt(None, "rho1: train the top 1 - rho of tokens by live excess loss; null = importance.rho")
    weight_transform: str = _opt("rank", "weighted: w from importance.scorer's score: identity (w = s) | rank (rank in importance.scope, in [0, 1]; sequence or corpus) | sigmoid")
    weight_temperature: float = _opt(1.0, "weighted, sigmoid: w = sigmoid((s - weight_center) / weight_temperature); > 0")
    weight_center: float = _opt(0.0, "weighted, sigmoid: the score at which w = 0.5")
    weight_clip_min: float = _opt(0.0, "weighted: lower clip of w, >= 0")
    weight_clip_max: float | None = _opt(None, "weighted: upper clip of w; null = none")


@dataclass
class OptimConfig:
    lr: float = _opt(1e-5, "peak learning rate (AdamW)")
    weight_decay: float = _opt(0.1, "AdamW weight decay")
    betas: tuple[float, float] = _opt((0.9, 0.95), "AdamW betas")
    eps: float = _opt(1e-8, "AdamW epsilon")
    schedule: str = _opt("cosine", "lr decay after warmup: cosine | linear | constant")
    warmup_ratio: float = _opt(0.0, "warmup as a fraction of the training steps (ceil); use this or warmup_steps")
    warmup_steps: int = _opt(0, "warmup in optimizer steps; use this or warmup_ratio")
    min_lr_ratio: float = _opt(0.0, "lr at the end of the decay, as a fraction of lr")
    grad_clip: float = _opt(1.0, "gradient norm clipping (0 = off); DeepSpeed's gradient_clipping")


@dataclass
class LoopConfig:
    epochs: int = _opt(1, "passes over data.train")
    max_steps: int = _opt(0, "optimizer steps to run; 0 = as many as epochs give")
    grad_accum: int = _opt(1, "micro-batches per optimizer step, per rank")
    gradient_checkpointing: bool = _opt(True, "recompute activations in backward (less memory, ~30% slower)")
    dtype: str = _opt("auto", "auto (bfloat16 on GPU, float32 on CPU) | float32 | bfloat16")
    zero_stage: str = _opt("auto", "DeepSpeed ZeRO stage: 0 | 1 | 2 | 3 | auto (3 only when model + optimizer states would not fit on one device, else 0 on one device and 2 on several; the log says which and why)")
    zero3_leaf_modules: bool = _opt(True, "ZeRO-3: gather each decoder layer whole (DeepSpeed set_z3_leaf_modules on the model's _no_split_modules class): ~2x fewer hook calls per step; false = per-submodule gathers")
    attn_implementation: str = _opt("auto", "attention kernel: auto (flash_attention_2 on CUDA when flash-attn is installed, else flex_attention on CUDA, sdpa on CPU) | sdpa | eager | flex_attention | flash_attention_2; packed examples are isolated on every path")
    ce_chunk: int = _opt(1024, "target tokens per lm_head + cross-entropy chunk: bounds fp32 logits memory (bench/ce_memory.py: 1024 cuts the extra peak ~3x vs 4096 at seq 4096)")
    log_every: int = _opt(1, "optimizer steps between log lines")


@dataclass
class CheckpointConfig:
    every: int = _opt(0, "optimizer steps between checkpoints; 0 = only at the end")
    keep: int = _opt(2, "completed checkpoints to keep (older ones are deleted)")
    resume: str = _opt("auto", "auto (latest completed checkpoint in output_dir, if any) | never | <checkpoint path>")
    keep_final: bool = _opt(True, "keep the last checkpoint once model/ is exported; false deletes every checkpoint then (SmolLM2-135M: 1.6 GB each, two thirds of it optimizer state), so the finished run can be evaluated and reused but not resumed or extended")


@dataclass
class EvalConfig:
    every: int = _opt(0, "optimizer steps between evaluations on data.validation; 0 = only at the end (when data.validation is set)")
    max_batches: int = _opt(0, "micro-batches per evaluation; 0 = the whole validation set")


@dataclass
class TrainConfig:
    model: str = _opt("smollm2-135m-instruct", "model: HF id, local folder or embedded name (data.models.resolve_model)")
    output_dir: str = _opt("runs/demo", "run directory: checkpoints, logs, the resolved config")
    deepspeed_config: str = _opt("train/configs/deepspeed.json", "DeepSpeed JSON (no optimizer/scheduler sections; 'auto' values are filled from this config); relative paths: cwd, then the repo")
    seed: int = _opt(0, "seed for model init noise, data order and dropout")
    trust_remote_code: bool = _opt(False, "allow a model folder whose config asks for code shipped with it (auto_map); false: such a model is refused before loading")
    data: DataConfig = _opt(factory=DataConfig, help="training and validation data")
    importance: ImportanceConfig = _opt(factory=ImportanceConfig, help="token grouping at load time")
    loss: LossConfig = _opt(factory=LossConfig, help="training objective")
    optim: OptimConfig = _opt(factory=OptimConfig, help="optimizer and lr schedule")
    train: LoopConfig = _opt(factory=LoopConfig, help="training loop")
    checkpoint: CheckpointConfig = _opt(factory=CheckpointConfig, help="checkpoints and resume")
    eval: EvalConfig = _opt(factory=EvalConfig, help="evaluation on data.validation")
    report_to: list[str] = _opt(factory=lambda: ["jsonl", "tensorboard"], help="metric sinks: jsonl, tensorboard, wandb (Weights & Biases: the wandb extra; WANDB_PROJECT, WANDB_MODE=offline as usual), comma-separated on the command line")


# ---------------------------------------------------------------------------------------------
# Keys and types
# ---------------------------------------------------------------------------------------------


def _key(f: dataclasses.Field) -> str:
    """The YAML / command-line name of a field."""
    return f.metadata.get("key", f.name)


def _fields(cls: type) -> dict[str, tuple[dataclasses.Field, Any]]:
    """External key -> (field, resolved type) of a config dataclass."""
    hints = typing.get_type_hints(cls)
    return {_key(f): (f, hints[f.name]) for f in dataclasses.fields(cls)}


def _leaves(cls: type = TrainConfig, prefix: str = "") -> list[tuple[str, dataclasses.Field, Any]]:
    """Every option as (dotted key, field, type), sections expanded, in declaration order."""
    out = []
    for key, (f, tp) in _fields(cls).items():
        if dataclasses.is_dataclass(tp):
            out.extend(_leaves(tp, f"{prefix}{key}."))
        else:
            out.append((prefix + key, f, tp))
    return out


def _all_keys() -> list[str]:
    leaves = [k for k, _, _ in _leaves()]
    sections = [k for k, (_, tp) in _fields(TrainConfig).items() if dataclasses.is_dataclass(tp)]
    return leaves + sections


def _suggest(dotted: str) -> str:
    """' (did you mean X?)' for an unknown key, or ''."""
    keys = _all_keys()
    close = difflib.get_close_matches(dotted, keys, n=1, cutoff=0.6)
    if not close:
        leaf = dotted.rsplit(".", 1)[-1]
        close = [k for k in keys if k.rsplit(".", 1)[-1] == leaf]
        if not close:
            names = sorted({k.rsplit(".", 1)[-1] for k in keys})
            near = difflib.get_close_matches(leaf, names, n=1, cutoff=0.6)
            close = [k for k in keys if near and k.rsplit(".", 1)[-1] == near[0]]
    return f" (did you mean {' or '.join(close[:3])}?)" if close else ""


def _type_name(tp: Any) -> str:
    if tp in (str, int, float, bool):
        return tp.__name__
    return str(tp).replace("typing.", "")


class _BadValue(Exception):
    pass


def _coerce(value: Any, tp: Any) -> Any:
    """``value`` as type ``tp`` (str, int, float, bool, X | None, tuple[...], list[...]); _BadValue if not."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "~")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0])
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _BadValue(f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise _BadValue(f"expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        number = _as_float(value, "an integer")
        if not number.is_integer():
            raise _BadValue(f"expected an integer, got {value!r}")
        return int(number)
    if tp is float:
        if isinstance(value, bool):
            raise _BadValue(f"expected a number, got {value!r}")
        return _as_float(value, "a number")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        raise _BadValue(f"expected a string, got {value!r} ({type(value).__name__}); quote it")
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.strip("()[] ").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise _BadValue(f"expected a list of {len(args)} values, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0]) for v in value)
        if len(value) != len(args):
            raise _BadValue(f"expected {len(args)} values, got {len(value)}: {value!r}")
        return tuple(_coerce(v, a) for v, a in zip(value, args))
    if origin is list:
        if value is None:
            return []
        if isinstance(value, str):
            value = [v.strip() for v in value.strip("[] ").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise _BadValue(f"expected a list, got {value!r}")
        return [_coerce(v, args[0]) for v in value]
    raise TypeError(f"config field type {tp!r} is not supported")  # a programming error, not a user one


def _as_float(value: Any, what: str) -> float:
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise _BadValue(f"expected {what}, got {value!r}")


def _apply(obj: Any, mapping: Any, source: str, prefix: str, problems: list[str]) -> None:
    """Set the options in ``mapping`` (nested dicts, external keys) on the dataclass ``obj``."""
    if not isinstance(mapping, dict):
        where = prefix.rstrip(".") or "the file"
        problems.append(f"{source}: {where}: expected a mapping of option: value, got {mapping!r}")
        return
    fields = _fields(type(obj))
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            problems.append(f"{source}: unknown key {dotted!r}{_suggest(str(dotted))}")
            continue
        f, tp = fields[key]
        if dataclasses.is_dataclass(tp):
            if value is None:
                continue
            _apply(getattr(obj, f.name), value, source, dotted + ".", problems)
            continue
        try:
            setattr(obj, f.name, _coerce(value, tp))
        except _BadValue as exc:
            problems.append(f"{source}: {dotted}: {exc} (type {_type_name(tp)})")


def _set_dotted(config: TrainConfig, dotted: str, raw: str, source: str, problems: list[str]) -> None:
    """One command-line override ``dotted=raw``; string options take ``raw`` as written."""
    obj: Any = config
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        fields = _fields(type(obj))
        here = ".".join(parts[: i + 1])
        if part not in fields:
            problems.append(f"{source}: unknown key {dotted!r}{_suggest(dotted)}")
            return
        f, tp = fields[part]
        last = i == len(parts) - 1
        if dataclasses.is_dataclass(tp):
            if last:  # a whole section: optim={lr: 1e-4, eps: 1e-6}
                _apply(getattr(obj, f.name), _parse_value(raw), source, here + ".", problems)
                return
            obj = getattr(obj, f.name)
            continue
        if not last:
            problems.append(f"{source}: unknown key {dotted!r}: {here} is an option, not a section")
            return
        quoted = len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\""
        value = raw if tp is str and not quoted else _parse_value(raw)
        try:
            setattr(obj, f.name, _coerce(value, tp))
        except _BadValue as exc:
            problems.append(f"{source}: {dotted}: {exc} (type {_type_name(tp)})")


def _parse_value(raw: str) -> Any:
    try:
        return yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        return raw


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def config_from_dict(mapping: dict[str, Any], source: str = "config") -> TrainConfig:
    """Defaults overridden by a nested mapping with external keys (what :func:`to_dict` writes)."""
    config = TrainConfig()
    problems: list[str] = []
    _apply(config, mapping or {}, source, "", problems)
    if problems:
        raise ConfigError("invalid train config:\n  " + "\n  ".join(problems))
    return config


def load_config(argv: list[str] | None = None) -> TrainConfig:
    """Defaults <- ``--config FILE`` (repeatable, in order) <- ``a.b=c`` overrides (in order).

    ``--help`` / ``-h`` prints every key with its default and exits. Raises ConfigError listing
    every unknown key and badly typed value, each naming its source (file or command line).
    Values are not range-checked here: call :func:`validate`.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    files: list[str] = []
    overrides: list[tuple[str, str]] = []
    problems: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            print(help_text())
            raise SystemExit(0)
        if arg.startswith(("--local_rank", "--local-rank")):
            # The deepspeed launcher appends --local_rank=N; the rank also comes from LOCAL_RANK.
            if "=" not in arg and i + 1 < len(argv) and argv[i + 1].isdigit():
                i += 1
        elif arg == "--config" or arg.startswith("--config="):
            if "=" in arg:
                files.append(arg.split("=", 1)[1])
            elif i + 1 < len(argv):
                i += 1
                files.append(argv[i])
            else:
                problems.append("command line: --config needs a file")
        elif "=" in arg:
            key, raw = arg.split("=", 1)
            overrides.append((key.lstrip("-"), raw))
        elif arg.startswith("--") and len(arg) > 2 and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            overrides.append((arg[2:], argv[i + 1]))  # --optim.lr 1e-4
            i += 1
        else:
            problems.append(f"command line: {arg!r} is not KEY=VALUE or --config FILE (see --help)")
        i += 1

    config = TrainConfig()
    for path in files:
        try:
            with open(path, encoding="utf-8") as f:
                loaded = yaml.safe_load(f)
        except OSError as exc:
            problems.append(f"--config {path}: cannot read ({exc.strerror or exc})")
            continue
        except yaml.YAMLError as exc:
            problems.append(f"{path}: not valid YAML ({exc})")
            continue
        _apply(config, loaded if loaded is not None else {}, path, "", problems)
    for key, raw in overrides:
        _set_dotted(config, key, raw, "command line", problems)
    if problems:
        raise ConfigError("invalid train config:\n  " + "\n  ".join(problems))
    return config


def _reference() -> list[tuple[str, str, list[tuple[str, str, str, str]]]]:
    """(section, title, [(key, type, default, help)]) from the dataclasses: one source for --help and the README."""
    leaves = _leaves()
    groups: dict[str, list[tuple[str, dataclasses.Field, Any]]] = {"": []}
    for leaf in leaves:  # top-level options first, then one block per section
        groups.setdefault(leaf[0].split(".", 1)[0] if "." in leaf[0] else "", []).append(leaf)
    sections = []
    for head, members in groups.items():
        title = _fields(TrainConfig)[head][0].metadata.get("help", "") if head else "run"
        rows = []
        for dotted, f, tp in members:
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            shown = yaml.safe_dump(_plain(default), default_flow_style=True).strip().removesuffix("...").strip()
            rows.append((dotted, _type_name(tp), shown, f.metadata.get("help", "")))
        sections.append((head or "top level", title, rows))
    return sections


def help_text() -> str:
    """Usage plus every key with its type, default and description, generated from the dataclasses."""
    lines = [
        "usage: python -m train.main [--config FILE ...] [KEY=VALUE ...]",
        "",
        "Train with token-importance SFT on annotated shards. Defaults <- --config YAML files <- KEY=VALUE.",
        "Values are YAML (optim.betas=[0.9,0.95], loss.rho1_rho=null); string options take the text as written.",
        "",
    ]
    sections = _reference()
    width = max(len(row[0]) for _, _, rows in sections for row in rows)
    for head, title, rows in sections:
        lines.append(f"{head}: {title}")
        lines.extend(f"  {key:<{width}}  {tp:<19} = {shown:<24} {text}" for key, tp, shown, text in rows)
    return "\n".join(lines)


def markdown_reference() -> str:
    """The README's train configuration table: the same keys, defaults and help as ``--help``."""
    lines = ["| key | type | default | what it does |", "|---|---|---|---|"]
    for head, title, rows in _reference():
        lines.append(f"| **{head}** | | | {title} |")
        for key, tp, shown, text in rows:
            lines.append(f"| `{key}` | {tp.replace('|', 'or')} | `{shown}` | {text.replace('|', '/')} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Saving and printing
# ---------------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def to_dict(config: Any) -> dict[str, Any]:
    """Nested plain dict with the YAML keys (``lambda``, not ``lambda_``); tuples become lists."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        out[_key(f)] = to_dict(value) if dataclasses.is_dataclass(value) else _plain(value)
    return out


def format_config(config: TrainConfig) -> str:
    """The resolved config as YAML, for logs."""
    return yaml.safe_dump(to_dict(config), sort_keys=False, default_flow_style=False)


def save_config(config: TrainConfig, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML (reloadable with ``--config``); atomic."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "# resolved sftgo train config (python -m train.main --config this-file)\n" + format_config(config))
    return path


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def deepspeed_config_path(config: TrainConfig) -> Path:
    """``deepspeed_config`` as a path: absolute, else relative to the cwd, else to the repository."""
    path = Path(config.deepspeed_config).expanduser()
    if path.is_absolute() or path.exists():
        return path
    in_repo = REPO / path
    return in_repo if in_repo.exists() else path


def _check_deepspeed_file(config: TrainConfig, problems: list[str]) -> None:
    path = deepspeed_config_path(config)
    if not config.deepspeed_config:
        problems.append("deepspeed_config: required (a DeepSpeed JSON, e.g. train/configs/deepspeed.json)")
        return
    if not path.is_file():
        problems.append(f"deepspeed_config: {config.deepspeed_config} does not exist (looked in the cwd and in {REPO})")
        return
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        problems.append(f"deepspeed_config: {path} is not readable JSON ({exc})")
        return
    if not isinstance(raw, dict):
        problems.append(f"deepspeed_config: {path} must hold a JSON object")
        return
    for section in ("optimizer", "scheduler"):
        if section in raw:
            problems.append(f"deepspeed_config: {path} has a {section!r} section; remove it (the trainer builds the "
                            f"optimizer and lr schedule from optim.*)")


def validate(config: TrainConfig) -> None:
    """Check option values; raise ConfigError listing every problem, each naming its option."""
    from train.forward import SUPPORTED_ATTN_IMPLEMENTATIONS
    from train.grouping import SCOPES
    from train.losses import LOSSES, SftGoLoss, WeightedLoss

    c, p = config, []

    def need(ok: bool, message: str) -> None:
        if not ok:
            p.append(message)

    def unit(name: str, value: float, closed: bool = True) -> None:
        ok = 0.0 <= value <= 1.0 if closed else 0.0 <= value < 1.0
        need(ok and math.isfinite(value), f"{name}: {value} must be in [0, {'1]' if closed else '1)'}")

    need(bool(c.model), "model: required (HF id, local folder or embedded name)")
    need(bool(c.output_dir), "output_dir: required")
    need(c.seed >= 0, f"seed: {c.seed} must be >= 0")
    _check_deepspeed_file(c, p)
    bad = [r for r in c.report_to if r not in REPORTERS]
    need(not bad, f"report_to: {bad} not in {list(REPORTERS)}")
    if "wandb" in c.report_to:
        import importlib.util

        need(importlib.util.find_spec("wandb") is not None, "report_to: wandb needs the wandb package (pip install -e '.[wandb]')")

    d = c.data
    need(bool(d.train), "data.train: required (an annotated directory or fsspec URI)")
    need(d.micro_batch_tokens > 0, f"data.micro_batch_tokens: {d.micro_batch_tokens} must be > 0")
    need(d.num_workers >= 0, f"data.num_workers: {d.num_workers} must be >= 0")

    imp = c.importance
    need(bool(imp.scorer), "importance.scorer: required (a stored scorer name or excess_loss)")
    need(not imp.scorer.startswith("score_"), f"importance.scorer: {imp.scorer!r}: name the scorer, not its column ({imp.scorer[6:]!r})")
    unit("importance.rho", imp.rho, closed=False)
    need(imp.scope in SCOPES, f"importance.scope: {imp.scope!r} is not one of {list(SCOPES)}")

    loss = c.loss
    need(loss.name in LOSSES, f"loss.name: {loss.name!r} is not one of {sorted(LOSSES)}")
    unit("loss.lambda", loss.lambda_)
    unit("loss.lambda_max", loss.lambda_max)
    unit("loss.lambda_min", loss.lambda_min)
    need(loss.lambda_min <= loss.lambda_max,
         f"loss.lambda_min: {loss.lambda_min} must be <= loss.lambda_max ({loss.lambda_max})")
    need(loss.lambda_schedule in SftGoLoss.SCHEDULES,
         f"loss.lambda_schedule: {loss.lambda_schedule!r} is not one of {list(SftGoLoss.SCHEDULES)}")
    need(0.5 < loss.infosft_p < 1.0, f"loss.infosft_p: {loss.infosft_p} must be in (0.5, 1) so that logit(p) > 0")
    if loss.rho1_rho is not None:
        unit("loss.rho1_rho", loss.rho1_rho, closed=False)
    need(loss.weight_transform in WeightedLoss.TRANSFORMS,
         f"loss.weight_transform: {loss.weight_transform!r} is not one of {list(WeightedLoss.TRANSFORMS)}")
    need(loss.weight_temperature > 0, f"loss.weight_temperature: {loss.weight_temperature} must be > 0")
    need(loss.weight_clip_min >= 0, f"loss.weight_clip_min: {loss.weight_clip_min} must be >= 0 (a negative weight pushes a loss up)")
    if loss.weight_clip_max is not None:
        need(loss.weight_clip_max >= loss.weight_clip_min,
             f"loss.weight_clip_max: {loss.weight_clip_max} must be >= loss.weight_clip_min ({loss.weight_clip_min})")
    if loss.name == "weighted" and loss.weight_transform == "rank":
        need(imp.scope != "batch", "importance.scope: batch is not supported by loss.weight_transform=rank; use sequence or corpus")

    o = c.optim
    # lr 0 is allowed: the negative control (nothing may change; tests/train/test_main.py checks it).
    need(o.lr >= 0 and math.isfinite(o.lr), f"optim.lr: {o.lr} must be >= 0 and finite")
    need(o.weight_decay >= 0, f"optim.weight_decay: {o.weight_decay} must be >= 0")
    need(all(0.0 <= b < 1.0 for b in o.betas), f"optim.betas: {list(o.betas)} must each be in [0, 1)")
    need(o.eps > 0, f"optim.eps: {o.eps} must be > 0")
    need(o.schedule in LR_SCHEDULES, f"optim.schedule: {o.schedule!r} is not one of {list(LR_SCHEDULES)}")
    unit("optim.warmup_ratio", o.warmup_ratio, closed=False)
    need(o.warmup_steps >= 0, f"optim.warmup_steps: {o.warmup_steps} must be >= 0")
    need(not (o.warmup_steps > 0 and o.warmup_ratio > 0),
         f"optim.warmup_steps: {o.warmup_steps} and optim.warmup_ratio: {o.warmup_ratio} are both set; set one")
    unit("optim.min_lr_ratio", o.min_lr_ratio)
    need(o.grad_clip >= 0, f"optim.grad_clip: {o.grad_clip} must be >= 0 (0 = off)")

    t = c.train
    need(t.epochs >= 1, f"train.epochs: {t.epochs} must be >= 1")
    need(t.max_steps >= 0, f"train.max_steps: {t.max_steps} must be >= 0 (0 = epochs decide)")
    need(t.grad_accum >= 1, f"train.grad_accum: {t.grad_accum} must be >= 1")
    need(t.dtype in DTYPES, f"train.dtype: {t.dtype!r} is not one of {list(DTYPES)}")
    need(t.attn_implementation in ("auto", *SUPPORTED_ATTN_IMPLEMENTATIONS),
         f"train.attn_implementation: {t.attn_implementation!r} is not one of {['auto', *SUPPORTED_ATTN_IMPLEMENTATIONS]}")
    need(t.zero_stage in ZERO_STAGES, f"train.zero_stage: {t.zero_stage!r} is not one of {list(ZERO_STAGES)}")
    need(t.ce_chunk > 0, f"train.ce_chunk: {t.ce_chunk} must be > 0")
    need(t.log_every >= 1, f"train.log_every: {t.log_every} must be >= 1")

    ck = c.checkpoint
    need(ck.every >= 0, f"checkpoint.every: {ck.every} must be >= 0 (0 = only at the end)")
    need(ck.keep >= 1, f"checkpoint.keep: {ck.keep} must be >= 1")
    need(bool(ck.resume), "checkpoint.resume: auto, never or a checkpoint path")
    if ck.resume and ck.resume not in RESUME_MODES:
        need(os.path.exists(ck.resume), f"checkpoint.resume: {ck.resume} does not exist (auto, never or a checkpoint path)")

    e = c.eval
    need(e.every >= 0, f"eval.every: {e.every} must be >= 0")
    need(e.max_batches >= 0, f"eval.max_batches: {e.max_batches} must be >= 0 (0 = all)")
    need(e.every == 0 or bool(d.validation), f"eval.every: {e.every} needs data.validation (a held-out annotated directory)")

    if p:
        raise ConfigError("invalid train config:\n  " + "\n  ".join(p))


def validate_against_data(config: TrainConfig, manifest: Manifest, uri: str | None = None) -> None:
    """Check the config against an annotated directory's manifest (``uri`` names it; default data.train).

    The importance scorer must be offered (stored, or excess_loss from base_loss + ref_loss); a loss
    that needs ref_loss (rho1) needs it stored; scope corpus needs the scorer's score_stats.
    """
    from train.losses import LOSSES

    where = uri if uri is not None else config.data.train
    offered = score_names(manifest.scorer_names)
    scorer = config.importance.scorer
    p: list[str] = []
    if scorer not in offered:
        hint = ""
        if scorer == EXCESS_LOSS:
            hint = f"; {EXCESS_LOSS} needs both {' and '.join(EXCESS_LOSS_PARTS)} (annotate --add-scorers)"
        p.append(f"importance.scorer: {scorer!r} is not in {where}; it offers {offered}{hint}")
    loss_cls = LOSSES.get(config.loss.name)
    if loss_cls is not None and getattr(loss_cls, "needs_ref_loss", False) and REF_LOSS not in manifest.scorer_names:
        p.append(f"loss.name: {config.loss.name} needs stored {REF_LOSS}; {where} offers {offered} "
                 f"(annotate --add-scorers {REF_LOSS})")
    if config.importance.scope == "corpus" and scorer in offered:
        stats = manifest.score_stats.get(scorer) or {}
        if not stats.get("quantiles"):
            p.append(f"importance.scope: corpus needs score_stats for {scorer!r} in {where}'s manifest "
                     f"(has {sorted(manifest.score_stats)}); re-annotate, or use scope sequence or batch")
    if p:
        raise ConfigError(f"train config does not fit the data in {where}:\n  " + "\n  ".join(p))


# ---------------------------------------------------------------------------------------------
# What the trainer builds from the config
# ---------------------------------------------------------------------------------------------


def loss_options(config: TrainConfig) -> dict[str, Any]:
    """Keyword options for ``train.losses.build_loss(config.loss.name, **options)``."""
    loss = config.loss
    if loss.name == "sftgo":
        return {"lambda_": loss.lambda_, "lambda_schedule": loss.lambda_schedule,
                "lambda_max": loss.lambda_max, "lambda_min": loss.lambda_min}
    if loss.name == "rho1":
        return {"rho": config.importance.rho if loss.rho1_rho is None else loss.rho1_rho}
    if loss.name == "infosft":
        return {"p": loss.infosft_p}
    if loss.name == "weighted":
        return {"transform": loss.weight_transform, "temperature": loss.weight_temperature, "center": loss.weight_center,
                "clip_min": loss.weight_clip_min, "clip_max": loss.weight_clip_max}
    return {}


def resolve_dtype(config: TrainConfig, cuda: bool) -> str:
    """train.dtype with auto resolved: bfloat16 on GPU, float32 on CPU."""
    if config.train.dtype == "auto":
        return "bfloat16" if cuda else "float32"
    return config.train.dtype


def trainer_clips_gradients(zero_stage: int, dtype: str) -> bool:
    """Stage 0 in fp32: DeepSpeed would clip without reporting the norm, so the trainer clips (and
    logs the norm) and DeepSpeed's gradient_clipping is 0. Elsewhere DeepSpeed clips and reports it."""
    return zero_stage == 0 and dtype != "bfloat16"


def json_zero_stage(config: TrainConfig) -> int | None:
    """The stage written in the DeepSpeed JSON, or None when it says "auto" (or nothing)."""
    raw = json.loads(deepspeed_config_path(config).read_text(encoding="utf-8"))
    stage = (raw.get("zero_optimization") or {}).get("stage", "auto")
    return None if stage == "auto" else int(stage)


def deepspeed_dict(config: TrainConfig, *, world_size: int, dtype: str, zero_stage: int = 3) -> dict[str, Any]:
    """The DeepSpeed JSON with its "auto" values filled (see the module docstring); ``dtype`` and
    ``zero_stage`` resolved. A stage written in the JSON must agree with ``zero_stage``."""
    path = deepspeed_config_path(config)
    raw = json.loads(path.read_text(encoding="utf-8"))
    written = (raw.get("zero_optimization") or {}).get("stage", "auto")
    if written != "auto" and int(written) != zero_stage:
        raise ConfigError(f"deepspeed_config: {path}: zero_optimization.stage is {written} but train.zero_stage "
                          f"resolved to {zero_stage}; write \"auto\" there or set train.zero_stage={written}")
    raw.setdefault("zero_optimization", {})["stage"] = "auto"
    fills = {
        ("zero_optimization", "stage"): zero_stage,
        ("gradient_accumulation_steps",): config.train.grad_accum,
        ("gradient_clipping",): 0.0 if trainer_clips_gradients(zero_stage, dtype) else config.optim.grad_clip,
        ("bf16", "enabled"): dtype == "bfloat16",
        ("train_micro_batch_size_per_gpu",): 1,
        ("train_batch_size",): config.train.grad_accum * world_size,
    }

    def fill(node: Any, trail: tuple[str, ...]) -> Any:
        if isinstance(node, dict):
            return {k: fill(v, trail + (k,)) for k, v in node.items()}
        if node == "auto":
            if trail not in fills:
                raise ConfigError(f"deepspeed_config: {path}: {'.'.join(trail)} is \"auto\" but the trainer does not fill it")
            return fills[trail]
        return node

    return fill(raw, ())
