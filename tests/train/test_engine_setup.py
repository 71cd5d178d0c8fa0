"""The resolved DeepSpeed config builds real engines that accumulate bf16 gradients in fp32 (CPU, gloo, one rank)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

_WORKER = r'''
import json, torch, deepspeed
from train import config as tc
cfg = tc.load_config(["data.train=x", "train.grad_accum=2"])
out = {}
deepspeed.init_distributed(dist_backend="gloo")
for case in ("0", "1", "2", "2-offload"):
    stage = int(case[0])
    ds = tc.deepspeed_dict(cfg, world_size=1, dtype="bfloat16", zero_stage=stage, offload_optimizer=case.endswith("offload")) \
        if stage else {**tc.deepspeed_dict(cfg, world_size=1, dtype="bfloat16", zero_stage=1), "zero_optimization": {"stage": 0}}
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)).to(torch.bfloat16)
    try:
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3), config=ds)
    except NotImplementedError as exc:  # stage 0: why the trainer moves bf16 to stage 1
        out[case] = {"error": str(exc)}
        continue
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    before = [p.detach().clone() for p in engine.module.parameters()]
    for _ in range(4):  # two optimizer steps of two micro-batches
        engine.backward(engine.module(x).float().pow(2).mean())
        engine.step()
    out[case] = {"types": [str(t) for t in engine.get_data_types()], "optimizer": type(engine.optimizer).__name__,
                 "steps": engine.global_steps, "offload": bool(getattr(engine.optimizer, "cpu_offload", False)),
                 "trained": any(not torch.equal(a, p) for a, p in zip(before, engine.module.parameters()))}
print("RESULT " + json.dumps(out))
'''


def test_bf16_engines_accumulate_in_fp32_at_stages_1_and_2_and_offloaded(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER, encoding="utf-8")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, DS_ACCELERATOR="cpu", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), PYTHONPATH=os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(script)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert "unsupported mix" in result["0"]["error"]
    fp32_accumulation = ["torch.bfloat16", "torch.float32"]
    # Stage 1: DeepSpeed's BF16_Optimizer with fp32 gradient buffers; stage 2: the ZeRO optimizer's separate fp32
    # accumulation; ZeRO-Offload: the same optimizer with its states on the CPU, stepped by the client AdamW.
    assert result["1"] == {"types": fp32_accumulation, "optimizer": "BF16_Optimizer", "steps": 2, "offload": False, "trained": True}
    assert result["2"] == {"types": fp32_accumulation, "optimizer": "DeepSpeedZeroOptimizer", "steps": 2, "offload": False,
                           "trained": True}
    assert result["2-offload"] == {"types": fp32_accumulation, "optimizer": "DeepSpeedZeroOptimizer", "steps": 2, "offload": True,
                                   "trained": True}


def test_dropping_lines_leaves_out_deepspeeds_op_build_line_and_passes_the_rest(capsys):
    """The filter around deepspeed.init_distributed: its op-build print goes, every other line passes as written."""
    from train.engine import OP_BUILT, dropping_lines

    with dropping_lines(OP_BUILT):
        print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")
        print("Using /tmp as PyTorch extensions root...")
        print("partial ", end="")
        print("line")
        print("no newline at the end", end="")
    assert capsys.readouterr().out == "Using /tmp as PyTorch extensions root...\npartial line\nno newline at the end"
