"""Which worker actors the cluster should have: a plain function of the alive nodes and the config."""

from __future__ import annotations

from dataclasses import dataclass

from farm.presets import GPU_TIERS, TIERS


@dataclass(frozen=True)
class PoolConfig:
    tier: str = "auto"  # auto: one worker per GPU (tier read from the card) or per tier-labelled slot
    workers: int | None = None  # forced-tier/CPU mode: how many workers


@dataclass(frozen=True)
class Slot:
    node_id: str | None  # None: anywhere the tier's resource is
    tier: str  # a tier name, or "auto"
    gpu: bool
    index: int

    @property
    def id(self) -> str:
        node = (self.node_id or "any")[:8]
        return f"{self.tier}-{node}-{self.index}"


def desired_slots(nodes: list[dict], config: PoolConfig) -> list[Slot]:
    """nodes: ray.nodes() entries (NodeID, Alive, Resources).

    - A forced tier (a laptop exercising the low tier's presets, `farm render --tier low`) gives
      `workers` workers placed through that tier's resource, wherever it is.
    - Otherwise each alive node gets one worker per tier slot it advertises (cluster.yaml gives a node
      type `farm_tier_mid: 1` per GPU), or one per GPU with the tier read from the card.
    - A cluster with neither gets `workers` (default 1) CPU workers.
    """
    if config.tier != "auto":
        gpu = any(n["Resources"].get("GPU", 0) for n in nodes if n["Alive"])
        return [Slot(None, config.tier, gpu, i) for i in range(config.workers or 1)]
    slots: list[Slot] = []
    for node in nodes:
        if not node["Alive"]:
            continue
        res, nid = node["Resources"], node["NodeID"]
        gpus = int(res.get("GPU", 0))
        labelled = {t: int(res.get(f"farm_tier_{t}", 0)) for t in GPU_TIERS}
        if any(labelled.values()):
            slots += [Slot(nid, t, gpus > 0, i) for t in GPU_TIERS for i in range(labelled[t])]
        elif gpus:
            slots += [Slot(nid, "auto", True, i) for i in range(gpus)]
    if not slots:
        slots = [Slot(None, "cpu", False, i) for i in range(config.workers or 1)]
    return slots


def resources_for_local(config: PoolConfig) -> dict[str, float]:
    """Resources a local Ray should advertise so a forced tier's workers can be placed."""
    if config.tier in TIERS:
        return {f"farm_tier_{config.tier}": float(config.workers or 1)}
    return {}
