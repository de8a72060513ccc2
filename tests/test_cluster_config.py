"""cluster.yaml: valid for Ray's cluster launcher, and shaped the way the worker pool expects."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import yaml

from actors.worker import tier_resource
from farm.presets import GIB, GPU_TIERS, tier_for_vram

ROOT = Path(__file__).resolve().parent.parent
# GPU memory of the instance types we use, as NVML reports it (bytes / GiB)
INSTANCE_GPU_GIB = {"g6e.xlarge": 44.99, "g5.xlarge": 22.49, "g4dn.xlarge": 14.58}


def config() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_validates_against_rays_autoscaler_schema():
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config(), schema)


def test_one_gpu_node_type_per_tier_with_matching_resources_and_cards():
    cfg = config()
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert "GPU" not in head["resources"] and head["max_workers"] == 0
    tiers = {}
    for name, node in types.items():
        labels = [t for t in GPU_TIERS if tier_resource(t) in node["resources"]]
        if not labels:
            continue
        assert len(labels) == 1, name
        tier = labels[0]
        assert node["resources"][tier_resource(tier)] == node["resources"]["GPU"]  # one tier slot per GPU
        gib = INSTANCE_GPU_GIB[node["node_config"]["InstanceType"]]
        assert tier_for_vram(int(gib * GIB)) == tier, (name, gib)  # the card really is in that tier
        assert node["min_workers"] <= node["max_workers"]
        tiers[tier] = name
    assert set(tiers) == set(GPU_TIERS)


def test_security_and_farm_serve_on_the_head():
    cfg = config()
    head = " ".join(cfg["head_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head and "--dashboard-host=127.0.0.1" in head
    assert "farm serve" in head and "FARM_API_TOKEN" in head
    assert "~/.ray/auth_token" in cfg["file_mounts"]
    assert all("RAY_AUTH_MODE=token" in c for c in cfg["worker_start_ray_commands"] if "ray start" in c)
    assert any("storyfarm" in c for c in cfg["setup_commands"])
