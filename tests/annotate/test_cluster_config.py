"""docker/ray-cluster.yaml (real machines, `ray up`) and docker/ray-cluster-local.yaml (nodes on this machine,
`ray start --autoscaling-config`) are valid Ray cluster configs, checked against Ray's own schema and by the
autoscaler's own config check. tests/annotate/test_cluster_launch.py launches the second one."""

import json
import os
import re

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import validate_config

from tests.conftest import REPO


def _schema() -> dict:
    with open(os.path.join(os.path.dirname(ray.__file__), "autoscaler", "ray-schema.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("name", ["ray-cluster.yaml", "ray-cluster-local.yaml"])
def test_cluster_yaml_matches_rays_schema(name):
    config = yaml.safe_load((REPO / "docker" / name).read_text())
    jsonschema.validate(config, _schema())


def test_ray_cluster_yaml_is_the_on_premise_launcher_config():
    config = yaml.safe_load((REPO / "docker" / "ray-cluster.yaml").read_text())
    assert config["provider"]["type"] == "local"
    assert any("pip install" in c for c in config["setup_commands"])
    assert config["file_mounts"]["/home/ray/sftgo"] == "."


def test_ray_cluster_local_yaml_is_what_the_autoscaler_and_its_commands_need():
    text = (REPO / "docker" / "ray-cluster-local.yaml").read_text()
    config = yaml.safe_load(text)
    # The autoscaler takes the file as it is (no defaults filled in for this provider), and checks it so.
    validate_config(config)
    assert config["provider"]["type"] == "fake_multinode"
    head = config["available_node_types"][config["head_node_type"]]
    workers = {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}
    assert head["resources"]["CPU"] <= 1 and head["max_workers"] == 0
    assert sum(t["min_workers"] for t in workers.values()) >= 2  # launched at start, before any job asks
    assert all(t["resources"]["CPU"] == 1 and t["min_workers"] <= t["max_workers"] for t in workers.values())
    assert sum(t["max_workers"] for t in workers.values()) <= config["max_workers"]
    # The header's commands agree with the config: the head's CPUs, and the port the workers connect to.
    start = re.search(r"^#\s+RAY_FAKE_CLUSTER=1 ray start --head (.*\n#.*)$", text, re.M).group(1)
    assert f"--num-cpus {head['resources']['CPU']} " in start
    port = config["provider"].get("gcs_address", ":6379").rsplit(":", 1)[1]  # the provider's default: port 6379
    assert f"--port {port} " in start
    assert "--autoscaling-config \"$PWD/docker/ray-cluster-local.yaml\"" in start
