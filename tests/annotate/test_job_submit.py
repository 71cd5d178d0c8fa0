"""`ray job submit --working-dir . -- python annotate/run.py ...` against a two-node `ray start` cluster on
this machine (a head and a worker, one CPU each): the job's actors run on both nodes, and the output is
byte for byte a one-node run's."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from schemas.shard import SUMMARY_NAME, Manifest
from schemas.validate import validate_directory
from tests.conftest import REPO

pytestmark = pytest.mark.slow


def test_ray_job_submit_on_two_nodes_gives_the_one_node_output(tmp_path, job_args, reference):
    job = job_args
    one_node = reference
    ray_cli = str(Path(sys.executable).with_name("ray"))
    # The job's entrypoint runs under this interpreter, as a user's would under their environment.
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    env.pop("RAY_ADDRESS", None)
    out = tmp_path / "job_out"
    subprocess.run([ray_cli, "start", "--head", "--num-cpus=1", "--dashboard-port=8365", "--port=6390",
                    "--disable-usage-stats"], env=env, check=True, capture_output=True, timeout=120)
    try:
        # A second node, as on a second machine: one CPU, so the job's three actors (tokenize, tfidf,
        # base_loss; half a CPU each) cannot all fit on the head.
        subprocess.run([ray_cli, "start", "--address=127.0.0.1:6390", "--num-cpus=1", "--disable-usage-stats"], env=env,
                       check=True, capture_output=True, timeout=120)
        deadline = time.time() + 300  # the job agents of both nodes start after `ray start` returns; slow on 2 loaded cores
        while True:
            result = subprocess.run(
                [ray_cli, "job", "submit", "--address", "http://127.0.0.1:8365", "--working-dir", str(REPO), "--",
                 sys.executable, "annotate/run.py", *job, "--output", str(out)],
                env=env, capture_output=True, text=True, timeout=400,
            )
            # Right after `ray start` the dashboard's job agent may not be up yet: Ray says to retry.
            if "No available agent" not in result.stdout + result.stderr or time.time() > deadline:
                break
            time.sleep(2)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert "succeeded" in result.stdout + result.stderr
    finally:
        subprocess.run([ray_cli, "stop", "--force"], env=env, capture_output=True, timeout=120)
    assert validate_directory(out).ok
    assert [(s.path, s.sha256) for s in Manifest.load(out).shards] == [(s.path, s.sha256) for s in Manifest.load(one_node).shards]
    nodes = json.loads((out / SUMMARY_NAME).read_text())["nodes"]
    assert len(nodes) == 2 and len({n["node_id"] for n in nodes}) == 2
    for node in nodes:  # both nodes hosted actors, and the rows each did add up per stage
        assert {"tokenize", "tfidf", "base_loss"} & set(node["stages"])
    for stage in ("tokenize", "tfidf", "base_loss", "write"):
        assert sum(n["stages"].get(stage, {}).get("rows", 0) for n in nodes) == Manifest.load(out).totals["rows"]
    assert "node " in result.stdout  # the summary's line per node
