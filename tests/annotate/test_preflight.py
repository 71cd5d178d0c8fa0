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


def test_yaml_config_with_cli_override(tmp_path):
    path = tmp_path / "a.yaml"
    path.write_text(f"input: {LIMA}\noutput: {tmp_path}/o\nscorers: tfidf,ref_loss\nmax_length: 512\nscorer_options:\n  ref_loss: {{dtype: float32}}\n")
    config, _ = load_config(["--config", str(path), "--max-length", "256", "--scorer-option", "ref_loss.max_batch_tokens=100"])
    assert config.scorers == ["tfidf", "ref_loss"] and config.max_length == 256 and config.input == [str(LIMA)]
    assert config.scorer_options == {"ref_loss": {"dtype": "float32", "max_batch_tokens": 100}}
    path.write_text("inputs: x\n")
    with pytest.raises(ValueError, match=r"a.yaml: unknown option\(s\) \['inputs'\]"):
        load_config(["--config", str(path)])
