"""One farm config for every entry point: defaults < file < environment, errors that name the key."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from farm.config import ConfigError, FarmConfig, describe, load_config


def write(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_without_a_file(tmp_path):
    config, sources = load_config(env={"FARM_HOME": str(tmp_path)})
    assert config == FarmConfig() and sources == {}
    assert config.policy.max_attempts == 3 and config.compile == "auto"


def test_file_then_environment_with_the_source_of_each_value(tmp_path):
    path = write(tmp_path / "farm.yaml", {"cache_dir": "/shared/cache", "compile": "off",
                                           "policy": {"max_attempts": 5}, "prices": {"high": 2.5},
                                           "webhook": {"allow_hosts": ["hooks.internal"]}})
    env = {"FARM_CONFIG": str(path), "FARM_COMPILE": "on", "FARM_API_TOKEN": "t" * 40,
           "FARM_ALLOW_DOWNLOAD": "1"}
    config, sources = load_config(env=env)
    assert config.cache_dir == "/shared/cache" and sources["cache_dir"] == str(path)
    assert config.compile == "on" and sources["compile"] == "FARM_COMPILE"  # the variable wins
    assert config.policy.max_attempts == 5 and sources["policy.max_attempts"] == str(path)
    assert config.api.token == "t" * 40 and config.models.allow_download is True
    assert config.prices == {"high": 2.5} and config.webhook.allow_hosts == ["hooks.internal"]
    shown = {key: (value, source) for key, value, source in describe(config, sources)}
    assert shown["api.token"][0].startswith("***") and "t" * 40 not in json.dumps(shown)  # secrets masked
    assert shown["policy.backoff_s"] == (1.0, "default")


def test_explicit_path_wins_over_the_variable(tmp_path):
    a = write(tmp_path / "a.yaml", {"compile": "off"})
    b = write(tmp_path / "b.yaml", {"compile": "on"})
    assert load_config(a, env={"FARM_CONFIG": str(b)})[0].compile == "off"


@pytest.mark.parametrize("data, env, needle", [
    ({"compile": "maybe"}, {}, "compile"),
    ({"policy": {"max_atempts": 4}}, {}, "policy.max_atempts: unknown key"),
    ({"api": {"max_body_bytes": 1}}, {}, "api.max_body_bytes"),
    ({}, {"FARM_COMPILE": "sometimes"}, "from FARM_COMPILE"),
    ({}, {"FARM_MAX_BODY_BYTES": "lots"}, "api.max_body_bytes"),
])
def test_errors_name_the_key_and_where_it_came_from(tmp_path, data, env, needle):
    path = write(tmp_path / "bad.yaml", data)
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(path, env=env)


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml", env={})
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml", env={})


def test_default_file_in_the_state_dir_is_read(tmp_path, monkeypatch):
    monkeypatch.setenv("FARM_HOME", str(tmp_path))
    write(tmp_path / "config.yaml", {"server": "http://farm.internal:8000"})
    config, sources = load_config(env={"FARM_HOME": str(tmp_path)})
    assert config.server == "http://farm.internal:8000" and sources["server"] == str(tmp_path / "config.yaml")


def test_farm_config_show_and_a_bad_config_refused_by_every_command(tmp_path):
    path = write(tmp_path / "farm.yaml", {"prices": {"mid": 1.2}})
    env = {**os.environ, "FARM_HOME": str(tmp_path), "FARM_CACHE_DIR": str(tmp_path / "c")}
    out = subprocess.run([sys.executable, "-m", "farm.cli", "--config", str(path), "config", "show", "--json"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    rows = {r["key"]: r for r in json.loads(out.stdout)}
    assert rows["prices"]["value"] == {"mid": 1.2} and rows["prices"]["source"] == str(path)
    assert rows["cache_dir"]["source"] == "FARM_CACHE_DIR" and rows["home"]["value"] == str(tmp_path)
    bad = write(tmp_path / "bad.yaml", {"compil": "on"})
    out = subprocess.run([sys.executable, "-m", "farm.cli", "--config", str(bad), "presets"], capture_output=True,
                         text=True, env=env, timeout=60)
    assert out.returncode == 2 and "compil: unknown key" in out.stderr
