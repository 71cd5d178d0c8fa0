"""A model folder whose config asks for its own code (auto_map) is refused by annotate, its loss scorers,
train and evaluate, each naming the option that allows it; nothing from the folder is imported."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import LIMA, REPO

# If the refusal failed, transformers would import this module (and the marker file would appear).
EVIL = "import pathlib\npathlib.Path(__file__).with_name('RAN').write_text('remote code ran')\n"


@pytest.fixture
def remote_code_model(tmp_path, tiny_llama_dir):
    folder = tmp_path / "remote_model"
    shutil.copytree(tiny_llama_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text(EVIL)
    return folder


def test_annotate_refuses_and_names_the_flag(tmp_path, remote_code_model):
    from annotate.config import AnnotateConfig
    from annotate.pipeline import prepare

    config = AnnotateConfig(input=[str(LIMA)], output=str(tmp_path / "out"), format="lima", model=str(remote_code_model))
    with pytest.raises(ValueError, match=r"config.json asks for code shipped with the model \(auto_map: "
                                         r"\['AutoConfig', 'AutoModelForCausalLM'\]\).*--trust-remote-code"):
        prepare(config)
    assert not (remote_code_model / "RAN").exists()


@pytest.mark.parametrize("scorer", ["base_loss", "ref_loss"])
def test_loss_scorers_refuse_and_name_their_option(remote_code_model, tiny_llama_dir, scorer):
    from annotate import scorers as registry
    from annotate.scorers import ScorerContext

    options = registry.build_options(scorer, {"model": str(remote_code_model)})
    with pytest.raises(ValueError, match=f"--scorer-option {scorer}.trust_remote_code=true"):
        registry.get(scorer)(options, ScorerContext(model=str(tiny_llama_dir)))
    allowed = registry.build_options(scorer, {"model": str(remote_code_model), "trust_remote_code": True})
    registry.get(scorer)(allowed, ScorerContext(model=str(tiny_llama_dir)))  # the option lets it through


def test_evaluate_refuses_before_loading(remote_code_model, capsys):
    from evaluation.run import main

    assert main([str(remote_code_model), "--tasks", "", "--no-generate", "--heldout", "x"]) == 2
    assert "--trust-remote-code" in capsys.readouterr().err
    assert not (remote_code_model / "RAN").exists()


@pytest.mark.slow
def test_train_refuses_before_loading(tmp_path, remote_code_model, smol_tokenizer):
    from schemas.shard import tokenizer_fingerprint
    from tests.train.conftest import make_examples, write_annotated_dir

    write_annotated_dir(tmp_path / "shards", make_examples(4, ["tfidf"]), ["tfidf"], tokenizer_fp=tokenizer_fingerprint(smol_tokenizer))
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "train/main.py", f"model={remote_code_model}", f"data.train={tmp_path / 'shards'}",
                           f"output_dir={tmp_path / 'run'}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "trust_remote_code=true" in proc.stdout + proc.stderr
    assert not (remote_code_model / "RAN").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()
