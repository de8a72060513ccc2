"""Hardening (issue 18): webhooks reach public addresses only, hostile storyboards are 4xx naming
their field, model paths reveal nothing outside the input root, and the API checks Host, Origin and
its token. Pure checks first; then the same through real HTTP on Ray Serve."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import httpx
import pytest
from helpers import Receiver, base_manifest, running_api, tree_sockets

from farm.egress import Refused, address_refusal, url_problem, vet
from farm.manifest import MAX_DEPTH, ManifestError, outside_root, parse_text, validate_data
from farm.tokens import token_problem
from farm.webhook import deliver

TOKEN = "hardening-token-0123456789abcdefghijklmnop"


def resolver(*addresses: str):
    """getaddrinfo's shape, answering these addresses for any name (a DNS server under test's control)."""

    def resolve(host, port, type=0):  # noqa: A002 - getaddrinfo's keyword
        family = socket.AF_INET6 if ":" in addresses[0] else socket.AF_INET
        return [(family, socket.SOCK_STREAM, 6, "", (a, port)) for a in addresses]

    return resolve


# --- webhooks: where the farm may send (farm/egress.py) -----------------------------------------------


@pytest.mark.parametrize("url", ["file:///etc/passwd", "gopher://x:70/_", "ftp://example.com/x", "not a URL",
                                 "javascript:alert(1)", "http://", "http://user:pw@example.com/",
                                 "http://example.com:99999/", "http://exa mple.com/", "http://x/\x00"])
def test_webhook_urls_other_than_http_are_refused_at_validation(url):
    assert url_problem(url) is not None
    with pytest.raises(ManifestError) as err:
        validate_data(base_manifest(webhook=url))
    assert [e.loc for e in err.value.errors] == [("webhook",)]


@pytest.mark.parametrize("address", ["169.254.169.254", "127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1",
                                     "100.64.0.1", "0.0.0.0", "::1", "::ffff:127.0.0.1", "fe80::1", "fd00::1",
                                     "224.0.0.1"])
def test_private_and_reserved_addresses_are_refused(address):
    assert address_refusal(address) is not None
    with pytest.raises(Refused):
        vet("https://hooks.example.com/x", resolve=resolver(address))


def test_a_name_with_one_private_record_is_refused_and_the_allow_list_is_by_name():
    assert address_refusal("93.184.216.34") is None
    assert vet("https://hooks.example.com/x", resolve=resolver("93.184.216.34")).addresses == ("93.184.216.34",)
    # DNS rebinding: a public and a private record at once; every record must be public
    with pytest.raises(Refused):
        vet("https://hooks.example.com/x", resolve=resolver("93.184.216.34", "169.254.169.254"))
    target = vet("http://hooks.internal:8080/x", ["hooks.internal"], resolve=resolver("10.0.0.5"))
    assert target.addresses == ("10.0.0.5",) and target.port == 8080 and target.path == "/x"


def test_deliveries_to_refused_ranges_never_leave_the_farm():
    hook = Receiver()
    try:
        url = f"http://127.0.0.1:{hook.port}/hook"
        assert deliver(url, {"id": "j"}, allow_hosts=[], attempts=1) == "refused"
        assert hook.hits == []
        # the same receiver, named on the allow-list, gets it
        assert deliver(url, {"id": "j"}, allow_hosts=["127.0.0.1"], attempts=1) == "delivered"
        assert hook.hits == ["/hook"]
    finally:
        hook.close()


def test_redirects_are_not_followed():
    inner = Receiver()
    outer = Receiver(status=302, location=f"http://127.0.0.1:{inner.port}/metadata")
    try:
        outcome = deliver(f"http://127.0.0.1:{outer.port}/", {"id": "j"}, allow_hosts=["127.0.0.1"], attempts=1)
        assert outcome == "rejected" and outer.hits == ["/"] and inner.hits == []
    finally:
        inner.close()
        outer.close()


def test_a_dead_receiver_fails_after_bounded_retries():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    started = time.monotonic()
    outcome = deliver(f"http://127.0.0.1:{port}/", {"id": "j"}, allow_hosts=["127.0.0.1"], attempts=2,
                      backoff_s=0.01, timeout_s=1)
    assert outcome == "failed" and time.monotonic() - started < 5


# --- hostile storyboards (farm/manifest.py) -------------------------------------------------------------


@pytest.fixture(params=["libyaml", "python"])
def yaml_loader(request, monkeypatch):
    """parse_text with each YAML loader it may run on (libyaml's events where PyYAML has them)."""
    import yaml

    import farm.manifest as fm

    if request.param == "libyaml":
        if not yaml.__with_libyaml__:
            pytest.fail("PyYAML without libyaml: the API's parse runs 4x slower (pip install pyyaml wheels)")
        assert fm._BoundedLoader is fm._CBoundedLoader  # what the farm uses where libyaml is there
    else:
        monkeypatch.setattr(fm, "_BoundedLoader", fm._PyBoundedLoader)
    return request.param


def test_nesting_and_aliases_are_bounded_before_parsing(yaml_loader):
    for text in ["[" * 10_000 + "]" * 10_000, '{"a":' * 5000 + "1" + "}" * 5000, "a: " + "[" * 10_000,
                 "x:\n" + "".join("  " * i + "- \n" for i in range(1000))]:
        with pytest.raises(ManifestError, match=f"deeper than {MAX_DEPTH}"):
            parse_text(text)
    laughs = "a: &a [" + ",".join(["1"] * 9) + "]\n" + "".join(
        f"{n}: &{n} [" + ",".join([f"*{p}"] * 9) + "]\n" for p, n in zip("abcdefg", "bcdefgh", strict=True))
    with pytest.raises(ManifestError, match="more than"):
        parse_text(laughs)
    assert parse_text("base: &b {prompt: x}\nother: *b") == {"base": {"prompt": "x"}, "other": {"prompt": "x"}}
    with pytest.raises(ManifestError, match=r"invalid YAML at line \d: .*expected"):
        parse_text("title: x\nshots: [1, 2")


def test_both_yaml_loaders_read_every_example_alike():
    import yaml

    import farm.manifest as fm

    repo = Path(__file__).parent.parent
    texts = [p.read_text() for p in [*sorted((repo / "examples").rglob("*.yaml")), repo / "cluster.yaml",
                                     *sorted((repo / "deployments").glob("*.yaml"))]]
    texts.append("a: 1e3\nb: yes\nc: 2026-01-01\nd: 0x10\ne: .inf\nf: ~\ng: !!str 5\nh: 'q'\n")
    assert len(texts) > 5
    for text in texts:
        assert yaml.load(text, Loader=fm._BoundedLoader) == yaml.load(text, Loader=fm._PyBoundedLoader)


def test_a_lone_surrogate_in_yaml_text_is_refused_not_a_server_error():
    with pytest.raises(ManifestError, match="not valid Unicode"):
        parse_text("title: a\ud800b\nshots: []")


def test_paths_outside_the_root_get_one_message_whatever_is_there(tmp_path):
    root = tmp_path / "inputs"
    root.mkdir()
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    (root / "link").symlink_to(tmp_path / "real")
    messages = set()
    for path in [str(tmp_path / "real"), str(tmp_path / "absent"), "../real", "../absent", "a/../../real", "link",
                 "link/absent/deeper", "/etc", "~/x"]:
        assert outside_root(path, root), path
        with pytest.raises(ManifestError) as err:
            validate_data(base_manifest(models={"keyframe": path, "video": "tiny"}), root, confine=True)
        messages |= {e.msg for e in err.value.errors if e.loc == ("models", "keyframe")}
    assert len(messages) == 1 and "exist" not in next(iter(messages))
    assert not outside_root("stabilityai/stable-diffusion-xl-base-1.0", root) and not outside_root("tiny", root)
    (root / "models" / "m").mkdir(parents=True)  # a real folder inside, and the root reached by a symlink
    (tmp_path / "alias").symlink_to(root)
    assert not outside_root("models/m", root) and not outside_root("models/m/absent", tmp_path / "alias")


def test_tokens_off_loopback_need_32_characters():
    assert token_problem("x", "127.0.0.1") is None
    assert "32" in (token_problem("x" * 31, "0.0.0.0") or "")
    assert token_problem("x" * 32, "0.0.0.0") is None
    assert token_problem(None, "127.0.0.1") is not None


def test_host_names_and_the_settings_that_check_them():
    from deployments.app import Settings, host_name

    assert host_name("[::1]:8000") == "::1" and host_name("Example.COM:80") == "example.com"
    local = Settings(token=TOKEN, host="127.0.0.1", root="/tmp")
    assert local.host_allowed("127.0.0.1:8000") and local.host_allowed("localhost") and local.loopback
    assert not local.host_allowed("evil.example.com:8000")
    ingress = Settings(token=TOKEN, host="0.0.0.0", root="/tmp", allowed_hosts=("farm.studio.lan",))
    assert ingress.host_allowed("farm.studio.lan") and not ingress.host_allowed("evil.example.com")
    assert Settings(token=TOKEN, host="0.0.0.0", root="/tmp").host_allowed("anything") and not ingress.loopback


# --- the same through real HTTP ------------------------------------------------------------------------


def hostile_corpus() -> list[tuple[str, object, tuple | None]]:
    """(name, body, the loc an error must name, or None for a body-level refusal): 150+ cases of
    nesting, encodings, sizes, numbers, paths and URLs."""
    cases: list[tuple[str, object, tuple | None]] = []

    def shot(**over):
        return base_manifest(shots=[{"id": "a", "prompt": "misty valley", "duration": 1.0, **over}])

    for depth in (33, 100, 600, 1000, 10_000):
        cases.append((f"json list depth {depth}", ("[" * depth + "]" * depth).encode(), None))
        cases.append((f"json map depth {depth}", ('{"a":' * depth + "1" + "}" * depth).encode(), None))
        cases.append((f"yaml flow depth {depth}", ("title: " + "[" * depth + "]" * depth).encode(), None))
    cases.append(("yaml block depth 400", ("x:\n" + "".join("  " * i + "- \n" for i in range(400))).encode(), None))
    cases.append(("billion laughs", ("a: &a [" + ",".join(["1"] * 9) + "]\n" + "".join(
        f"{n}: &{n} [" + ",".join([f"*{p}"] * 9) + "]\n" for p, n in zip("abcdefg", "bcdefgh", strict=True))
    ).encode(), None))
    for name, raw in [("0xff", b"\xff"), ("bad continuation", b"\xc3\x28"), ("overlong slash", b"\xc0\xaf"),
                      ("utf-16 surrogate", b"\xed\xa0\x80"), ("truncated", b"\xe2\x82"), ("latin-1", b"caf\xe9")]:
        cases.append((f"invalid utf-8 {name}", b"version: 1\ntitle: " + raw + b"\nshots: []\n", None))
    hostile_strings = {"NUL": "a\x00b", "RTL override": "abc\u202edcba", "isolate": "a\u2066b", "escape": "\x1b[2J",
                       "DEL": "a\x7fb", "C1": "a\x85b", "lone surrogate": "\ud800", "5000 chars": "x" * 5000}
    fields = {
        ("title",): lambda v: base_manifest(title=v),
        ("shots", 0, "prompt"): lambda v: shot(prompt=v),
        ("shots", 0, "negative_prompt"): lambda v: shot(negative_prompt=v),
        ("defaults", "negative_prompt"): lambda v: base_manifest(defaults={"negative_prompt": v}),
        ("shots", 0, "id"): lambda v: base_manifest(shots=[{"id": v, "prompt": "p", "duration": 1.0}]),
        ("webhook",): lambda v: base_manifest(webhook="https://example.com/" + v),
        ("shots", 0, "keyframe"): lambda v: shot(keyframe=v),
        ("models", "keyframe"): lambda v: base_manifest(models={"keyframe": v, "video": "tiny"}),
        ("models", "lora"): lambda v: base_manifest(models={"keyframe": "tiny", "video": "tiny", "lora": v}),
        ("output", "bitrate"): lambda v: base_manifest(output={"resolution": "64x64", "bitrate": v}),
        ("shots", 0, "video_preset"): lambda v: shot(video_preset=v),
        ("deadline",): lambda v: base_manifest(deadline=v),
    }
    for loc, build in fields.items():
        for what, value in hostile_strings.items():
            cases.append((f"{'.'.join(map(str, loc))} {what}", build(value), loc))
    numbers = [
        (("shots", 0, "duration"), [1e-320, -1, 0, float("nan"), float("inf"), 1e309, "abc", True, 10_000]),
        (("output", "crossfade_seconds"), [1e-320, -0.5, 99]),
        (("shots", 0, "guidance_scale"), [-1, 1e9, float("nan")]),
        (("seed",), [-1, 2**40, 1.5]),
        (("output", "fps"), [0, 10**6]),
        (("output", "crf"), [99, -1]),
        (("steps", "video"), [0, 10**6]),
        (("shots", 0, "motion_bucket_id"), [0, 256]),
        (("shots", 0, "noise_aug_strength"), [2, -1]),
        (("shots", 0, "seed"), [2**33]),
    ]
    for loc, values in numbers:
        for value in values:
            if loc[0] == "shots":
                data = shot(**{loc[2]: value})
            elif len(loc) == 2:
                data = base_manifest(**{loc[0]: {**base_manifest().get(loc[0], {}), loc[1]: value}})
            else:
                data = base_manifest(**{loc[0]: value})
            cases.append((f"{'.'.join(map(str, loc))} = {value!r}", data, loc))
    for path in ["/etc/passwd", "../../etc/passwd", "~/x.png", "a/../../../etc/passwd", "0" * 1000]:
        cases.append((f"keyframe path {path}", shot(keyframe=path), ("shots", 0, "keyframe")))
    for path in ["/etc", "../..", "/root/.cache/huggingface", "a/../../..", "0" * 1000]:
        cases.append((f"model path {path}", base_manifest(models={"keyframe": path, "video": "tiny"}),
                      ("models", "keyframe")))
    for path in ["/etc/shadow.safetensors", "../x.safetensors"]:
        cases.append((f"lora path {path}", base_manifest(models={"keyframe": "tiny", "video": "tiny", "lora": path}),
                      ("models", "lora")))
    for url in ["file:///etc/passwd", "gopher://127.0.0.1:6379/_INFO", "ftp://example.com/", "not a url",
                "http://", "http://user:pw@example.com/", "javascript:alert(1)", "http://[::1", "http://x:99999/",
                "dict://127.0.0.1:11211/"]:
        cases.append((f"webhook {url}", base_manifest(webhook=url), ("webhook",)))
    cases.append(("field name 100 chars", {**base_manifest(), "k" * 100: 1}, ()))
    cases.append(("field name with NUL", {**base_manifest(), "a\x00": 1}, ()))
    cases.append(("not a mapping", [1, 2, 3], ()))
    return cases


CORPUS = hostile_corpus()


@pytest.fixture(scope="module")
def api(ray_session, tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    with running_api(TOKEN, root, director_name="hardening-test", workers=1, metrics_open=False) as (url, client):
        yield url, client, root


def test_the_corpus_is_big_enough():
    assert len(CORPUS) >= 150


@pytest.mark.parametrize("name,body,loc", CORPUS, ids=[c[0][:60] for c in CORPUS])
def test_hostile_storyboards_are_refused_naming_their_field(api, name, body, loc):
    _, client, _ = api
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = client.post("/v1/jobs", content=content, headers={"Content-Type": "application/json"})
    assert 400 <= response.status_code < 500, (name, response.status_code, response.text[:300])
    if loc is not None:
        assert response.status_code == 422, (name, response.text[:300])
        locs = [tuple(e["loc"]) for e in response.json()]
        assert any(found[:len(loc)] == loc for found in locs), (name, locs)
    assert len(response.content) < 8192  # refusals never echo a megabyte back


def test_the_server_is_healthy_after_the_corpus(api):
    url, client, _ = api
    assert httpx.get(f"{url}/healthz").status_code == 200
    assert client.get("/v1/jobs").status_code == 200


def test_a_chunked_body_is_bounded_while_it_streams(api):
    _, client, _ = api

    def chunks():
        for _ in range(200):
            yield b"#" * 4096  # 800 KiB against a 64 KiB limit, with no Content-Length

    response = client.post("/v1/jobs", content=chunks(), headers={"Content-Type": "application/yaml"})
    assert response.status_code == 413


def test_host_origin_and_bearer_checks(api):
    url, client, _ = api
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert httpx.get(f"{url}/v1/jobs", headers={**auth, "Host": "evil.example.com"}).status_code == 400
    assert httpx.get(f"{url}/v1/jobs", headers={**auth, "Host": "localhost"}).status_code == 200
    # a page on another site posting text/plain with the user's browser: refused before the handler
    foreign = httpx.post(f"{url}/v1/jobs", content=json.dumps(base_manifest()),
                         headers={**auth, "Origin": "http://evil.example.com", "Content-Type": "text/plain"})
    assert foreign.status_code == 403
    same = httpx.post(f"{url}/v1/validate", content=json.dumps(base_manifest()),
                      headers={**auth, "Origin": url, "Content-Type": "application/json"})
    assert same.status_code == 200
    for scheme in ("bearer", "BEARER", "Bearer"):
        assert httpx.get(f"{url}/v1/jobs", headers={"Authorization": f"{scheme} {TOKEN}"}).status_code == 200
    assert httpx.get(f"{url}/v1/jobs", headers={"Authorization": f"Basic {TOKEN}"}).status_code == 401


def test_docs_fetch_nothing_and_metrics_take_the_token(api):
    url, client, _ = api
    assert httpx.get(f"{url}/docs").status_code == 404 and httpx.get(f"{url}/redoc").status_code == 404
    assert httpx.get(f"{url}/openapi.json").status_code == 200
    assert httpx.get(f"{url}/metrics").status_code == 401  # metrics_open=False in this fixture
    assert client.get("/metrics").status_code == 200


def test_refused_webhook_is_counted_and_metrics_leak_nothing(api):
    url, client, root = api
    hook = Receiver()
    try:
        prompt = "secret prompt words 7f3a"
        data = base_manifest(seed=1801, webhook=f"http://127.0.0.1:{hook.port}/hook",
                             shots=[{"id": "a", "prompt": prompt, "duration": 0.5}])
        job = client.post("/v1/jobs", content=json.dumps(data), headers={"Content-Type": "application/json"}).json()
        deadline = time.time() + 180
        while client.get(f"/v1/jobs/{job['id']}").json()["state"] in ("queued", "running"):
            assert time.time() < deadline
            time.sleep(0.3)
        text = ""
        while time.time() < deadline and 'farm_webhook_deliveries_total{outcome="refused"} 1.0' not in text:
            text = client.get("/metrics").text
            time.sleep(0.2)
        assert 'farm_webhook_deliveries_total{outcome="refused"} 1.0' in text
        assert hook.hits == []
        for secret in (prompt, TOKEN, str(root), job["out_dir"]):
            assert secret not in text
    finally:
        hook.close()


def test_model_path_errors_over_http_reveal_nothing(api, tmp_path):
    _, client, _ = api
    real = tmp_path / "real-model"
    real.mkdir()
    (real / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    answers = []
    for path in [str(real), str(tmp_path / "absent")]:
        data = base_manifest(models={"keyframe": path, "video": "tiny"})
        response = client.post("/v1/validate", content=json.dumps(data), headers={"Content-Type": "application/json"})
        answers.append([e for e in response.json()["errors"] if e["loc"] == ["models", "keyframe"]])
    assert answers[0] == answers[1] and answers[0]
    assert str(tmp_path) not in json.dumps(answers)


def test_a_port_is_free_only_when_serve_could_bind_it():
    """farm.driver.port_problem answers as Serve's own bind (no SO_REUSEADDR) would: a listener, and
    connections an earlier server closed (TIME_WAIT), both keep the port, each said as such."""
    from farm.driver import port_problem

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = server.accept()
    assert port_problem("127.0.0.1", port).endswith("Address already in use")
    accepted.close()  # the server closes first: its side of the connection lingers
    time.sleep(0.1)
    client.close()
    server.close()
    assert "still closing" in port_problem("127.0.0.1", port)
    assert port_problem("127.0.0.1", 0) == ""


def test_bind_with_a_short_token_off_loopback_is_refused():
    from deployments.app import Settings
    from farm.config import FarmConfig

    with pytest.raises(ValueError, match="32"):
        Settings.from_config(FarmConfig(api={"token": "short"}), host="0.0.0.0", root="/tmp")
    assert Settings.from_config(FarmConfig(api={"token": "short"}), host="127.0.0.1", root="/tmp").token == "short"



def test_long_prompts_are_warned_at_validation_and_counted_exactly_at_the_worker(tiny_models, tmp_path):
    from farm.gpu.loading import load_pipeline
    from farm.gpu.stages import count_prompt
    from farm.jobsetup import long_prompt_warnings, resolve_models
    from farm.manifest import validate_data
    from farm.observed import Observed
    from farm.plan import build_plan

    long = "a cinematic wide shot of a lone astronaut walking across red dunes, " * 6
    manifest = validate_data(base_manifest(shots=[{"id": "a", "prompt": long, "duration": 1.0},
                                                  {"id": "b", "prompt": "short", "duration": 1.0}]), tmp_path)
    specs = resolve_models(manifest, tmp_path, "tiny")
    warnings = long_prompt_warnings(build_plan(manifest, specs["video"]), specs)
    assert [w.loc for w in warnings] == [("shots", 0, "prompt")] and "first 77" in warnings[0].msg
    pipe = load_pipeline(specs["keyframe"])
    seen = Observed()
    count_prompt(pipe, specs["keyframe"].family, {"prompt": long}, seen)
    assert seen.prompt_tokens is not None and seen.prompt_tokens > 77
    assert seen.as_dict()["prompt_truncated"] is True
    count_prompt(pipe, specs["keyframe"].family, {"prompt": "short"}, seen)
    assert seen.as_dict()["prompt_truncated"] is False


def test_a_local_farm_listens_on_loopback_only(api):
    """The socket census: every socket the session's Ray, its workers and the API listen on (TCP) or
    are bound to (UDP) is on loopback; the only one the test asked for is the API's."""
    import psutil

    url, _, _ = api
    found = [(name, c.laddr.ip, c.laddr.port) for _, name, c in tree_sockets(psutil.Process())
             if c.status == psutil.CONN_LISTEN or (c.type == socket.SOCK_DGRAM and not c.raddr)]
    names = {n for n, _, _ in found}
    assert any("gcs_server" in n for n in names) and any("raylet" in n for n in names), names
    assert ("127.0.0.1", int(url.rsplit(":", 1)[1])) in {(ip, port) for _, ip, port in found}
    off = [f for f in found if f[1] not in ("127.0.0.1", "::1", "::ffff:127.0.0.1")]
    # Ray Serve 2.60 binds each replica's inter-deployment gRPC server to "[::]:0" in its own code
    # (serve/_private/replica.py), with no option: the one listener off loopback, named in
    # docs/security.md. Anything else fails here.
    ray_serve_own = [f for f in off if f[0].startswith("ray::ServeReplica:") and f[1] == "::"]
    assert len(ray_serve_own) <= 1 and [f for f in off if f not in ray_serve_own] == [], found


@pytest.mark.slow
def test_a_local_farm_makes_no_outbound_connection(tmp_path, tiny_models):
    """Every connect() of `farm render` and the whole process tree it starts (Ray's daemons, the
    director, the workers, ffmpeg), traced: only loopback and Unix sockets."""
    import os
    import re
    import shutil
    import subprocess
    import sys

    from helpers import REPO, write_manifest

    assert shutil.which("strace"), "strace is installed by scripts/setup.sh"
    story = write_manifest(tmp_path / "in", base_manifest(shots=[{"id": "a", "prompt": "p", "duration": 0.5}]))
    trace = tmp_path / "connect.txt"
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy") and not k.startswith("RAY_")}
    env["RAY_AUTH_TOKEN_PATH"] = os.environ["RAY_AUTH_TOKEN_PATH"]  # FARM_HOME stays: the tiny models are there
    done = subprocess.run(["strace", "-f", "--seccomp-bpf", "-qq", "-e", "trace=connect", "-o", str(trace),
                           sys.executable, "-m", "farm.cli", "render", str(story), "-o", str(tmp_path / "out"),
                           "--models", "tiny", "--tier", "cpu", "--workers", "1", "-q"],
                          capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "out" / "final.mp4").is_file()
    calls = [line for line in trace.read_text().splitlines() if "connect(" in line]
    inet = [c for c in calls if "AF_INET" in c]
    assert inet  # Ray's own loopback traffic was seen: the trace works
    outside = [c for c in inet if not re.search(r'"(127\.\d+\.\d+\.\d+|::1|::ffff:127\.\d+\.\d+\.\d+)"', c)]
    assert outside == []


@pytest.mark.slow
def test_the_api_and_submit_wait_ride_out_a_director_restart(api, tmp_path):
    """The director killed mid-job (Ray restarts it; it reloads the job from SQLite): the API answers
    503 with Retry-After meanwhile, never another 5xx, and `farm submit --wait` reconnects and ends."""
    import os
    import subprocess
    import sys

    import ray
    import yaml
    from helpers import REPO

    url, client, _ = api
    title = "restart-drill"
    data = base_manifest(seed=1802, title=title, shots=[{"id": f"s{i}", "prompt": "p", "duration": 0.5}
                                                        for i in range(3)])
    story = tmp_path / "story.yaml"
    story.write_text(yaml.safe_dump(data))
    cli = subprocess.Popen([sys.executable, "-m", "farm.cli", "submit", str(story), "--wait", "-q", "--server", url],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                           env={**os.environ, "FARM_API_TOKEN": TOKEN})
    deadline = time.time() + 120
    while not any(j["title"] == title and j["state"] == "running" for j in client.get("/v1/jobs").json()):
        assert time.time() < deadline and cli.poll() is None
        time.sleep(0.2)
    ray.kill(ray.get_actor("hardening-test", namespace="farm"), no_restart=False)
    codes = []
    until = time.time() + 15
    while time.time() < until:
        response = httpx.get(f"{url}/v1/jobs", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
        codes.append((response.status_code, response.headers.get("retry-after")))
        time.sleep(0.05)
    assert {code for code, _ in codes} <= {200, 503}, codes
    assert all(after == "1" for code, after in codes if code == 503)
    out, err = cli.communicate(timeout=300)
    assert cli.returncode == 0, err[-2000:]
    assert json.loads(out)["state"] == "succeeded"


def test_the_openapi_contract_declares_what_the_handlers_do(api):
    """The storyboard is the declared request body (JSON and YAML), the token a bearer security
    scheme, every 422 the bare list the handlers return, and every $ref resolves."""
    url, client, _ = api
    doc = httpx.get(f"{url}/openapi.json").json()
    schemas = doc["components"]["schemas"]
    assert doc["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer",
                                                              "description": "the farm's API token"}
    for path in ("/v1/jobs", "/v1/validate", "/v1/simulate"):
        body = doc["paths"][path]["post"]["requestBody"]["content"]
        assert set(body) == {"application/json", "application/yaml"}
        assert body["application/json"]["schema"] == {"$ref": "#/components/schemas/Manifest"}
    assert "shots" in schemas["Manifest"]["properties"] and "Shot" in schemas
    refs: list[str] = []

    def walk(node):
        if isinstance(node, dict):
            refs.extend(v for k, v in node.items() if k == "$ref")
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(doc)
    assert refs and all(r.split("/")[-1] in schemas for r in refs)
    for path, operations in doc["paths"].items():
        for method, op in operations.items():
            assert all(p["name"].lower() != "authorization" for p in op.get("parameters", [])), (method, path)
            if path.startswith("/v1/"):
                assert op["security"] == [{"bearer": []}] and "401" in op["responses"], (method, path)
            invalid = op["responses"].get("422")
            if invalid:
                assert invalid["content"]["application/json"]["schema"]["type"] == "array", (method, path)
    operations = {op["operationId"]: (method, path) for path, ops in doc["paths"].items() for method, op in ops.items()}
    links = doc["paths"]["/v1/jobs"]["post"]["responses"]["202"]["links"]
    linked = {operations[link["operationId"]] for link in links.values()}
    assert {("get", "/v1/jobs/{job_id}"), ("delete", "/v1/jobs/{job_id}"), ("patch", "/v1/jobs/{job_id}"),
            ("post", "/v1/jobs/{job_id}/requeue"), ("get", "/v1/jobs/{job_id}/events")} <= linked
    assert all(link["parameters"]["job_id"] == "$response.body#/id" for link in links.values())
    shot = "/v1/jobs/{job_id}/shots/{shot_id}"
    assert {("get", f"{shot}/keyframe"), ("get", f"{shot}/clip")} <= linked
    assert doc["paths"]["/metrics"]["get"]["security"] == [{}, {"bearer": []}]  # open on loopback only
    # OPTIONS and 405 name every method of the path, not the first route's
    allow = client.options("/v1/jobs/x")
    assert allow.status_code == 204 and allow.headers["allow"] == "DELETE, GET, OPTIONS, PATCH", allow.headers
    wrong = client.put("/v1/jobs/x")
    assert wrong.status_code == 405 and "DELETE" in wrong.headers["allow"] and "PATCH" in wrong.headers["allow"]
    # and the handler really answers the declared shape
    response = client.post("/v1/jobs", content=json.dumps({"version": 1}), headers={"Content-Type": "application/json"})
    assert response.status_code == 422 and all(set(e) == {"loc", "msg"} for e in response.json())


def test_a_full_disk_fails_the_job_at_once_and_the_farm_keeps_serving(api, ray_session):
    """A stage's write hits ENOSPC (injected at the worker, the error a full cache disk raises): the job
    fails on the first attempt with a message that says so, the worker is not blamed, the next job renders."""
    import yaml

    _, client, _ = api
    director = ray_session.get_actor("hardening-test", namespace="farm")
    deadline = time.time() + 120
    while not (workers := ray_session.get(director.workers_info.remote())) and time.time() < deadline:
        time.sleep(0.5)
    ray_session.get(director.set_faults.remote(workers[0]["id"], [{"match": "*", "kind": "disk_full", "times": 1}]))

    def run(seed: int) -> dict:
        job = client.post("/v1/jobs", content=yaml.safe_dump(base_manifest(seed=seed)),
                          headers={"Content-Type": "application/yaml"}).json()
        until = time.time() + 180
        while (state := client.get(f"/v1/jobs/{job['id']}").json())["state"] in ("queued", "running"):
            assert time.time() < until
            time.sleep(0.2)
        return state

    failed = run(1810)
    assert failed["state"] == "failed" and "No space left on device" in failed["error"], failed
    assert "disk trouble" in failed["error"]
    attempts = ray_session.get(director.attempts.remote(failed["id"]))
    assert [a["outcome"] for a in attempts if a["outcome"] != "succeeded"] == ["failed"]  # no retries
    assert run(1811)["state"] == "succeeded"
    assert all(w["state"] != "quarantined" for w in ray_session.get(director.workers_info.remote()))


@pytest.mark.slow
def test_the_api_replica_killed_comes_back_on_the_same_port(api):
    """A local farm's API replica serves the farm's port itself (farm/rayenv.py): killed, Serve starts
    another that takes the same port back (no quarantine), and the CLI's client rides out the gap: up
    to a minute with clients connected (this module's), while the kernel lets go of the dead replica's
    connections (Serve binds without SO_REUSEADDR; docs/cluster.md)."""
    import psutil

    from farm.client import Client

    url, _, _ = api
    port = int(url.rsplit(":", 1)[1])

    def serving() -> list[psutil.Process]:
        return list({p.pid: p for p, name, c in tree_sockets(psutil.Process(), "tcp")
                     if name.startswith("ray::ServeReplica") and c.status == psutil.CONN_LISTEN
                     and c.laddr.port == port}.values())

    first = serving()
    assert len(first) == 1
    first[0].kill()
    first[0].wait(30)
    started = time.monotonic()
    client = Client(url, TOKEN)
    assert isinstance(client.jobs(), list)  # refused connections retried until it is back
    client.http.close()
    back = serving()
    assert len(back) == 1 and back[0].pid != first[0].pid and time.monotonic() - started < 100
