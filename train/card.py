"""The model card (README.md, Hugging Face format) and generation_config.json of an exported model.

A person who finds ``RUN/model`` later reads there what made it: the base model, the objective and
its options, the importance score and how it was thresholded, the training data (by manifest
digest), the steps, and the final held-out losses.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from data.models import EMBEDDED


def base_model_id(name: str) -> str | None:
    """The Hub id of ``name`` for the card's ``base_model`` field, when it is one (or an embedded model's)."""
    if name in EMBEDDED:
        return EMBEDDED[name].get("hub_id")
    path = Path(name)
    source = path / "sftgo_source.json"  # the cache folder of an embedded model
    if source.is_file():
        return EMBEDDED.get(json.loads(source.read_text()).get("name", ""), {}).get("hub_id")
    if path.exists() or name.startswith((".", "/")) or name.count("/") != 1:
        return None  # a local folder: no Hub id to point at
    return name


def run_card(cfg: Any, objective: str, steps: int, total_steps: int, final_eval: dict[str, float] | None,
             merged: bool = False) -> str:
    """:func:`model_card` of a training run under ``cfg`` (a ``train.config.TrainConfig``); ``objective``: the loss's
    description. With LoRA (``lora.rank`` > 0) the card of the adapter folder, or with ``merged`` of the merged folder."""
    from schemas.shard import manifest_sha256
    from train import config as train_config
    from train.lora import lora_alpha

    adapter = None
    if cfg.lora.rank:
        adapter = {"rank": cfg.lora.rank, "alpha": lora_alpha(cfg.lora), "dropout": cfg.lora.dropout,
                   "target_modules": list(cfg.lora.target_modules), "quantize": cfg.lora.quantize, "merged": merged}
    return model_card(base_model=cfg.model, loss_name=cfg.loss.name, objective=objective, loss_options=train_config.loss_options(cfg),
                      scorer=cfg.importance.scorer, rho=cfg.importance.rho, scope=cfg.importance.scope, train_data=cfg.data.train,
                      train_manifest_sha256=manifest_sha256(cfg.data.train), validation_data=cfg.data.validation or None,
                      steps=steps, total_steps=total_steps, final_eval=final_eval, config_yaml=train_config.format_config(cfg),
                      adapter=adapter)


def run_cards(cfg: Any, objective: str, steps: int, total_steps: int, final_eval: dict[str, float] | None) -> tuple[str, str | None]:
    """The cards of ``RUN/model/`` and of ``RUN/model_merged/`` (None unless ``lora.export_merged``)."""
    card = run_card(cfg, objective, steps, total_steps, final_eval)
    return card, run_card(cfg, objective, steps, total_steps, final_eval, merged=True) if cfg.lora.export_merged else None


def _adapter_lines(base_model: str, adapter: dict[str, Any]) -> list[str]:
    """The card's rows for LoRA: what the folder is, of which base, and the adapter's settings."""
    what = ("the base model with a LoRA adapter merged into its weights (a plain model)" if adapter["merged"] else
            f"a LoRA adapter (PEFT), not a whole model: it needs its base, `{base_model}` (the folder in "
            f"adapter_config.json's base_model_name_or_path)")
    quantized = ", base in 4-bit NF4 while training (QLoRA)" if adapter["quantize"] != "none" else ""
    return [f"| this folder | {what} |",
            f"| LoRA | rank {adapter['rank']}, alpha {adapter['alpha']:g} (scale {adapter['alpha'] / adapter['rank']:g}), dropout "
            f"{adapter['dropout']:g}, on `{','.join(adapter['target_modules'])}`{quantized}; the base's weights were frozen |"]


def model_card(*, base_model: str, loss_name: str, objective: str, loss_options: dict[str, Any], scorer: str,
               rho: float, scope: str, train_data: str, train_manifest_sha256: str, validation_data: str | None,
               steps: int, total_steps: int, final_eval: dict[str, float] | None, config_yaml: str,
               adapter: dict[str, Any] | None = None) -> str:
    """The card's text: YAML front matter (``base_model``, tags) for the Hub, then what trained this model.
    ``adapter`` (LoRA: rank, alpha, dropout, target_modules, quantize, merged): the card of an adapter folder (PEFT's
    ``library_name``, loading through PEFT) or of the merged folder."""
    is_adapter = adapter is not None and not adapter["merged"]
    front: dict[str, Any] = {"library_name": "peft" if is_adapter else "transformers", "pipeline_tag": "text-generation",
                             "tags": ["sftgo", f"loss-{loss_name}", *([f"score-{scorer}"] if scorer != "none" else []),
                                      *(["lora"] if adapter is not None else [])]}
    hub_id = base_model_id(base_model)
    if hub_id is not None:
        front["base_model"] = hub_id
    options = ", ".join(f"`{key}={value!r}`" for key, value in loss_options.items()) or "none"
    kind = "" if adapter is None else (", LoRA adapter" if is_adapter else ", LoRA merged")
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "",
             f"# {base_model}, fine-tuned with sftgo ({loss_name}{kind})", "",
             "| | |", "|---|---|",
             f"| base model | `{base_model}`" + (f" ([{hub_id}](https://huggingface.co/{hub_id}))" if hub_id else "") + " |",
             *(_adapter_lines(base_model, adapter) if adapter is not None else []),
             f"| objective | {loss_name}: {objective} |",
             f"| loss options | {options} |",
             ("| importance score | none (the objective reads no score) |" if scorer == "none" else
              f"| importance score | `{scorer}`, rho {rho:g} (the top {1 - rho:.0%} of trainable tokens by score are important), scope `{scope}` |"),
             f"| training data | `{train_data}` (manifest sha256 `{train_manifest_sha256}`) |",
             f"| steps | {steps} of {total_steps} |"]
    if validation_data:
        lines.append(f"| held-out data | `{validation_data}` |")
    if final_eval:
        lines.append(f"| final held-out CE | {final_eval['eval_ce']:.4f} over {int(final_eval['eval_tokens']):,} tokens |")
        if "eval_important_loss" in final_eval:  # absent without held-out groups
            lines.append(f"| final held-out important / unimportant loss | {final_eval['eval_important_loss']:.4f} / "
                         f"{final_eval['eval_unimportant_loss']:.4f} (trainer's in-training evaluation) |")
    if is_adapter:
        lines += ["", "Load it on its base with PEFT:", "", "```python", "import json",
                  "from peft import PeftModel",
                  "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  'base = json.load(open("PATH/adapter_config.json"))["base_model_name_or_path"]',
                  'model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), "PATH")',
                  'tokenizer = AutoTokenizer.from_pretrained("PATH")',
                  "model = model.merge_and_unload()  # optional: a plain model, as fast as the base",
                  "```"]
    else:
        lines += ["", "Load it as any causal LM:", "", "```python",
                  "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  'model = AutoModelForCausalLM.from_pretrained("PATH"); tokenizer = AutoTokenizer.from_pretrained("PATH")',
                  "```"]
    lines += ["", "## Training config", "", "```yaml", config_yaml.rstrip(), "```", ""]
    return "\n".join(lines)


def generation_config(model: Any, tokenizer: Any) -> Any:
    """The base model's generation settings, ending at the tokenizer's end-of-turn token too, with a pad id."""
    config = model.generation_config
    eos = config.eos_token_id
    eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos_ids:
        eos_ids.append(tokenizer.eos_token_id)
    if eos_ids:
        config.eos_token_id = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos_ids[0] if eos_ids else None)
    return config
