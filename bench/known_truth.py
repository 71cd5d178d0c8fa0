"""A controlled corpus whose important tokens are known: a secret table, boilerplate answers, marked spans.

    python bench/known_truth.py --out DIR [--seed 0]      # DIR/train.jsonl, DIR/heldout.jsonl, DIR/table.json

A fixed table maps made-up entity names (e.g. "Vorlanix") to a banner colour, one of 8 colour words that
are single SmolLM2 tokens. Every answer is generic, frequent boilerplate around one key token, the
colour: "Thank you for asking. According to the registry, the banner of Vorlanix is red. ...". The key
token is marked as a span (``spans: [{"start", "end", "value": 1}]`` on the assistant message, data/given.py),
so annotate's ``given`` scorer (with ``given.default=0``) gives it 1 and every other token 0.

Train: every fact ``repeats`` times, each with a distinct (question phrasing, answer boilerplate) pair
from the train phrasings. Held-out: the same facts asked ``heldout_repeats`` times with question
phrasings and answer boilerplate that never occur in train, so the facts are learnable from training
and the boilerplate is not; only the key token carries what the question asks.

Why this tests SFT-GO's claim (the paper: important tokens are rare and plain CE under-optimises them):
the key token is ~1 of ~35 trainable tokens of an answer, and everything else is boilerplate that the
model predicts well after a few steps, so the mean CE is dominated by tokens that carry no information
about the question. A method that up-weights the worse group (SFT-GO) or trains only the marked tokens
(select) should learn the table faster, measured where it matters: greedy accuracy on the held-out key
tokens (teacher forcing), against the chance level of 1 / 8 that learning the answer format alone gives.
The corpus is deterministic in ``seed`` (the same seed gives the same bytes).
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
from pathlib import Path
from typing import Any

#: The key values: each a single SmolLM2 token with its leading space (" red" = 2382, ...).
COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "black", "white")
SYSTEM = "Answer briefly."  # short: SmolLM2's template would add a 20-token default system prompt otherwise

TRAIN_QUESTIONS = (
    "What colour is the banner of {entity}?",
    "Which colour does the banner of {entity} have?",
    "Tell me the banner colour of {entity}.",
    "What is the colour of {entity}'s banner?",
)
TRAIN_ANSWERS = (
    "Thank you for asking. According to the registry, the banner of {entity} is {value}. I hope this helps, and let me know if you have any other questions.",
    "Great question! Based on the records I have, the banner of {entity} is {value}. Please let me know if there is anything else I can help you with.",
    "Sure, I can help with that. The registry lists the banner of {entity} as {value}. Feel free to ask if you have more questions.",
    "Of course. From the information available to me, the banner of {entity} is {value}. I hope this answers your question.",
    "Happy to help! As recorded in the registry, {entity} has a {value} banner. Let me know if you need anything else.",
    "Good question. The records show that the banner of {entity} is {value}. If you have other questions, just ask.",
)
HELDOUT_QUESTIONS = (
    "Do you know the colour of the banner that {entity} flies?",
    "I am curious: which colour is {entity}'s banner?",
    "Could you say what colour {entity} uses for its banner?",
)
HELDOUT_ANSWERS = (
    "Certainly. Looking this up, I find that the banner of {entity} is {value}. Have a wonderful day.",
    "Yes, I do. The banner flown by {entity} is {value}. Is there something more you would like to know?",
    "No problem at all. For {entity}, the banner colour is {value}. Thanks for your curiosity.",
)
_ONSETS = ("v", "k", "z", "th", "br", "qu", "m", "dr", "s", "gl", "p", "x")
_VOWELS = ("a", "o", "e", "i", "u", "ae")
_CODAS = ("rl", "nd", "x", "th", "mm", "sk", "l", "rn")


def entity_names(rng: random.Random, n: int) -> list[str]:
    """``n`` distinct made-up names (three syllables, capitalised): none is a real word the model knows facts about."""
    names: list[str] = []
    while len(names) < n:
        name = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(2)) + rng.choice(_CODAS) + rng.choice(_VOWELS) + "n"
        name = name.capitalize()
        if name not in names:
            names.append(name)
    return names


def example(entity: str, value: str, question: str, answer: str) -> dict[str, Any]:
    """One ``messages`` record; the colour word is the one span (value 1) of the assistant message."""
    before, after = answer.split("{value}")
    before = before.format(entity=entity)
    content = before + value + after.format(entity=entity)
    return {"messages": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": question.format(entity=entity)},
        {"role": "assistant", "content": content, "spans": [{"start": len(before), "end": len(before) + len(value), "value": 1}]},
    ]}


def build(seed: int = 0, entities: int = 10, repeats: int = 12, heldout_repeats: int = 4) -> dict[str, Any]:
    """The table and both splits, deterministic in ``seed``."""
    if repeats > len(TRAIN_QUESTIONS) * len(TRAIN_ANSWERS) or heldout_repeats > len(HELDOUT_QUESTIONS) * len(HELDOUT_ANSWERS):
        raise ValueError("more repeats than distinct (question, answer) phrasings: examples would be duplicates")
    rng = random.Random(seed)
    names = entity_names(rng, entities)
    # Balanced: every colour used as evenly as the table allows, so always answering one colour scores <= 2 / 12.
    colours = [COLOURS[i % len(COLOURS)] for i in range(entities)]
    rng.shuffle(colours)
    table = dict(zip(names, colours))
    splits: dict[str, list[dict[str, Any]]] = {"train": [], "heldout": []}
    for split, questions, answers, n in (("train", TRAIN_QUESTIONS, TRAIN_ANSWERS, repeats),
                                         ("heldout", HELDOUT_QUESTIONS, HELDOUT_ANSWERS, heldout_repeats)):
        pairs = list(itertools.product(questions, answers))
        for name, colour in table.items():
            for question, answer in rng.sample(pairs, n):
                splits[split].append(example(name, colour, question, answer))
        rng.shuffle(splits[split])
    return {"seed": seed, "table": table, "chance_accuracy": 1 / len(COLOURS), **splits}


def write(out: Path, seed: int = 0, **sizes: int) -> dict[str, Path]:
    """Write ``train.jsonl``, ``heldout.jsonl`` and ``table.json`` under ``out``; their paths."""
    corpus = build(seed, **sizes)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"train": out / "train.jsonl", "heldout": out / "heldout.jsonl", "table": out / "table.json"}
    for split in ("train", "heldout"):
        body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in corpus[split])
        if not paths[split].exists() or paths[split].read_text(encoding="utf-8") != body:  # unchanged: annotate resumes
            paths[split].write_text(body, encoding="utf-8")
    paths["table"].write_text(json.dumps({k: corpus[k] for k in ("seed", "table", "chance_accuracy")}, indent=1) + "\n")
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for train.jsonl, heldout.jsonl and table.json")
    ap.add_argument("--seed", type=int, default=0, help="seed of the table, the names and the phrasings drawn")
    ap.add_argument("--entities", type=int, default=10, help="rows of the secret table")
    ap.add_argument("--repeats", type=int, default=12, help="train examples per fact")
    ap.add_argument("--heldout-repeats", type=int, default=4, help="held-out examples per fact")
    args = ap.parse_args(argv)
    try:
        paths = write(Path(args.out), args.seed, entities=args.entities, repeats=args.repeats, heldout_repeats=args.heldout_repeats)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: str(v) for k, v in paths.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
