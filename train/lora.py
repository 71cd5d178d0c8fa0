"""LoRA adapters (PEFT) on a frozen base model: the ``lora`` config section in the trainer.

    model = add_adapters(model, cfg.lora, model_path)   # train/engine.py load_model, before deepspeed.initialize
    save_adapter(module, state, folder)                 # export: adapter_config.json + adapter_model.safetensors
    merge_adapter(folder, out, dtype)                   # export with lora.export_merged: base + adapter, a plain HF folder
    load_causal_lm(path, dtype, ...)                    # evaluation: a model folder, or an adapter folder on its base

What DeepSpeed trains is the transformers model itself with PEFT's LoRA layers injected in place
(``PeftModel.base_model.model``), not the ``PeftModel`` wrapper: every module of the trainer (the packed
forward's backbone and ``lm_head`` lookup, ZeRO-3's leaf modules and top-level hooks, the FLOP count) sees the
same ``*ForCausalLM`` as in full training. Only the adapter matrices require gradients, so the client AdamW and
DeepSpeed's optimizer hold states for them alone, and at every ZeRO stage the frozen base costs its weights only
(ZeRO-3: PEFT's layers are created after ``zero.Init`` partitioned the base; ``deepspeed.initialize`` partitions
them too). The wrapper is kept in the model's ``__dict__`` (not as a submodule) for ``save_pretrained``.

Gradient checkpointing needs no ``enable_input_require_grads``: the trainer's checkpointing is non-reentrant,
which back-propagates into parameters inside a checkpointed block whether or not its input requires grad
(tests/train/test_lora.py checks every adapter gets a gradient with checkpointing on).

Checkpoints hold the adapters, their optimizer states, the scheduler, the data position and RNG (DeepSpeed's
``exclude_frozen_parameters``): the frozen base is read again from ``model`` on resume. (With tied embeddings DeepSpeed
still writes the output head's weight: its frozen-parameter filter walks ``named_parameters``, which names a tied
weight once, as the embedding.)

QLoRA (``lora.quantize=4bit``): the base loads in 4-bit NF4 through bitsandbytes (double quantisation, compute in
``train.dtype``) on this rank's GPU, or on the CPU where bitsandbytes has a CPU backend (the ``qlora`` extra
locks 0.50.2); ZeRO stages 0-2 only (4-bit weights are not partitioned). The merged export loads the base again
unquantised.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch

#: The name of the adapter's config file in a PEFT adapter folder (what makes a folder an adapter folder).
ADAPTER_CONFIG = "adapter_config.json"
#: Where the PeftModel wrapper of a model with injected adapters is kept (in ``__dict__``: not a submodule).
_PEFT_MODEL = "_sftgo_peft_model"


def lora_alpha(section: Any) -> float:
    """``lora.alpha`` with null resolved: 2 x ``lora.rank``."""
    return float(section.alpha) if section.alpha is not None else 2.0 * section.rank


def peft_config(section: Any) -> Any:
    """PEFT's ``LoraConfig`` from the ``lora`` section (``train.config.LoraConfig``)."""
    import peft

    targets = list(section.target_modules)
    return peft.LoraConfig(r=section.rank, lora_alpha=lora_alpha(section), lora_dropout=section.dropout,
                           target_modules="all-linear" if targets == ["all-linear"] else targets, bias="none",
                           task_type="CAUSAL_LM")


def _peft_model(model: torch.nn.Module, section: Any) -> Any:
    """``peft.get_peft_model`` with the adapters in the model's dtype (``autocast_adapter_dtype=False``: DeepSpeed keeps
    every trained weight in the model's dtype). Raises ValueError naming ``lora.target_modules`` when they match nothing
    (PEFT's complaint) or the output head or the embeddings."""
    import peft

    try:
        with warnings.catch_warnings():  # PEFT 0.21 reads transformers 5's deprecated is_gradient_checkpointing
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            wrapper = peft.get_peft_model(model, peft_config(section), autocast_adapter_dtype=False)
    except ValueError as exc:
        raise ValueError(f"lora.target_modules: {list(section.target_modules)}: {exc}") from None
    inner = wrapper.base_model.model
    targets = list(section.target_modules)
    if targets != ["all-linear"]:  # PEFT only complains when no name matches: a typo beside a good name would pass
        adapted = [name for name, m in inner.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
        unmatched = [t for t in targets if not any(name == t or name.endswith("." + t) for name in adapted)]
        if unmatched:
            head = inner.get_output_embeddings()
            linear = sorted({name.rsplit(".", 1)[-1] for name, m in inner.named_modules()
                             if isinstance(m, (torch.nn.Linear, peft.tuners.lora.LoraLayer)) and m is not head
                             and not any(part == "base_layer" or part.startswith("lora_") for part in name.split("."))})
            raise ValueError(f"lora.target_modules: {unmatched} match no module of the model (its linear layers: {linear})")
    for what, module in (("output head", inner.get_output_embeddings()), ("input embeddings", inner.get_input_embeddings())):
        if isinstance(module, peft.tuners.lora.LoraLayer):
            raise ValueError(f"lora.target_modules: {list(section.target_modules)} puts an adapter on the {what}; the "
                             f"chunked cross-entropy runs the head's own forward: name decoder modules, or all-linear")
    return wrapper


def add_adapters(model: torch.nn.Module, section: Any, base_path: str) -> torch.nn.Module:
    """Inject LoRA adapters into ``model`` in place and freeze everything else; returns ``model`` (the PeftModel
    wrapper rides along for :func:`save_adapter`). ``base_path``: the folder the base was loaded from, recorded as
    the adapter's ``base_model_name_or_path``.

    Raises:
        ValueError: ``lora.target_modules`` matches nothing, or matches the output head or the embeddings.
    """
    wrapper = _peft_model(model, section)
    inner = wrapper.base_model.model
    local = Path(base_path)
    wrapper.peft_config["default"].base_model_name_or_path = str(local.resolve()) if local.is_dir() else base_path
    inner.__dict__[_PEFT_MODEL] = wrapper
    return inner


def peft_model_of(module: torch.nn.Module) -> Any:
    """The PeftModel wrapper of a model :func:`add_adapters` returned, else None (full training)."""
    return module.__dict__.get(_PEFT_MODEL)


def count_trainable(model_path: str, section: Any, trust_remote_code: bool = False) -> int:
    """Adapter parameters ``section`` adds to the model at ``model_path``, counted on the meta device (no weights).
    Raises ValueError as :func:`add_adapters` does: the trainer's ZeRO plan calls it, so bad targets are refused before
    any weight loads."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        wrapper = _peft_model(model, section)
    return sum(p.numel() for p in wrapper.parameters() if p.requires_grad)


def quantized_load_kwargs(dtype: torch.dtype) -> dict[str, Any]:
    """``from_pretrained`` arguments of QLoRA's base: 4-bit NF4 with double quantisation, computing in ``dtype``, on
    this rank's GPU, else on the CPU (train.config.lora_problems has checked that bitsandbytes can quantize there)."""
    from transformers import BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype)
    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    return {"quantization_config": quantization, "device_map": {"": device}}


def adapter_state(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter's entries of ``state`` (a state dict of ``module``, the trained model), keyed as the PeftModel's
    own ``state_dict`` keys them (``base_model.model.`` + the module's key)."""
    names = {name for name, p in module.named_parameters() if p.requires_grad}
    missing = names - set(state)
    if missing:
        raise RuntimeError(f"the gathered state holds no {sorted(missing)[:3]}...: cannot export the adapter")
    return {f"base_model.model.{name}": state[name] for name in sorted(names)}


def save_adapter(module: torch.nn.Module, state: dict[str, torch.Tensor], folder: Path) -> None:
    """PEFT's adapter folder (``adapter_config.json``, ``adapter_model.safetensors``) of the trained ``module`` from
    its gathered ``state`` (the adapter's entries suffice), written by PEFT's own ``save_pretrained``."""
    wrapper = peft_model_of(module)
    wrapper.save_pretrained(folder, state_dict=adapter_state(module, state), safe_serialization=True,
                            save_embedding_layers=False)
    (folder / "README.md").unlink(missing_ok=True)  # PEFT's template card; the run's own card is written instead


def is_adapter_folder(path: str | Path) -> bool:
    """Whether ``path`` is a PEFT adapter folder (``adapter_config.json``, no full model of its own)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base(folder: str | Path) -> str:
    """The base model of an adapter folder, as a loadable folder or Hub id: its ``base_model_name_or_path``; when that
    folder is gone and it was an embedded model's converted copy (``.../models/<embedded name>``), that embedded model
    converted here."""
    from data.models import EMBEDDED, check_model, resolve_model

    try:
        base = json.loads((Path(folder) / ADAPTER_CONFIG).read_text(encoding="utf-8"))["base_model_name_or_path"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{Path(folder) / ADAPTER_CONFIG}: no readable base_model_name_or_path ({exc})") from None
    if not base:
        raise ValueError(f"{Path(folder) / ADAPTER_CONFIG}: base_model_name_or_path is empty: which base does it adapt?")
    if not Path(base).is_dir() and Path(base).name in EMBEDDED:
        return resolve_model(Path(base).name)
    try:
        return check_model(base)
    except FileNotFoundError as exc:
        raise ValueError(f"{folder} is a LoRA adapter of {base}, which is not here: {exc}") from None


def load_causal_lm(path: str, dtype: torch.dtype, *, merge: bool = True, trust_remote_code: bool = False,
                   **kwargs: Any) -> Any:
    """A causal LM from a model folder, or from an adapter folder: its base (:func:`adapter_base`) with the adapter
    loaded by PEFT and, with ``merge``, merged into the base weights (a plain transformers model, as fast as the base).
    ``kwargs`` go to ``from_pretrained`` (attn_implementation, ...)."""
    from transformers import AutoModelForCausalLM

    if not is_adapter_folder(path):
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs)
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(adapter_base(path), dtype=dtype, trust_remote_code=trust_remote_code, **kwargs)
    model = PeftModel.from_pretrained(base, path)
    return model.merge_and_unload() if merge else model


@contextlib.contextmanager
def _without_zero3_init() -> Iterator[None]:
    """Inside the block transformers and PEFT load as if no ZeRO-3 config existed. While the run's ``HfDeepSpeedConfig``
    lives, ``from_pretrained`` partitions what it loads (``zero.Init``: collectives every rank must join); the merge
    loads the base on rank 0 alone, and would wait for the other ranks for ever."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def merge_adapter(folder: Path, out: Path, dtype: torch.dtype, card: str | None = None, trust_remote_code: bool = False) -> None:
    """``out``: the base of the adapter in ``folder`` with it merged in, saved as a plain Hugging Face folder in
    ``dtype`` (the merge runs in float32 on the CPU, then casts), with the adapter folder's tokenizer and generation
    config and the model card ``card`` (rank 0 alone, also under ZeRO-3; written whole or not at all)."""
    with _without_zero3_init():
        model = load_causal_lm(str(folder), torch.float32, trust_remote_code=trust_remote_code).to(dtype)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    for item in folder.iterdir():  # tokenizer files, generation_config.json; not the adapter's own files
        if item.is_file() and not item.name.startswith("adapter_") and item.name not in ("README.md", "config.json"):
            shutil.copy(item, tmp / item.name)
    if card is not None:
        (tmp / "README.md").write_text(card, encoding="utf-8")
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
