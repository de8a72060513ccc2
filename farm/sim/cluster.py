"""Cluster files for `farm plan --simulate`: GPU count per VRAM tier, from a short `tiers:` file or
the Ray cluster launcher config the farm is deployed with (cluster.yaml)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from farm.presets import GPU_TIERS, TIERS


def load_cluster(path: Path | str) -> dict[str, int]:
    """GPU count per tier, from `tiers: {high: 4, mid: 8, low: 4}` or a Ray cluster launcher config.

    In a cluster.yaml, each node type under `available_node_types` advertises its tier through the
    custom resource `farm_tier_<tier>: N` (N GPU workers of that tier per node, what
    actors/worker.py asks for). Nodes per type: `max_workers`, else `min_workers`, else 1; the
    head node type counts one more node (the head itself)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"{path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: invalid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping with `tiers` or `available_node_types`")
    if "tiers" in data:
        counts = _tiers_section(path, data["tiers"])
    elif "available_node_types" in data:
        counts = _ray_node_types(path, data["available_node_types"], data.get("head_node_type"))
    else:
        raise ValueError(f"{path}: expected `tiers: {{high: N, mid: N, low: N}}` or a Ray cluster.yaml "
                         "with `available_node_types`")
    if sum(counts.values()) <= 0:
        raise ValueError(f"{path}: the cluster has no GPU workers")
    return counts


def _count(path: Path, where: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{path}: {where} must be a whole number >= 0, not {value!r}")
    return value


def _tiers_section(path: Path, tiers: Any) -> dict[str, int]:
    if not isinstance(tiers, dict):
        raise ValueError(f"{path}: `tiers` must map tier names to GPU counts")
    counts: dict[str, int] = {}
    for tier, n in tiers.items():
        if tier not in TIERS:
            raise ValueError(f"{path}: tiers.{tier}: unknown tier; expected one of {', '.join(TIERS)}")
        counts[tier] = _count(path, f"tiers.{tier}", n)
    return counts


def _ray_node_types(path: Path, node_types: Any, head: Any) -> dict[str, int]:
    if not isinstance(node_types, dict) or not node_types:
        raise ValueError(f"{path}: `available_node_types` must be a non-empty mapping of node types")
    counts: dict[str, int] = {}
    for name, node in node_types.items():
        where = f"available_node_types.{name}"
        if not isinstance(node, dict):
            raise ValueError(f"{path}: {where} must be a mapping")
        resources = node.get("resources") or {}
        if not isinstance(resources, dict):
            raise ValueError(f"{path}: {where}.resources must be a mapping")
        per_node = {tier: _count(path, f"{where}.resources.farm_tier_{tier}", resources[f"farm_tier_{tier}"])
                    for tier in GPU_TIERS if f"farm_tier_{tier}" in resources}
        gpus = _count(path, f"{where}.resources.GPU", resources.get("GPU", 0))
        if gpus and not per_node:
            raise ValueError(f"{path}: node type {name!r} has {gpus} GPU(s) but no farm_tier_high|mid|low "
                             "resource: say which tier its GPUs are")
        if gpus and sum(per_node.values()) > gpus:
            raise ValueError(f"{path}: node type {name!r} advertises {sum(per_node.values())} farm_tier_* "
                             f"workers but only {gpus} GPU(s)")
        if "max_workers" in node:
            nodes = _count(path, f"{where}.max_workers", node["max_workers"])
        elif "min_workers" in node:
            nodes = _count(path, f"{where}.min_workers", node["min_workers"])
        else:
            nodes = 1
        if name == head and ("max_workers" in node or "min_workers" in node):
            nodes += 1
        for tier, n in per_node.items():
            counts[tier] = counts.get(tier, 0) + n * nodes
    return counts
