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


# -- scorer models: ref_loss named explicitly, every scorer model on the job's tokenizer ------------------------


def _retokenized_copy(src, out, edit):
    """A copy of the model folder ``src`` whose tokenizer.json ``edit`` changed (a model whose tokenizer differs)."""
    import json
    import shutil

    shutil.copytree(src, out)
    raw = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    edit(raw["model"])
    (out / "tokenizer.json").write_text(json.dumps(raw, ensure_ascii=False), encoding="utf-8")
    return out


def test_ref_loss_needs_its_model_named(tmp_path, tiny_llama_dir, capsys):
    import ray

    from annotate.run import main

    with pytest.raises(ValueError, match=r"ref_loss: --scorer-option ref_loss\.model=PATH is required.*not defaulted to --model"):
        prepare(_config(tmp_path, tiny_llama_dir, scorers=["tfidf", "ref_loss"]))
    was_running = ray.is_initialized()
    assert main(["--input", str(LIMA), "--model", str(tiny_llama_dir), "--scorers", "ref_loss",
                 "--output", str(tmp_path / "o")]) == 2
    assert "ref_loss.model=PATH is required" in capsys.readouterr().err
    assert ray.is_initialized() == was_running  # refused before Ray starts
    assert not (tmp_path / "o").exists()
    # base_loss and entropy still default to --model: that is the base model
    job = prepare(_config(tmp_path, tiny_llama_dir, scorers=["base_loss", "entropy"]))
    assert [s.model for s in job.scorer_infos] == [str(tiny_llama_dir)] * 2


def test_scorer_model_with_another_tokenizer_is_refused_naming_both(tmp_path, tiny_llama_dir, tiny_llama_ref_dir):
    # Same tokenizer files, other weights: accepted.
    job = prepare(_config(tmp_path, tiny_llama_dir, scorers=["ref_loss"], scorer_options={"ref_loss": {"model": str(tiny_llama_ref_dir)}}))
    assert job.scorer_infos[0].model == str(tiny_llama_ref_dir)

    def swap(model):  # two vocabulary entries trade ids: every merge still names the same strings
        vocab = model["vocab"]
        vocab["the"], vocab["and"] = vocab["and"], vocab["the"]

    swapped = _retokenized_copy(tiny_llama_ref_dir, tmp_path / "ref_swapped", swap)
    with pytest.raises(ValueError) as info:
        prepare(_config(tmp_path, tiny_llama_dir, scorers=["tfidf", "ref_loss"], scorer_options={"ref_loss": {"model": str(swapped)}}))
    message = str(info.value)
    assert f"--scorer-option ref_loss.model={swapped}" in message and f"--model {tiny_llama_dir}" in message
    assert "2 of its 49152 vocabulary entries differ" in message

    def unmerge(model):  # the same vocabulary, one merge fewer: " the" is no longer one token
        merges = model["merges"]
        target = next(m for m in merges if (m if isinstance(m, str) else " ".join(m)) == "Ġt he")
        merges.remove(target)

    unmerged = _retokenized_copy(tiny_llama_dir, tmp_path / "base_unmerged", unmerge)
    with pytest.raises(ValueError, match=rf"--scorer-option base_loss.model={unmerged}: its tokenizer gives other token "
                                         rf"ids than --model {tiny_llama_dir}'s \(the text .* tokenizes to other ids"):
        prepare(_config(tmp_path, tiny_llama_dir, scorers=["base_loss"], scorer_options={"base_loss": {"model": str(unmerged)}}))


def test_scorer_model_with_fewer_embeddings_is_refused(tmp_path, tiny_llama_dir, smol_tokenizer_dir):
    from tests.conftest import make_tiny_llama

    small = make_tiny_llama(tmp_path / "small_vocab", smol_tokenizer_dir, vocab=1024)
    with pytest.raises(ValueError, match=rf"ref_loss.model={small}: its embeddings have 1024 rows, but --model .* gives ids up to 49151"):
        prepare(_config(tmp_path, tiny_llama_dir, scorers=["ref_loss"], scorer_options={"ref_loss": {"model": str(small)}}))
