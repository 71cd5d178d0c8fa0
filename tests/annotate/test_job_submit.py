"""`ray job submit --working-dir . -- python annotate/run.py ...` against a `ray start --head` cluster."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from schemas.validate import validate_directory
from tests.conftest import REPO

pytestmark = pytest.mark.slow


def test_ray_job_submit(tmp_path, lima_slice, smol_tokenizer_dir):
    ray_cli = str(Path(sys.executable).with_name("ray"))
    # The job's entrypoint runs under this interpreter, as a user's would under their environment.
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    env.pop("RAY_ADDRESS", None)
    out = tmp_path / "job_out"
    subprocess.run([ray_cli, "start", "--head", "--num-cpus=2", "--dashboard-port=8365", "--port=6390",
                    "--disable-usage-stats"], env=env, check=True, capture_output=True, timeout=120)
    try:
        for _ in range(30):
            result = subprocess.run(
                [ray_cli, "job", "submit", "--address", "http://127.0.0.1:8365", "--working-dir", str(REPO), "--",
                 sys.executable, "annotate/run.py", "--input", str(lima_slice), "--format", "lima", "--model", str(smol_tokenizer_dir),
                 "--scorers", "tfidf", "--output", str(out), "--shard-size", "10"],
                env=env, capture_output=True, text=True, timeout=400,
            )
            # Right after `ray start` the dashboard's job agent may not be up yet: Ray says to retry.
            if "No available agent" not in result.stdout + result.stderr:
                break
            time.sleep(2)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert "succeeded" in result.stdout + result.stderr
    finally:
        subprocess.run([ray_cli, "stop", "--force"], env=env, capture_output=True, timeout=120)
    assert validate_directory(out).ok
