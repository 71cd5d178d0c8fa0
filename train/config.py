"""Train job configuration: nested dataclasses hold every default; YAML overrides them; ``a.b=c`` overrides YAML.

    python train/main.py --config train/configs/lima_sftgo.yaml optim.lr=2e-5 loss.lambda=0.8
    python train/main.py --help                       # every key, its type, default and meaning

Keys are the dataclass field names, dotted by section (``optim.lr``), with one exception: the
field ``LossConfig.lambda_`` is the key ``loss.lambda`` in YAML, on the command line and in saved
configs (``lambda`` is a Python keyword). The ``loss`` section holds every registered loss's Options
(train/losses.py), their defaults and help taken from there. Loading, overrides, help and saving are data/config.py's, the mechanism
annotate uses too: :func:`load_config` only parses; :func:`validate` checks values and
:func:`validate_against_data` checks them against an annotated directory's manifest.

DeepSpeed: ``deepspeed_config`` names a checked-in ZeRO JSON without "optimizer" or "scheduler"
sections (the trainer passes a client ``torch.optim.AdamW`` and a LambdaLR built from ``optim``).
Values written as the string ``"auto"`` are filled from this config by :func:`deepspeed_dict`:

    gradient_accumulation_steps  <- train.grad_accum
    gradient_clipping            <- optim.grad_clip (0 where the trainer clips: :func:`trainer_clips_gradients`)
    bf16.enabled                 <- the resolved train.dtype == "bfloat16"
    train_micro_batch_size_per_gpu <- 1 (one packed row of up to data.micro_batch_tokens tokens)
    train_batch_size             <- grad_accum * world_size (packed rows per optimizer step)
    zero_optimization.stage      <- train.zero_stage, resolved (``auto``: :func:`train.engine.choose_zero_stage`)

Always set, not placeholders: ``data_types.grad_accum_dtype = "fp32"`` whenever the weights are bf16
(DeepSpeed otherwise accumulates gradients in the model dtype; it refuses this at stage 0, so bf16 runs
at stage >= 1), and ``zero_optimization.offload_optimizer = {"device": "cpu"}`` with
``zero_force_ds_cpu_optimizer = false`` when the ZeRO plan offloads the optimizer (the client AdamW
steps on the host copy).

Any other "auto" is an error, so a new placeholder cannot pass silently.
"""

from __future__ import annotations

import dataclasses
import json
import keyword
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data import config as config_mechanism
from data.config import ConfigError, option
from schemas.shard import (EXCESS_LOSS, EXCESS_LOSS_PARTS, Manifest, has_ref_loss, has_score, score_names, score_spread_problem,
                           program, system_prompt_of)
from train.losses import GROUP_DECISIONS, LOSSES, EaftOptions, InfoSftOptions, Loss, Rho1Options, SftGoOptions, WeightedOptions
from train.schedule import SCHEDULES
from train.shards import NO_SCORE

REPO = Path(__file__).resolve().parents[1]
REPORTERS = ("jsonl", "tensorboard", "wandb")
LR_SCHEDULES = SCHEDULES  # train.schedule owns the names
DTYPES = ("auto", "float32", "bfloat16")
RESUME_MODES = ("auto", "never")
ZERO_STAGES = ("auto", "0", "1", "2", "3")
REF_LOSS = EXCESS_LOSS_PARTS[1]


@dataclass
class DataConfig:
    train: str = option("", "annotated directory or fsspec URI (s3://, gs://) to train on (required)")
    validation: str = option("", "held-out annotated directory for eval; '' = none")
    micro_batch_tokens: int = option(4096, "packing budget: tokens per micro-batch (one packed row); an example longer than it is a micro-batch alone")
    num_workers: int = option(0, "DataLoader workers reading shards (0 = in the main process)")
    shuffle: bool = option(True, "shuffle row groups and rows each epoch (seeded by seed and epoch)")
    system_prompt: str = option("default", "the system-prompt choice the data was annotated with (annotate --system-prompt: default, none, or the text); data rendered with another choice is refused, and evaluation.run generates with it")
    deep_validate: bool = option(True, "read every shard once before step 1 (checksums, list lengths, NaN/inf scores, unique ids) so bad data fails before training; false: footer checks only (faster on huge data; the stream still refuses a NaN it meets)")


@dataclass
class ImportanceConfig:
    scorer: str = option("tfidf", "score that groups tokens: any stored scorer name (tfidf, llmlingua2, ref_loss, ...) or excess_loss (= base_loss - ref_loss); none = no score and no groups, for a loss that reads none (sft, infosft, dft, eaft)")
    rho: float = option(0.7, "threshold in [0, 1): the top ceil((1 - rho) * n) tokens of each scope are important (0.7 = the paper's 70th percentile)")
    scope: str = option("sequence", "where the top tokens are ranked: sequence (SFT-GO, per example) | batch (Rho-1, per global batch) | corpus (one threshold from the manifest)")


def _loss_attribute(f: dataclasses.Field) -> str:
    """The ``loss`` section's attribute for a loss option: its config key, or the field name where the key is a keyword."""
    key = f.metadata.get("key", f.name)
    return key if key.isidentifier() and not keyword.iskeyword(key) else f.name


def loss_option(options: type, name: str) -> Any:
    """The ``loss`` section's field for the loss option ``name`` of ``options`` (a loss's Options): its default and
    help, written once there; the attribute is the option's key (``lambda_`` keeps ``key="lambda"``)."""
    f = {f.name: f for f in dataclasses.fields(options)}[name]
    key = f.metadata.get("key", f.name)
    return option(f.default, f.metadata["help"], key=key if key != _loss_attribute(f) else None)


# loss.group_decision's default (bench/README.md "group decision": the look-ahead's measured cost).
GROUP_DECISION_DEFAULT = "step"


@dataclass
class LossConfig:
    """The ``loss`` section: the objective, where its groups are decided, and every registered loss's options.

    One field per option of a loss's ``Options`` (train/losses.py), keyed ``loss.<key>``; its default and help
    come from there (:func:`loss_option`). A loss with options adds its lines here: tests/train/test_config.py
    fails, naming the key, when these fields and the registered losses' options disagree
    (tests/train/conftest.py ``implied_loss_config`` builds what they imply)."""

    name: str = option("sftgo", f"objective: {' | '.join(LOSSES)} (METHOD.md 'Losses'; select = CE over the important group only, Token Cleaning; weighted = sum w*CE / sum w, w from the score)")
    group_decision: str = option(GROUP_DECISION_DEFAULT, "where sftgo's worse group, rho1's top-k and select's important count are decided: step (the whole optimizer step, all micro-batches and ranks: the objective does not depend on the split; sftgo and rho1 run a no-grad look-ahead forward when train.grad_accum > 1) | micro_batch (per micro-batch: cheaper, split-dependent)")
    # sftgo
    lambda_: float = loss_option(SftGoOptions, "lambda_")  # key loss.lambda
    lambda_schedule: str = loss_option(SftGoOptions, "lambda_schedule")
    lambda_max: float = loss_option(SftGoOptions, "lambda_max")
    lambda_min: float = loss_option(SftGoOptions, "lambda_min")
    # rho1
    rho1_rho: float | None = loss_option(Rho1Options, "rho")
    # infosft
    infosft_p: float = loss_option(InfoSftOptions, "p")
    # eaft
    eaft_k: int = loss_option(EaftOptions, "k")
    eaft_alpha: float = loss_option(EaftOptions, "alpha")
    # weighted
    weight_transform: str = loss_option(WeightedOptions, "transform")
    weight_temperature: float = loss_option(WeightedOptions, "temperature")
    weight_center: float = loss_option(WeightedOptions, "center")
    weight_clip_min: float = loss_option(WeightedOptions, "clip_min")
    weight_clip_max: float | None = loss_option(WeightedOptions, "clip_max")


def loss_class(config: "TrainConfig") -> type[Loss]:
    """The registered loss class ``loss.name`` names (validate() reports an unknown name)."""
    return LOSSES[config.loss.name]


def loss_options_of(loss_section: Any, loss_cls: type[Loss]) -> Any:
    """``loss_cls.Options`` filled from the config's ``loss`` section."""
    return loss_cls.Options(**{f.name: getattr(loss_section, _loss_attribute(f)) for f in dataclasses.fields(loss_cls.Options)})


@dataclass
class OptimConfig:
    lr: float = option(1e-5, "peak learning rate (AdamW)")
    weight_decay: float = option(0.1, "AdamW weight decay")
    betas: tuple[float, float] = option((0.9, 0.95), "AdamW betas")
    eps: float = option(1e-8, "AdamW epsilon")
    schedule: str = option("cosine", "lr decay after warmup: cosine | linear | constant")
    warmup_ratio: float = option(0.0, "warmup as a fraction of the training steps (ceil); use this or warmup_steps")
    warmup_steps: int = option(0, "warmup in optimizer steps; use this or warmup_ratio")
    min_lr_ratio: float = option(0.0, "lr at the end of the decay, as a fraction of lr")
    grad_clip: float = option(1.0, "gradient norm clipping (0 = off); DeepSpeed's gradient_clipping")


@dataclass
class LoopConfig:
    epochs: int = option(1, "passes over data.train: every example exactly once per pass, on one rank (steps come from packing the real lengths)")
    max_steps: int = option(0, "optimizer steps to run, exactly; overrides epochs (the data cycles as needed); 0 = exactly train.epochs epochs")
    grad_accum: int = option(1, "micro-batches per optimizer step, per rank")
    gradient_checkpointing: bool = option(True, "recompute activations in backward (less memory, ~30% slower)")
    dtype: str = option("auto", "auto (bfloat16 on GPU, float32 on CPU) | float32 | bfloat16")
    zero_stage: str = option("auto", "DeepSpeed ZeRO stage: 0 | 1 | 2 | 3 | auto (one rank: 0 when model + optimizer states fit the device (1 in bf16), else the optimizer offloaded to the CPU, else refused; several ranks: 2 when they fit, else 3; bf16 accumulates gradients in fp32, so bf16 stage 0 runs as 1; the log says which and why)")
    zero3_leaf_modules: bool = option(True, "ZeRO-3: gather each decoder layer whole (DeepSpeed set_z3_leaf_modules on the model's _no_split_modules class): ~2x fewer hook calls per step; false = per-submodule gathers")
    attn_implementation: str = option("auto", "attention kernel: auto (flash_attention_2 on CUDA when flash-attn is installed, else flex_attention on CUDA, sdpa on CPU) | sdpa | eager | flex_attention | flash_attention_2; packed examples are isolated on every path")
    ce_chunk: int = option(1024, "target tokens per lm_head + cross-entropy chunk: bounds fp32 logits memory (bench/ce_memory.py: 1024 cuts the extra peak ~3x vs 4096 at seq 4096)")
    log_every: int = option(1, "optimizer steps between log lines")


@dataclass
class CheckpointConfig:
    every: int = option(0, "optimizer steps between checkpoints; 0 = only at the end")
    keep: int = option(2, "completed checkpoints to keep (older ones are deleted)")
    resume: str = option("auto", "auto (latest completed checkpoint in output_dir, if any) | never | <checkpoint path>")
    keep_final: bool = option(True, "keep the last checkpoint once model/ is exported; false deletes every checkpoint then (SmolLM2-135M: 1.6 GB each, two thirds of it optimizer state), so the finished run can be evaluated and reused but not resumed or extended")


@dataclass
class EvalConfig:
    every: int = option(0, "optimizer steps between evaluations on data.validation; 0 = only at the end (when data.validation is set)")
    max_batches: int = option(0, "micro-batches per evaluation; 0 = the whole validation set")
    scorer: str = option("", "score that groups data.validation's tokens for eval_important_* / eval_unimportant_*; '' = importance.scorer (set it to compare runs trained on different scores under one held-out grouping); none = no held-out groups")
    rho: float | None = option(None, "rho of the evaluation grouping; null = importance.rho")
    scope: str = option("", "scope of the evaluation grouping: sequence | batch | corpus; '' = importance.scope (corpus: the cut of data.train's manifest when it holds the score, else data.validation's)")


#: lora.quantize values: none, or 4bit (QLoRA: the frozen base in 4-bit NF4 through bitsandbytes, on CUDA or its CPU backend).
LORA_QUANTIZE = ("none", "4bit")
#: Modules that never get adapters: the output head runs inside the chunked CE (train/forward.py calls its class's own
#: forward, which a LoRA wrapper's is not), and the embeddings are tied to it in most small models.
LORA_REFUSED_TARGETS = ("lm_head", "embed_tokens", "wte", "word_embeddings", "embed_out")


@dataclass
class LoraConfig:
    """The ``lora`` section: LoRA adapters trained with PEFT (the ``peft`` extra) on a frozen base model.

    Issue 29 calls these keys ``model.lora``; here ``model`` is the base model's name (a string), so the adapter
    keys are a section of their own. Off unless ``lora.rank`` > 0 (train/lora.py, docs/train.md "LoRA adapters")."""

    rank: int = option(0, "LoRA adapter rank r: 0 = off (full fine-tuning); > 0 freezes the base model and trains rank-r adapters on lora.target_modules (the peft extra); RUN/model/ is then the adapter folder")
    alpha: float | None = option(None, "LoRA alpha: the adapter's update is scaled by alpha / rank; null = 2 x lora.rank (scale 2)")
    dropout: float = option(0.0, "dropout on each adapter's input, in [0, 1) (the base model's own dropout is unchanged)")
    target_modules: list[str] = option(factory=lambda: ["all-linear"], help="modules that get adapters: all-linear (every linear layer of the decoder, not the output head) or module names / suffixes (q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj), each of which must match; the output head and the embeddings are refused")
    export_merged: bool = option(False, "also export RUN/model_merged/: the base with the adapters merged in, a plain Hugging Face folder (AutoModelForCausalLM); rank 0 loads the base in float32 on the CPU to merge")
    quantize: str = option("none", "QLoRA: none | 4bit (the frozen base loaded in 4-bit NF4 through bitsandbytes, adapters in train.dtype; needs bitsandbytes (the qlora extra) and CUDA or bitsandbytes' CPU backend; ZeRO stages 0-2)")


@dataclass
class TrainConfig:
    model: str = option("smollm2-135m-instruct", "model: HF id, local folder or embedded name (data.models.resolve_model)")
    output_dir: str = option("runs/demo", "run directory: checkpoints, logs, the resolved config")
    deepspeed_config: str = option("train/configs/deepspeed.json", "DeepSpeed JSON (no optimizer/scheduler sections; 'auto' values are filled from this config); relative paths: cwd, then the repo")
    seed: int = option(0, "seed for model init noise, data order and dropout")
    trust_remote_code: bool = option(False, "allow a model folder whose config asks for code shipped with it (auto_map); false: such a model is refused before loading")
    data: DataConfig = option(factory=DataConfig, help="training and validation data")
    importance: ImportanceConfig = option(factory=ImportanceConfig, help="token grouping at load time")
    loss: LossConfig = option(factory=LossConfig, help="training objective")
    optim: OptimConfig = option(factory=OptimConfig, help="optimizer and lr schedule")
    train: LoopConfig = option(factory=LoopConfig, help="training loop")
    checkpoint: CheckpointConfig = option(factory=CheckpointConfig, help="checkpoints and resume")
    eval: EvalConfig = option(factory=EvalConfig, help="evaluation on data.validation")
    lora: LoraConfig = option(factory=LoraConfig, help="LoRA adapters (PEFT): off unless lora.rank > 0 (issue 29's model.lora)")
    report_to: list[str] = option(factory=lambda: ["jsonl", "tensorboard"], help="metric sinks: jsonl, tensorboard, wandb (Weights & Biases: the wandb extra; WANDB_PROJECT, WANDB_MODE=offline as usual), comma-separated on the command line")


# ---------------------------------------------------------------------------------------------
# Loading, help, saving (the shared mechanism, data/config.py)
# ---------------------------------------------------------------------------------------------


def config_from_dict(mapping: dict[str, Any], source: str = "config") -> TrainConfig:
    """Defaults overridden by a nested mapping with external keys (what :func:`to_dict` writes)."""
    return config_mechanism.from_dict(TrainConfig, mapping, source, what="train")


def load_config(argv: list[str] | None = None) -> TrainConfig:
    """Defaults <- ``--config FILE`` (repeatable, in order) <- ``a.b=c`` overrides (in order).

    ``--help`` / ``-h`` prints every key with its default and exits. Raises ConfigError listing
    every unknown key and badly typed value, each naming its source (file or command line).
    Values are not range-checked here: call :func:`validate`.
    """
    return config_mechanism.load(TrainConfig, argv, what="train", help=help_text)


def _reference() -> list[tuple[str, str, list[tuple[str, str, str, str]]]]:
    return config_mechanism.reference(TrainConfig)


def help_text() -> str:
    """Usage plus every key with its type, default and description, generated from the dataclasses."""
    return config_mechanism.help_text(TrainConfig, [
        f"usage: {program('python train/main.py')} [--config FILE ...] [KEY=VALUE ...]   (deepspeed train/main.py ... on several GPUs)",
        "",
        "Train with token-importance SFT on annotated shards. Defaults <- --config YAML files <- KEY=VALUE.",
        "Values are YAML (optim.betas=[0.9,0.95], loss.rho1_rho=null); string options take the text as written.",
    ])


def markdown_reference() -> str:
    """The README's train configuration table: the same keys, defaults and help as ``--help``."""
    return config_mechanism.markdown_reference(TrainConfig)


to_dict = config_mechanism.to_dict
format_config = config_mechanism.format_config


# Keys that never change the trained weights: where a run writes, how it checkpoints, evaluates and logs.
# Every other key (data order, packing, workers, grouping, loss, optimizer, loop, model) decides them.
NON_WEIGHT_KEYS = ("output_dir", "checkpoint.", "eval.", "report_to", "train.log_every", "data.validation",
                   "data.deep_validate", "trust_remote_code", "lora.export_merged")


def flat_config(config: TrainConfig) -> dict[str, Any]:
    """The resolved config as ``{"section.key": value}`` with the external key names (``loss.lambda``)."""
    out: dict[str, Any] = {}

    def walk(prefix: str, mapping: dict[str, Any]) -> None:
        for key, value in mapping.items():
            if isinstance(value, dict):
                walk(f"{prefix}{key}.", value)
            else:
                out[prefix + key] = value

    walk("", config_mechanism.to_dict(config))
    return out


def weight_keys(config: TrainConfig) -> dict[str, Any]:
    """The flattened keys that decide the trained weights (every key but :data:`NON_WEIGHT_KEYS`). With LoRA off
    (``lora.rank`` 0) the other ``lora.*`` keys decide nothing and are left out (a checkpoint from before the
    section existed still resumes)."""
    return {key: value for key, value in flat_config(config).items()
            if not any(key == skip or (skip.endswith(".") and key.startswith(skip)) for skip in NON_WEIGHT_KEYS)
            and (config.lora.rank > 0 or not key.startswith("lora."))}


def changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every key whose value differs (a key missing on one side shows as ``<unset>``)."""
    missing = "<unset>"
    return [f"{key}: {old.get(key, missing)!r} -> {new.get(key, missing)!r}"
            for key in sorted(set(old) | set(new)) if old.get(key, missing) != new.get(key, missing)]


def save_config(config: TrainConfig, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML (reloadable with ``--config``); atomic."""
    return config_mechanism.save_config(config, path, "resolved sftgo train config (python train/main.py --config this-file)")


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
    need(bool(d.train), "data.train: required: the annotated directory to train on (annotate/run.py's --output, or an fsspec "
                        "URI); pass data.train=DIR on the command line, or write it under data: train: in your config file")
    need(d.micro_batch_tokens > 0, f"data.micro_batch_tokens: {d.micro_batch_tokens} must be > 0")
    need(d.num_workers >= 0, f"data.num_workers: {d.num_workers} must be >= 0")

    imp = c.importance
    need(bool(imp.scorer), "importance.scorer: required (a stored scorer name, excess_loss, or none for a loss that reads no score)")
    if imp.scorer == NO_SCORE and c.loss.name in LOSSES and loss_class(c).reads_score():
        p.append(f"importance.scorer: none, but loss.name={c.loss.name} trains by a stored score; name one (tfidf, "
                 f"excess_loss, ...), or choose a loss that reads none ({', '.join(n for n, l in LOSSES.items() if not l.reads_score())})")
    need(not imp.scorer.startswith("score_"), f"importance.scorer: {imp.scorer!r}: name the scorer, not its column ({imp.scorer[6:]!r})")
    unit("importance.rho", imp.rho, closed=False)
    need(imp.scope in SCOPES, f"importance.scope: {imp.scope!r} is not one of {list(SCOPES)}")

    need(c.loss.name in LOSSES, f"loss.name: {c.loss.name!r} is not one of {sorted(LOSSES)}")
    need(c.loss.group_decision in GROUP_DECISIONS,
         f"loss.group_decision: {c.loss.group_decision!r} is not one of {list(GROUP_DECISIONS)}")
    for loss_cls in LOSSES.values():  # every loss's options, chosen or not: a typo never waits for the day it is used
        p.extend(loss_options_of(c.loss, loss_cls).problems(as_key=True))
    if c.loss.name in LOSSES:
        p.extend(loss_class(c).config_problems(loss_options_of(c.loss, loss_class(c)), imp.scope))

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
    if e.rho is not None:
        unit("eval.rho", e.rho, closed=False)
    need(not e.scope or e.scope in SCOPES, f"eval.scope: {e.scope!r} is not one of {['', *SCOPES]}")

    p.extend(lora_problems(c.lora, t.zero_stage))

    if p:
        raise ConfigError("invalid train config:\n  " + "\n  ".join(p))


def lora_problems(lo: LoraConfig, zero_stage: str, cuda: bool | None = None, cpu_4bit: bool | None = None) -> list[str]:
    """What is wrong with the ``lora`` section, each naming its key: values, the peft package when LoRA is on, and for
    ``lora.quantize=4bit`` (QLoRA) bitsandbytes that quantizes on this machine (a CUDA device, or its CPU backend) and a
    stage below 3. ``cuda`` and ``cpu_4bit`` None: ask torch and :func:`bitsandbytes_quantizes_on_cpu`."""
    import importlib.util

    p: list[str] = []
    if lo.rank < 0:
        p.append(f"lora.rank: {lo.rank} must be >= 0 (0 = off)")
    if lo.alpha is not None and not (math.isfinite(lo.alpha) and lo.alpha > 0):
        p.append(f"lora.alpha: {lo.alpha} must be a finite number > 0 (null = 2 x lora.rank)")
    if not (0.0 <= lo.dropout < 1.0):
        p.append(f"lora.dropout: {lo.dropout} must be in [0, 1)")
    if not lo.target_modules or any(not str(name).strip() for name in lo.target_modules):
        p.append(f"lora.target_modules: {lo.target_modules} must name modules (all-linear, or names such as q_proj,v_proj)")
    refused = [name for name in lo.target_modules if str(name).split(".")[-1] in LORA_REFUSED_TARGETS]
    if refused:
        p.append(f"lora.target_modules: {refused}: the output head and the embeddings get no adapters (the chunked "
                 f"cross-entropy runs the head's own forward); name decoder modules, or all-linear")
    if lo.quantize not in LORA_QUANTIZE:
        p.append(f"lora.quantize: {lo.quantize!r} is not one of {list(LORA_QUANTIZE)}")
    if lo.rank == 0:
        if lo.quantize != "none" or lo.export_merged:
            key = "lora.quantize" if lo.quantize != "none" else "lora.export_merged"
            p.append(f"{key}: needs LoRA on: set lora.rank (e.g. lora.rank=16)")
        return p
    if importlib.util.find_spec("peft") is None:
        p.append(f"lora.rank: {lo.rank} needs the peft package (pip install -e '.[peft]')")
    if lo.quantize == "4bit":
        if cuda is None:
            import torch

            cuda = torch.cuda.is_available()
        if importlib.util.find_spec("bitsandbytes") is None:
            p.append("lora.quantize: 4bit (QLoRA) needs the bitsandbytes package (pip install -e '.[qlora]')")
        elif not cuda and not (bitsandbytes_quantizes_on_cpu() if cpu_4bit is None else cpu_4bit):
            p.append("lora.quantize: 4bit (QLoRA) found no CUDA device, and the installed bitsandbytes cannot quantize to "
                     "4 bits on the CPU (no CPU backend in this build; the locked 0.50.2 has one: pip install -e "
                     "'.[qlora]'); or set lora.quantize=none to train the adapters on the unquantized base")
        if zero_stage == "3":
            p.append("lora.quantize: 4bit does not run under ZeRO-3 here (4-bit weights are not partitioned): set "
                     "train.zero_stage to 0, 1, 2 or auto")
    return p


def bitsandbytes_quantizes_on_cpu() -> bool:
    """Whether the installed bitsandbytes quantizes a CPU tensor to 4-bit NF4 (its CPU backend; CUDA-only builds
    raise). Tried on 64 zeros, not read from a version: builds differ in which backends they carry."""
    import torch

    try:
        from bitsandbytes.functional import quantize_4bit

        quantize_4bit(torch.zeros(64), quant_type="nf4")
    except Exception:  # noqa: BLE001 - any failure (import, missing kernel, NotImplementedError) means no CPU 4-bit path
        return False
    return True


def validate_against_data(config: TrainConfig, manifest: Manifest, uri: str | None = None) -> None:
    """Check the config against an annotated directory's manifest (``uri`` names it; default data.train).

    The importance scorer must be offered (stored, or excess_loss from base_loss + ref_loss); a loss
    that needs ref_loss (rho1) needs it stored; scope corpus needs the scorer's score_stats; a loss that trains
    by the score's groups or weights (sftgo, select, weighted) needs a score with spread (score_spread_problem).
    """
    where = uri if uri is not None else config.data.train
    offered = score_names(manifest.scorer_names)
    scorer = config.importance.scorer
    p: list[str] = []
    mismatch = system_prompt_problem(config, manifest, where)
    if mismatch:
        p.append(mismatch)
    loss_cls = LOSSES.get(config.loss.name)
    if scorer != NO_SCORE and not has_score(manifest, scorer):
        hint = ""
        if scorer == EXCESS_LOSS:
            hint = f"; {EXCESS_LOSS} needs both {' and '.join(EXCESS_LOSS_PARTS)} (annotate --add-scorers)"
        elif loss_cls is not None and not loss_cls.reads_score():
            hint = f"; loss.name={loss_cls.name} reads no score: importance.scorer=none trains it without groups"
        p.append(f"importance.scorer: {scorer!r} is not in {where}; it offers {offered}{hint}")
    if loss_cls is not None and loss_cls.needs_ref_loss and not has_ref_loss(manifest):
        p.append(f"loss.name: {config.loss.name} needs stored {REF_LOSS}; {where} offers {offered} "
                 f"(annotate --add-scorers {REF_LOSS})")
    if loss_cls is not None and (loss_cls.needs_groups or loss_cls.needs_weights) and has_score(manifest, scorer):
        # A loss that trains by the score's groups or weights: a constant score would make them arbitrary.
        spread = score_spread_problem(manifest, scorer, where)
        if spread:
            p.append(spread)
    if config.importance.scope == "corpus" and scorer != NO_SCORE and has_score(manifest, scorer):
        stats = manifest.score_stats.get(scorer) or {}
        if not stats.get("quantiles"):
            p.append(f"importance.scope: corpus needs score_stats for {scorer!r} in {where}'s manifest "
                     f"(has {sorted(manifest.score_stats)}); re-annotate, or use scope sequence or batch")
    if p:
        raise ConfigError(f"train config does not fit the data in {where}:\n  " + "\n  ".join(p))


def system_prompt_problem(config: TrainConfig, manifest: Manifest, where: str) -> str | None:
    """Why the data in ``where`` does not fit ``data.system_prompt`` (None when it does): it was rendered with
    another system-prompt choice (its tokenizer fingerprint's; none recorded = default)."""
    have, want = system_prompt_of(manifest.tokenizer), config.data.system_prompt
    if have == want:
        return None
    return (f"data.system_prompt: {where} was rendered with system prompt {have!r} (annotate --system-prompt), but "
            f"data.system_prompt is {want!r}; set data.system_prompt to {have!r}, or annotate again with "
            f"--system-prompt {want!r}")


def eval_grouping(config: TrainConfig) -> tuple[str, float, str]:
    """``(scorer, rho, scope)`` that group data.validation's tokens: the ``eval`` keys where set, else
    the ``importance`` ones (the training grouping)."""
    e, imp = config.eval, config.importance
    return e.scorer or imp.scorer, imp.rho if e.rho is None else e.rho, e.scope or imp.scope


def validate_eval_data(config: TrainConfig, manifest: Manifest, uri: str) -> None:
    """Check data.validation's manifest against the evaluation grouping (:func:`eval_grouping`): its score
    is stored there; scope corpus has the score's statistics in ``corpus_manifest`` or there."""
    scorer, _, scope = eval_grouping(config)
    p: list[str] = []
    mismatch = system_prompt_problem(config, manifest, uri)
    if mismatch:
        p.append(mismatch)
    if scorer == NO_SCORE:
        pass  # no held-out groups: CE and accuracy over all trainable tokens only
    elif not has_score(manifest, scorer):
        p.append(f"eval.scorer: {scorer!r} is not in {uri}; it offers {score_names(manifest.scorer_names)}")
    elif scope == "corpus" and not (manifest.score_stats.get(scorer) or {}).get("quantiles"):
        p.append(f"eval.scope: corpus needs score_stats for {scorer!r} in {uri}'s manifest; use scope sequence or batch")
    if p:
        raise ConfigError(f"train config does not fit the data in {uri}:\n  " + "\n  ".join(p))


# ---------------------------------------------------------------------------------------------
# What the trainer builds from the config
# ---------------------------------------------------------------------------------------------


def loss_options(config: TrainConfig) -> dict[str, Any]:
    """Keyword options for ``train.losses.build_loss(config.loss.name, **options)``."""
    loss_cls = loss_class(config)
    return loss_cls.kwargs(loss_options_of(config.loss, loss_cls), config.importance.rho)


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


#: DeepSpeed's name of the gradient accumulation dtype the trainer sets for bf16 weights.
GRAD_ACCUM_DTYPE_BF16 = "fp32"


def deepspeed_dict(config: TrainConfig, *, world_size: int, dtype: str, zero_stage: int = 3,
                   offload_optimizer: bool = False) -> dict[str, Any]:
    """The DeepSpeed JSON with its "auto" values filled (see the module docstring); ``dtype`` and
    ``zero_stage`` resolved. A stage written in the JSON must agree with ``zero_stage``.

    bf16 weights get fp32 gradient accumulation (``data_types.grad_accum_dtype``); stage 0 with bf16
    is refused (DeepSpeed 0.19 raises on that mix: :func:`train.engine.choose_zero_stage` moves it
    to stage 1). ``offload_optimizer`` puts AdamW's states on the CPU (stages 1-3)."""
    path = deepspeed_config_path(config)
    raw = json.loads(path.read_text(encoding="utf-8"))
    if dtype == "bfloat16":
        if zero_stage == 0:
            raise ConfigError("bf16 weights accumulate gradients in fp32 (data_types.grad_accum_dtype), which DeepSpeed "
                              "refuses without ZeRO: use ZeRO stage >= 1 (train.zero_stage=auto picks 1)")
        written_accum = (raw.get("data_types") or {}).get("grad_accum_dtype", GRAD_ACCUM_DTYPE_BF16)
        if written_accum != GRAD_ACCUM_DTYPE_BF16:
            raise ConfigError(f"deepspeed_config: {path}: data_types.grad_accum_dtype is {written_accum!r}: bf16 weights "
                              f"must accumulate gradients in fp32 (leave it out or write \"fp32\")")
        raw.setdefault("data_types", {})["grad_accum_dtype"] = GRAD_ACCUM_DTYPE_BF16
    if offload_optimizer:
        if zero_stage == 0:
            raise ConfigError("offload_optimizer needs ZeRO stage >= 1")
        raw.setdefault("zero_optimization", {})["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        # The client torch AdamW steps on the host copy: no cpu_adam compile (DeepSpeed refuses it unless told).
        raw["zero_force_ds_cpu_optimizer"] = False
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
