"""docker/ray-cluster.yaml is a valid Ray cluster-launcher config (checked against Ray's own schema)."""

import json
import os

import jsonschema
import ray
import yaml

from tests.conftest import REPO


def test_ray_cluster_yaml_matches_rays_schema():
    schema_path = os.path.join(os.path.dirname(ray.__file__), "autoscaler", "ray-schema.json")
    with open(schema_path) as f:
        schema = json.load(f)
    config = yaml.safe_load((REPO / "docker" / "ray-cluster.yaml").read_text())
    jsonschema.validate(config, schema)
    assert config["provider"]["type"] == "local"
    assert any("pip install" in c for c in config["setup_commands"])
    assert config["file_mounts"]["/home/ray/sftgo"] == "."
