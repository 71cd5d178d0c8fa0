"""Recorded losses (as torchtune's recipe tests do): what the trainer trains, pinned step by step.

For every loss, train/main.py runs 4 optimizer steps of 2 micro-batches on a fixed tiny model and fixed
data, and the logged step losses must equal the values recorded here. Any change to what is trained
(data order, packing, grouping, tie-breaking, a loss's formula, the schedule, the optimizer) fails
this test loudly; such a change updates RECORDED once, with the reason in its commit message.

Regenerate (prints the dict to paste):  SFTGO_RECORD_LOSSES=1 pytest tests/train/test_recorded_losses.py -s
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from schemas.shard import tokenizer_fingerprint
from tests.conftest import REPO
from tests.train.conftest import make_examples, write_annotated_dir

pytestmark = pytest.mark.slow

SCORERS = ["tfidf", "base_loss", "ref_loss"]

# The options of each case beyond the shared ones in _args (loss.name=<case> unless the case says otherwise).
CASES: dict[str, dict[str, str]] = {
    "sft": {},
    "sftgo": {"loss.lambda": "0.9"},
    # The per-micro-batch approximation: its values are the ones sftgo had before group_decision=step (the default).
    "sftgo_micro_batch": {"loss.name": "sftgo", "loss.lambda": "0.9", "loss.group_decision": "micro_batch"},
    "sftgo_linear_excess": {"loss.name": "sftgo", "importance.scorer": "excess_loss", "importance.rho": "0.55",
                            "loss.lambda_schedule": "linear", "loss.lambda_max": "0.9", "loss.lambda_min": "0.05"},
    "rho1": {"importance.rho": "0.4"},
    "infosft": {},
    "dft": {},
    "eaft": {"loss.eaft_k": "5", "loss.eaft_alpha": "2"},
    # The same run without any score (eaft reads none): the same losses, and no group numbers logged.
    "eaft_no_score": {"loss.name": "eaft", "importance.scorer": "none", "loss.eaft_k": "5", "loss.eaft_alpha": "2"},
    "select": {},
    "weighted": {},
}

# First 4 step losses per case; see the module docstring before changing any value.
RECORDED: dict[str, list[float]] = {
    "sft": [10.799927234649658, 10.809899806976318, 10.82400894165039, 10.8219633102417],
    "sftgo": [10.81558895111084, 10.852038860321045, 10.85880708694458, 10.839397430419922],
    "sftgo_micro_batch": [10.815776348114014, 10.851978778839111, 10.861910343170166, 10.839563369750977],
    "sftgo_linear_excess": [10.81628942489624, 10.826606750488281, 10.831629991531372, 10.824832439422607],
    "rho1": [10.819796085357666, 10.81826400756836, 10.825045585632324, 10.840000629425049],
    "infosft": [0.0011487271403893828, 0.0011420358205214143, 0.0011234377743676305, 0.001135436788899824],
    "dft": [0.0002222965340479277, 0.00022096723114373162, 0.00021694759197998792, 0.00021949532674625516],
    "eaft": [10.536744117736816, 10.530009746551514, 10.55233883857727, 10.566022872924805],
    "eaft_no_score": [10.536744117736816, 10.530009746551514, 10.55233883857727, 10.566022872924805],
    "select": [10.762094974517822, 10.85628604888916, 10.879356861114502, 10.788089752197266],
    "weighted": [10.78484296798706, 10.831013679504395, 10.839786052703857, 10.81393814086914],
}

RECORD = os.environ.get("SFTGO_RECORD_LOSSES") == "1"


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory, smol_tokenizer) -> Path:
    root = tmp_path_factory.mktemp("recorded")
    fp = tokenizer_fingerprint(smol_tokenizer)
    fp["name"] = "tiny"
    write_annotated_dir(root / "train", make_examples(40, SCORERS, min_len=8, max_len=40), SCORERS, tokenizer_fp=fp,
                        rows_per_shard=16)
    return root / "train"


def _args(case: str, model: Path, data: Path, out: Path) -> list[str]:
    options = {
        "model": str(model), "data.train": str(data), "data.validation": "", "data.micro_batch_tokens": "96",
        "importance.scorer": "tfidf", "importance.rho": "0.7", "loss.name": case, "optim.lr": "1e-3",
        "optim.warmup_steps": "1", "train.max_steps": "4", "train.grad_accum": "2", "eval.every": "0",
        "checkpoint.every": "0", "checkpoint.keep_final": "false", "output_dir": str(out), "seed": "0",
    }
    options.update(CASES[case])
    return [f"{key}={value}" for key, value in options.items()]


def _step_losses(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


@pytest.mark.parametrize("case", list(CASES))
def test_first_four_step_losses_are_the_recorded_ones(tmp_path, tiny_llama_dir, train_dir, case):
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(REPO / "train" / "main.py"), *_args(case, tiny_llama_dir, train_dir, out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    losses = _step_losses(out)
    if CASES[case].get("importance.scorer") == "none":
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert not any("important_loss" in r or "worse_group" in r for r in records), "no score, no group numbers"
    if RECORD:
        print(f'\n    "{case}": {losses!r},')
        return
    assert case in RECORDED, f"no recorded losses for {case!r}: run with SFTGO_RECORD_LOSSES=1 and paste them"
    assert losses == pytest.approx(RECORDED[case], rel=2e-5, abs=0), f"{case}: {losses} != recorded {RECORDED[case]}"
