"""Dashboards: well-formed, and every panel's query returns data from a real Prometheus scraping a farm."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml
from helpers import base_manifest

from farm.driver import free_port

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS = sorted((ROOT / "dashboards").glob("*.json"))
CONTRACT = {"farm_jobs_total", "farm_stages_total", "farm_queue_depth", "farm_stage_seconds", "farm_workers",
            "farm_gpu_memory_used_bytes", "farm_gpu_memory_total_bytes", "farm_gpu_utilization_ratio",
            "farm_oom_retries_total", "farm_cache_hits_total", "farm_frames_generated_total",
            "farm_qc_checks_total", "farm_qc_retakes_total"}
GPU_ONLY = {"farm_gpu_memory_used_bytes", "farm_gpu_memory_total_bytes", "farm_gpu_utilization_ratio"}


def targets():
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel["targets"]:
                yield path.name, panel, target


def metric_names(expr: str) -> set[str]:
    names = set(re.findall(r"\bfarm_[a-z_]+", expr))
    return {re.sub(r"_(bucket|sum|count)$", "", n) for n in names}


def test_dashboards_are_well_formed():
    assert {p.name for p in DASHBOARDS} == {"farm-overview.json", "gpu-workers.json"}
    boards = [json.loads(p.read_text()) for p in DASHBOARDS]
    assert len({b["uid"] for b in boards}) == len(boards)
    datasource = yaml.safe_load((ROOT / "dashboards/provisioning/datasources/prometheus.yaml").read_text())
    uid = datasource["datasources"][0]["uid"]
    for board in boards:
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids)), board["uid"]
    for name, panel, target in targets():
        assert panel["datasource"]["uid"] == uid and target["datasource"]["uid"] == uid, (name, panel["title"])
        used = metric_names(target["expr"])
        assert used and used <= CONTRACT, (name, panel["title"], used - CONTRACT)
    used = set().union(*(metric_names(t["expr"]) for _, _, t in targets()))
    assert used == CONTRACT  # every contract metric is on a board


def test_prometheus_config_is_valid(tmp_path):
    promtool = shutil.which("promtool")
    assert promtool, "promtool comes with Debian's prometheus package (scripts/setup.sh installs it)"
    config = yaml.safe_load((ROOT / "dashboards/prometheus.yml").read_text())
    assert {j["job_name"] for j in config["scrape_configs"]} == {"farm", "ray"}
    result = subprocess.run([promtool, "check", "config", "--syntax-only", str(ROOT / "dashboards/prometheus.yml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_every_panel_returns_data_from_real_prometheus(ray_session, tiny_models, tmp_path):
    from ray import serve

    from deployments.app import FarmAPI, Settings

    prometheus = shutil.which("prometheus")
    assert prometheus, "Debian's prometheus package is needed (scripts/setup.sh installs it)"
    api_port, prom_port = free_port("127.0.0.1"), free_port("127.0.0.1")
    serve.start(http_options={"host": "127.0.0.1", "port": api_port})
    serve.run(FarmAPI.bind(Settings(token="t", root=str(tmp_path), director_name="prom-test", tier="cpu",
                                    workers=1, models="tiny")), name="farm", route_prefix="/")
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "farm", "metrics_path": "/metrics",
                            "static_configs": [{"targets": [f"127.0.0.1:{api_port}"]}]}]}))
    proc = subprocess.Popen([prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{prom_port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    prom = f"http://127.0.0.1:{prom_port}"
    try:
        api = httpx.Client(base_url=f"http://127.0.0.1:{api_port}", headers={"Authorization": "Bearer t"},
                           timeout=60)
        deadline = time.time() + 60
        while True:  # Prometheus up and scraping the farm
            try:
                up = httpx.get(f"{prom}/api/v1/query", params={"query": "up{job='farm'}"}).json()
                if up["data"]["result"] and up["data"]["result"][0]["value"][1] == "1":
                    break
            except (httpx.HTTPError, ValueError):  # not listening yet, or still starting (not JSON yet)
                pass
            assert time.time() < deadline, "prometheus did not start scraping"
            time.sleep(0.5)
        data = base_manifest(seed=301)
        data["shots"].append({"id": "c", "prompt": "again", "duration": 0.5})
        # the same storyboard twice: the second comes from the cache, so the hit ratio has data
        for _ in range(2):
            job = api.post("/v1/jobs", content=yaml.safe_dump(data), headers={"Content-Type": "application/yaml"})
            assert job.status_code == 202, job.text
            deadline = time.time() + 180
            while (state := api.get(f"/v1/jobs/{job.json()['id']}").json())["state"] in ("queued", "running"):
                assert time.time() < deadline, state
                time.sleep(0.5)
            assert state["state"] == "succeeded", state
        time.sleep(4)  # a few more scrapes after the end
        for name, panel, target in targets():
            result = httpx.get(f"{prom}/api/v1/query", params={"query": target["expr"]}).json()
            assert result["status"] == "success", (name, panel["title"], result)
            series = result["data"]["result"]
            if metric_names(target["expr"]) & GPU_ONLY:
                assert series == [], "no GPU here: GPU metrics must be absent, not faked"
            else:
                # at least one finite value; a rate-based quantile of a series that did not move inside the
                # window is NaN (0/0), which is Prometheus' normal answer, not missing data
                values = [s["value"][1] for s in series]
                assert any(v not in ("NaN", "+Inf", "-Inf") for v in values), (name, panel["title"], values)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        serve.shutdown()
