"""Unknown scorers, unreadable models, unwritable outputs and bad options fail before Ray starts."""


import pytest

from annotate.config import AnnotateConfig, load_config
from annotate.pipeline import prepare
from tests.conftest import LIMA


def _config(tmp_path, model, **kw):
    base = dict(input=[str(LIMA)], output=str(tmp_path / "out"), model=str(model), scorers=["tfidf"])
    base.update(kw)
    return AnnotateConfig(**base)


def test_unknown_scorer(tmp_path, smol_tokenizer_dir):
    with pytest.raises(ValueError, match="unknown scorer 'tfidff'.*available: .*tfidf"):
        prepare(_config(tmp_path, smol_tokenizer_dir, scorers=["tfidff"]))


def test_unreadable_model_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare(_config(tmp_path, tmp_path / "missing_model"))


def test_unwritable_output(tmp_path, smol_tokenizer_dir):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError, match="not writable"):
        prepare(_config(tmp_path, smol_tokenizer_dir, output=str(blocker / "out")))


def test_bad_options_are_named(tmp_path, smol_tokenizer_dir):
    with pytest.raises(ValueError) as info:
        prepare(_config(tmp_path, smol_tokenizer_dir, format="csv", overlength="cut", input=[str(tmp_path / "none.jsonl")]))
    message = str(info.value)
    assert "format: 'csv'" in message and "overlength: 'cut'" in message and "none.jsonl does not exist" in message
    with pytest.raises(ValueError, match="unknown option.*'term'"):
        prepare(_config(tmp_path, smol_tokenizer_dir, scorer_options={"tfidf": {"trm": "word"}}))
    with pytest.raises(ValueError, match=r"scorers: names no scorer; --list-scorers shows them"):
        prepare(_config(tmp_path, smol_tokenizer_dir, scorers=[]))


def test_yaml_config_with_cli_override(tmp_path):
    path = tmp_path / "a.yaml"
    path.write_text(f"input: {LIMA}\noutput: {tmp_path}/o\nscorers: tfidf,ref_loss\nmax_length: 512\nscorer_options:\n  ref_loss: {{dtype: float32}}\n")
    config, _ = load_config(["--config", str(path), "--max-length", "256", "--scorer-option", "ref_loss.max_batch_tokens=100"])
    assert config.scorers == ["tfidf", "ref_loss"] and config.max_length == 256 and config.input == [str(LIMA)]
    assert config.scorer_options == {"ref_loss": {"dtype": "float32", "max_batch_tokens": 100}}
    path.write_text("inputs: x\n")
    with pytest.raises(ValueError, match=r"a.yaml: unknown key 'inputs' \(did you mean input\?\)"):
        load_config(["--config", str(path)])


def test_command_line_forms_are_trains():
    """One mechanism (data/config.py): flags, key=value, several files per list flag, bare bools."""
    config, list_scorers = load_config(["--input", "a.jsonl", "b.jsonl", "--strict", "max_length=300", "--scorers=tfidf,entropy",
                                        "--scorer-option", "tfidf.term=word", "--trust-remote-code", "false", "--list-scorers"])
    assert config.input == ["a.jsonl", "b.jsonl"] and config.strict is True and config.max_length == 300
    assert config.scorers == ["tfidf", "entropy"] and config.scorer_options == {"tfidf": {"term": "word"}}
    assert config.trust_remote_code is False and list_scorers
    with pytest.raises(ValueError) as info:
        load_config(["--max-lenght", "3", "--shard-size", "many", "--scorer-option", "term=word"])
    message = str(info.value)
    assert "unknown key 'max_lenght' (did you mean max_length?)" in message
    assert "shard_size: expected an integer, got 'many'" in message
    assert "--scorer-option 'term=word': expected NAME.KEY=VALUE" in message
