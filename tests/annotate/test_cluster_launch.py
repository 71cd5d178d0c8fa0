"""docker/ray-cluster-local.yaml launches a multi-node cluster on this machine through Ray's autoscaler
(`RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config ...`: the autoscaler starts the worker nodes its
min_workers asks for, as local processes), and `ray job submit -- python annotate/run.py ...` on it gives
byte for byte the one-node output, with the work spread over the worker nodes.

`ray up` / `ray submit` / `ray down` cannot drive that provider with Ray 2.60 (see the config's header);
test_ray_up_cannot_drive_the_local_config pins why, so the day a Ray release makes them work it fails
and says so.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from schemas.shard import SUMMARY_NAME, Manifest
from schemas.validate import validate_directory
from tests.conftest import REPO

pytestmark = pytest.mark.slow

CONFIG = REPO / "docker" / "ray-cluster-local.yaml"
# Not test_job_submit.py's (6390, 8365) nor Ray's defaults, so neither collides with this one.
GCS_PORT, DASHBOARD_PORT, CLIENT_PORT, AGENT_PORT = 6391, 8366, 23011, 52371
RAY_CLI = str(Path(sys.executable).with_name("ray"))


def _env(**extra: str) -> dict[str, str]:
    # The job's entrypoint runs under this interpreter, as a user's would under their environment.
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
               **extra)
    env.pop("RAY_ADDRESS", None)
    return env


def _config_on_test_ports(tmp_path: Path) -> Path:
    """The repository's config with only the head's port changed (the autoscaler reads it all along)."""
    from ray._private.services import get_node_ip_address  # the IP `ray start` gives the head, as it prints

    config = yaml.safe_load(CONFIG.read_text())
    assert "gcs_address" not in config["provider"]  # the head's IP and port 6379: the header's commands
    config["provider"]["gcs_address"] = f"{get_node_ip_address()}:{GCS_PORT}"
    path = tmp_path / "ray-cluster-local.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _alive_workers(env: dict[str, str]) -> list[dict]:
    result = subprocess.run([RAY_CLI, "list", "nodes", "--address", f"http://127.0.0.1:{DASHBOARD_PORT}", "--detail",
                             "--format", "json", "--filter", "state=ALIVE"], env=env, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        return []  # the dashboard is not up yet
    return [n for n in json.loads(result.stdout) if not n.get("is_head_node")]


def test_autoscaler_launches_the_local_config_and_the_job_spreads_over_its_workers(tmp_path, job_args, reference):
    one_node = reference  # before the cluster: annotate's own local Ray would join a running one
    config = yaml.safe_load(CONFIG.read_text())
    want = config["available_node_types"]["ray.worker.cpu"]["min_workers"]
    head_cpus = config["available_node_types"]["ray.head.default"]["resources"]["CPU"]
    assert want >= 2
    env = _env(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
    out = tmp_path / "job_out"
    started = time.time()
    try:
        subprocess.run([RAY_CLI, "start", "--head", f"--num-cpus={head_cpus}", f"--port={GCS_PORT}",
                        f"--dashboard-port={DASHBOARD_PORT}", f"--ray-client-server-port={CLIENT_PORT}",
                        f"--dashboard-agent-listen-port={AGENT_PORT}", f"--autoscaling-config={_config_on_test_ports(tmp_path)}",
                        "--disable-usage-stats"], env=env, check=True, capture_output=True, text=True, timeout=120)
        deadline = time.time() + 180  # the autoscaler starts one node after the other; slow on 2 loaded cores
        while len(workers := _alive_workers(env)) < want:
            if time.time() > deadline:
                status = subprocess.run([RAY_CLI, "status", f"--address=127.0.0.1:{GCS_PORT}"], env=env, capture_output=True,
                                        text=True, timeout=60)
                pytest.fail(f"the autoscaler started {len(workers)} of {want} worker nodes in 180 s:\n{status.stdout}{status.stderr}")
            time.sleep(1)
        assert all(w["resources_total"].get("CPU") == 1 for w in workers), workers
        launched = time.time() - started
        deadline = time.time() + 120  # the head's job agent may answer after the nodes are up: Ray says to retry
        while True:
            result = subprocess.run(
                [RAY_CLI, "job", "submit", "--address", f"http://127.0.0.1:{DASHBOARD_PORT}", "--working-dir", str(REPO), "--",
                 sys.executable, "annotate/run.py", *job_args, "--output", str(out)],
                env=env, capture_output=True, text=True, timeout=400,
            )
            if "No available agent" not in result.stdout + result.stderr or time.time() > deadline:
                break
            time.sleep(2)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert "succeeded" in result.stdout + result.stderr
    finally:
        # `ray stop` ends the head's processes, its autoscaler, and the worker nodes the autoscaler started.
        subprocess.run([RAY_CLI, "stop", "--force"], env=env, capture_output=True, timeout=120)
    print(f"cluster up with {want} worker nodes in {launched:.0f} s; job and teardown {time.time() - started - launched:.0f} s")
    assert validate_directory(out).ok
    assert [(s.path, s.sha256) for s in Manifest.load(out).shards] == [(s.path, s.sha256) for s in Manifest.load(one_node).shards]
    nodes = json.loads((out / SUMMARY_NAME).read_text())["nodes"]
    worker_ids = {w["node_id"] for w in workers}
    assert len(nodes) >= 2 and {n["node_id"] for n in nodes} <= worker_ids  # the head (0 CPUs) hosted none
    for stage in ("tokenize", "tfidf", "base_loss", "write"):
        assert sum(n["stages"].get(stage, {}).get("rows", 0) for n in nodes) == Manifest.load(out).totals["rows"]


def test_ray_up_cannot_drive_the_local_config(tmp_path):
    """Why the config's header says `ray start --autoscaling-config`, not `ray up`: Ray 2.60's wheel lacks the
    fake_multinode provider's defaults file, which `ray up` (and `ray submit`, `ray down`) load first."""
    result = subprocess.run([RAY_CLI, "up", "-y", "--no-config-cache", str(_config_on_test_ports(tmp_path))],
                            env=_env(RAY_FAKE_CLUSTER="1"), capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "fake_multi_node/example.yaml" in result.stderr + result.stdout, result.stderr[-3000:]
