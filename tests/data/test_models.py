"""data.models.load_tokenizer: the class AutoTokenizer picked, loaded directly in an actor, is the same tokenizer,
and loading it so does not import torch (seconds of every tokenize actor's start)."""

import json
import subprocess
import sys

from data.models import load_tokenizer, tokenizer_class_name
from tests.conftest import LIMA, REPO


def test_the_named_class_loads_the_same_tokenizer_as_autotokenizer(smol_tokenizer_dir):
    auto = load_tokenizer(str(smol_tokenizer_dir))
    name = tokenizer_class_name(auto)
    direct = load_tokenizer(str(smol_tokenizer_dir), tokenizer_class=name)
    assert type(direct) is type(auto) and name.startswith("transformers.")
    assert direct.get_vocab() == auto.get_vocab() and direct.all_special_ids == auto.all_special_ids
    for line in LIMA.read_text(encoding="utf-8").splitlines()[:5]:
        turns = json.loads(line)["conversations"]
        messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
        assert direct.apply_chat_template(messages, tokenize=False) == auto.apply_chat_template(messages, tokenize=False)
        text = auto.apply_chat_template(messages, tokenize=False)
        assert direct(text)["input_ids"] == auto(text)["input_ids"]


def test_loading_the_named_class_does_not_import_torch(smol_tokenizer_dir):
    name = tokenizer_class_name(load_tokenizer(str(smol_tokenizer_dir)))
    code = (f"import sys; from data.models import load_tokenizer; "
            f"t = load_tokenizer({str(smol_tokenizer_dir)!r}, tokenizer_class={name!r}); "
            f"print(len(t), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    assert out == ["49152", "False"]


def test_a_class_outside_transformers_is_not_imported(smol_tokenizer_dir):
    # Only transformers' own classes are taken by name; anything else goes through AutoTokenizer.
    tokenizer = load_tokenizer(str(smol_tokenizer_dir), tokenizer_class="os:system")
    assert tokenizer_class_name(tokenizer).startswith("transformers.")
