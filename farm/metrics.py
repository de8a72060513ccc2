"""Prometheus text for /metrics, from plain data (the director's snapshot and the ledger).

Names follow the metrics contract in docs/architecture.md (prefix `farm_`). GPU memory and utilization come from
the workers' own NVML readings and are absent, not faked, where a worker has no GPU.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from farm.contract import StageKind

if TYPE_CHECKING:
    from farm.jobbook import JobBook
    from farm.pool import WorkerBook
    from farm.store import Store

STAGE_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
STAGES = tuple(str(kind) for kind in StageKind)  # every kind from the start, at zero


class _Snapshot:
    def __init__(self, snapshot: dict[str, Any], seconds: list[tuple[str, str, float]],
                 workers: list[dict[str, Any]]) -> None:
        self.snapshot, self.seconds, self.workers = snapshot, seconds, workers

    def collect(self):  # noqa: ANN201 - prometheus_client's collector protocol
        snap = self.snapshot
        jobs = GaugeMetricFamily("farm_jobs_total", "Jobs by state", labels=["state"])
        for state, n in snap["jobs"].items():
            jobs.add_metric([state], n)
        yield jobs

        stages = CounterMetricFamily("farm_stages", "Stage attempts by kind and outcome",
                                     labels=["stage", "state"])
        hits = CounterMetricFamily("farm_cache_hits", "Stages served from the cache",
                                   labels=["stage"])
        ooms = CounterMetricFamily("farm_oom_retries", "Stage attempts that ran out of GPU memory", labels=["tier"])
        frames = CounterMetricFamily("farm_frames_generated", "Video frames generated (cache hits excluded)")
        by_stage: dict[tuple[str, str], int] = {}
        by_hit: dict[str, int] = {kind: 0 for kind in STAGES}
        by_oom: dict[str, int] = {}
        generated = 0
        for row in snap["attempts"]:
            by_stage[(row["kind"], row["outcome"])] = by_stage.get((row["kind"], row["outcome"]), 0) + row["n"]
            if row["cache_hit"]:
                by_hit[row["kind"]] = by_hit.get(row["kind"], 0) + row["n"]
            elif row["kind"] == "decode" and row["outcome"] == "succeeded":  # the frames a clip keeps
                generated += row["frames"] or 0
            if row["outcome"] == "oom":
                by_oom[row["tier"] or "unknown"] = by_oom.get(row["tier"] or "unknown", 0) + row["n"]
        for (kind, outcome), n in sorted(by_stage.items()):
            stages.add_metric([kind, outcome], n)
        for kind, n in sorted(by_hit.items()):
            hits.add_metric([kind], n)
        for tier in sorted(set(by_oom) | {w["tier"] for w in snap["workers"]}):
            ooms.add_metric([tier], by_oom.get(tier, 0))
        frames.add_metric([], generated)
        yield from (stages, hits, ooms, frames)

        yield from qc_metrics(snap.get("qc", []))

        from farm.webhook import OUTCOMES

        hooks = CounterMetricFamily("farm_webhook_deliveries", "Job-end webhook deliveries by outcome",
                                    labels=["outcome"])
        for outcome in OUTCOMES:  # every outcome from the start, at zero
            hooks.add_metric([outcome], snap.get("webhooks", {}).get(outcome, 0))
        yield hooks

        evicted = snap.get("cache_evicted", {})
        evictions = CounterMetricFamily("farm_cache_evictions", "Cache files the gc removed to keep under its cap")
        evictions.add_metric([], evicted.get("files", 0))
        freed = CounterMetricFamily("farm_cache_evicted_bytes", "Bytes the cache's gc freed")
        freed.add_metric([], evicted.get("bytes", 0))
        yield from (evictions, freed)

        queue = GaugeMetricFamily("farm_queue_depth", "Stages ready and waiting, by stage kind", labels=["stage"])
        for kind in STAGES:
            queue.add_metric([kind], snap["queue"].get(kind, 0))
        yield queue

        hist = HistogramMetricFamily("farm_stage_seconds", "Stage wall time (executed stages)",
                                     labels=["stage", "tier"])
        groups: dict[tuple[str, str], list[float]] = {}
        for kind, tier, secs in self.seconds:
            groups.setdefault((kind, tier or "unknown"), []).append(secs)
        for (kind, tier), values in sorted(groups.items()):
            buckets = [(str(b), sum(1 for v in values if v <= b)) for b in STAGE_BUCKETS] + [("+Inf", len(values))]
            hist.add_metric([kind, tier], buckets, sum(values))
        yield hist

        workers = GaugeMetricFamily("farm_workers", "Worker actors by tier and state", labels=["tier", "state"])
        counts: dict[tuple[str, str], int] = {}
        for w in snap["workers"]:
            counts[(w["tier"], w["state"])] = counts.get((w["tier"], w["state"]), 0) + 1
        for (tier, state), n in sorted(counts.items()):
            workers.add_metric([tier, state], n)
        workers.add_metric(["any", "quarantined"], len(snap["quarantined"]))
        yield workers

        used = GaugeMetricFamily("farm_gpu_memory_used_bytes", "GPU memory in use (NVML)", labels=["worker"])
        total = GaugeMetricFamily("farm_gpu_memory_total_bytes", "GPU memory (NVML)", labels=["worker"])
        util = GaugeMetricFamily("farm_gpu_utilization_ratio", "GPU utilization 0..1 (NVML)", labels=["worker"])
        for w in self.workers:
            if w.get("vram_total") is not None:
                used.add_metric([w["id"]], w["vram_used"])
                total.add_metric([w["id"]], w["vram_total"])
                util.add_metric([w["id"]], w["utilization"] or 0.0)
        yield from (used, total, util)


def qc_metrics(takes: list[dict[str, Any]]) -> list[Any]:
    """farm_qc_*: each gate checked on each take, by metric and outcome (passed, failed), and the
    retakes (a take followed by another of the same shot; cache hits of a re-render count once)."""
    seen = {(t["job"], t["shot"], t["take"]): t for t in takes}
    checks = CounterMetricFamily("farm_qc_checks", "Quality gates checked on shot takes, by metric and outcome",
                                 labels=["metric", "outcome"])
    retakes = CounterMetricFamily("farm_qc_retakes", "Shot takes rendered again after failing quality control")
    from farm.qc import METRICS

    # Every metric and outcome from the start, at zero: a panel shows 0, not "no data", before any take.
    counts: dict[tuple[str, str], int] = {(name, o): 0 for name in METRICS for o in ("passed", "failed")}
    for t in seen.values():
        for name in t.get("gated", []):
            outcome = "failed" if name in t["failed"] else "passed"
            counts[(name, outcome)] = counts.get((name, outcome), 0) + 1
    for (name, outcome), n in sorted(counts.items()):
        checks.add_metric([name, outcome], n)
    retakes.add_metric([], sum(1 for job, shot, take in seen if take > 1))
    return [checks, retakes]


def snapshot(books: list[JobBook], pool: WorkerBook, store: Store, now: float) -> dict[str, Any]:
    """The director's state as plain data: jobs by state, attempts, ready stages by kind, workers."""
    queue: dict[str, int] = {}
    for book in books:
        for stage in book.ready(now):
            queue[stage.kind] = queue.get(stage.kind, 0) + 1
    workers = [{"id": w.id, "tier": w.tier, "state": "busy" if w.busy else "idle"} for w in pool.workers.values()]
    return {"jobs": store.job_counts(), "attempts": store.attempt_summary(), "queue": queue, "workers": workers,
            "quarantined": pool.quarantined(now), "qc": store.qc_takes()}


def render(snapshot: dict[str, Any], seconds: list[tuple[str, str, float]], workers: list[dict[str, Any]]) -> bytes:
    registry = CollectorRegistry()
    registry.register(_Snapshot(snapshot, seconds, workers))
    return generate_latest(registry)
