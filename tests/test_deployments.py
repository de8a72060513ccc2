"""Deployment files: the Serve config and the KubeRay RayService describe the same, valid app."""

from __future__ import annotations

import importlib
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parent.parent / "deployments"


def test_serve_config_is_valid_for_ray_serve():
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load((DEPLOY / "serve_config.yaml").read_text())
    schema = ServeDeploySchema.parse_obj(config)
    app = schema.applications[0]
    module, attr = app.import_path.split(":")
    builder = getattr(importlib.import_module(module), attr)
    from ray.serve import Application

    assert isinstance(builder(app.args), Application)  # the builder really builds the app from these args


def test_rayservice_serves_the_same_app_with_a_worker_group_per_tier():
    service = yaml.safe_load((DEPLOY / "rayservice.yaml").read_text())
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService"
    serve_v2 = yaml.safe_load(service["spec"]["serveConfigV2"])
    local = yaml.safe_load((DEPLOY / "serve_config.yaml").read_text())
    assert serve_v2["applications"] == local["applications"]
    groups = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    tiers = {g["groupName"]: yaml.safe_load(yaml.safe_load(g["rayStartParams"]["resources"])) for g in groups}
    assert tiers == {"tier-high": {"farm_tier_high": 1}, "tier-mid": {"farm_tier_mid": 1},
                     "tier-low": {"farm_tier_low": 1}}
    for g in groups:
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == 1
