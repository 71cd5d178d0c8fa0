"""annotate --system-prompt end to end (a real local Ray): the ids with and without SmolLM2's own system turn,
the manifest's and card's record of the choice, the tokenizer fingerprint, and the summary's share line."""

import json

import pyarrow.parquet as pq
import pytest

from annotate.run import main
from schemas.shard import INPUT_IDS, Manifest
from schemas.validate import validate_directory

pytestmark = pytest.mark.slow

SMOL_TURN = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


def _ids(directory):
    return [row for path in sorted(directory.glob("shard-*.parquet")) for row in pq.read_table(path)[INPUT_IDS].to_pylist()]


@pytest.fixture(scope="module")
def annotated(tmp_path_factory, lima_slice, tiny_llama_dir):
    root = tmp_path_factory.mktemp("sysprompt")
    outputs = {}
    for choice in ("default", "none", "Answer briefly."):
        out = root / choice.split()[0].strip(".").lower()
        args = ["--input", str(lima_slice), "--format", "lima", "--model", str(tiny_llama_dir), "--scorers", "tfidf",
                "--limit", "6", "--shard-size", "3", "--output", str(out)]
        assert main(args + (["--system-prompt", choice] if choice != "default" else [])) == 0
        outputs[choice] = out
    return outputs


def test_ids_with_and_without_the_template_system_turn(annotated, smol_tokenizer):
    turn = smol_tokenizer(SMOL_TURN, add_special_tokens=False)["input_ids"]
    default, none, text = (_ids(annotated[c]) for c in ("default", "none", "Answer briefly."))
    assert len(default) == len(none) == len(text) == 6
    for with_turn, without, briefly in zip(default, none, text):
        assert with_turn[:len(turn)] == turn and with_turn[len(turn):] == without
        assert smol_tokenizer.decode(briefly).startswith("<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\n")
    for out in annotated.values():
        assert validate_directory(out).ok


def test_manifest_card_and_fingerprint_record_the_choice(annotated, capsys):
    default = Manifest.load(annotated["default"])
    assert default.tokenizer["system_prompt"] == "default"
    record = default.system_prompt
    assert record["choice"] == "default" and record["template_turn"] == SMOL_TURN
    assert record["template_turn_tokens"] == 21 and record["rows_with_template_turn"] == 6
    assert record["template_turn_token_share"] == pytest.approx(6 * 21 / default.totals["tokens"])
    none = Manifest.load(annotated["none"])
    assert none.tokenizer["system_prompt"] == "none" and none.system_prompt == {"choice": "none", "template_turn": SMOL_TURN}
    assert none.tokenizer["sha256"] == default.tokenizer["sha256"]  # the same tokenizer, another rendering
    assert none.totals["tokens"] == default.totals["tokens"] - 6 * 21
    text = Manifest.load(annotated["Answer briefly."])
    assert text.tokenizer["system_prompt"] == "Answer briefly." and text.config["system_prompt"] == "Answer briefly."
    card = (annotated["default"] / "_README.md").read_text()
    share = 100 * record["template_turn_token_share"]
    assert "System prompt: default (the chat template's own behaviour: it adds the system turn" in card
    assert f"21 tokens in 6 rows, {share:.1f}% of all tokens" in card
    assert "System prompt: none (no system turn except a record's own; the template's own system turn" in \
        (annotated["none"] / "_README.md").read_text()
    assert "System prompt: text 'Answer briefly.'" in (annotated["Answer briefly."] / "_README.md").read_text()
    summary = json.loads((annotated["default"] / "_annotate_summary.json").read_text())
    assert summary["system_prompt"] == record


def test_summary_line_states_the_share(tmp_path, lima_slice, tiny_llama_dir, capsys):
    out = tmp_path / "out"
    assert main(["--input", str(lima_slice), "--format", "lima", "--model", str(tiny_llama_dir), "--scorers", "tfidf",
                 "--limit", "3", "--output", str(out)]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("system "))
    share = 100 * Manifest.load(out).system_prompt["template_turn_token_share"]
    assert f"21 tokens in 3 rows, {share:.1f}% of all tokens; --system-prompt none leaves it out" in line
    # The same output directory with another choice is not a resume of this one: refused, naming the system prompt.
    assert main(["--input", str(lima_slice), "--format", "lima", "--model", str(tiny_llama_dir), "--scorers", "tfidf",
                 "--limit", "3", "--output", str(out), "--system-prompt", "none"]) != 0
    assert "written by a different job (other input, model, system prompt" in capsys.readouterr().err

def test_a_template_that_cannot_do_without_is_refused_before_ray(tmp_path, lima_slice, tiny_llama_dir, capsys):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = (  # writes its default system text into the first user turn (Mistral's way)
        "{% set sys = messages[0]['content'] if messages[0]['role'] == 'system' else 'Be nice.' %}"
        "{% for m in messages if m['role'] != 'system' %}{% if loop.first %}{{ '[INST] ' + sys + ' ' + m['content'] + ' [/INST]' }}"
        "{% else %}{{ m['content'] + '</s>' }}{% endif %}{% endfor %}")
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    for name in ("chat_template.jinja", "chat_template.json"):
        (model / name).unlink(missing_ok=True)
    rc = main(["--input", str(lima_slice), "--format", "lima", "--model", str(model), "--scorers", "tfidf",
               "--limit", "3", "--output", str(tmp_path / "out"), "--system-prompt", "none"])
    assert rc == 2
    assert "--system-prompt none cannot remove its system turn" in capsys.readouterr().err
