"""The `farm` command line. Each subcommand parses arguments and calls one function in farm/."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from farm.manifest import ManifestError

EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2


def cmd_validate(args: argparse.Namespace) -> int:
    from farm.jobsetup import model_errors, setup_job
    from farm.manifest import load

    try:
        manifest = load(args.file)
        errors = model_errors(manifest, Path(args.file).parent, args.models)
        if errors:
            raise ManifestError(errors)
        warnings = setup_job(manifest, Path(args.file).parent, {"models": args.models}).warnings
    except ManifestError as exc:
        for error in exc.errors:
            print(error, file=sys.stdout)
        return EXIT_INVALID
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stdout)
    print(f"ok: {args.file} ({len(manifest.shots)} shots" + (f", {len(warnings)} warnings)" if warnings else ")"))
    return EXIT_OK


def cmd_schema(args: argparse.Namespace) -> int:
    from farm.manifest import json_schema

    print(json.dumps(json_schema(), indent=2))
    return EXIT_OK


def cmd_presets(args: argparse.Namespace) -> int:
    from farm.families import FAMILIES
    from farm.presets import tables

    data = tables() | {"families": {name: fam.tables() for name, fam in FAMILIES.items()}}
    if args.json:
        print(json.dumps(data, indent=2))
        return EXIT_OK
    for name, table in data.items():
        if name == "families":
            continue
        print(f"\n== {name}")
        if name == "precedence":  # first wins: one line per rung, so the order reads at a glance
            for param, rungs in table.items():
                print(f"{param}:\n" + "".join(f"  {i}. {rung}\n" for i, rung in enumerate(rungs, 1)), end="")
            continue
        _print_mapping(table)
    for name, fam in data["families"].items():
        print(f"\n== family {name}: {fam['title']}")
        _print_mapping({k: v for k, v in fam.items() if k not in ("title", "variants")})
        print_table([{"variant": v, **{c: _fmt(x) for c, x in info.items() if c not in ("hub", "download")}}
                     for v, info in fam["variants"].items()])
    return EXIT_OK


def _print_mapping(table: Any) -> None:
    if isinstance(table, dict) and table and all(isinstance(v, dict) for v in table.values()):
        print_table([{"": k, **{c: _fmt(x) for c, x in v.items()}} for k, v in table.items()])
    elif isinstance(table, dict):
        print_table([{"": k, "value": _fmt(v)} for k, v in table.items()])


def cmd_families(args: argparse.Namespace) -> int:
    """Every model family and variant: its role, licence, frames, whether its weights are here, and
    what a real render needs fetched."""
    from farm.families import FAMILIES
    from farm.models import in_hf_cache

    rows = []
    for fam in FAMILIES.values():
        for v in fam.variants.values():
            here = in_hf_cache(v.repo, "model_index.json") is not None
            rows.append({"family": fam.name, "variant": v.name, "role": fam.role, "title": v.title,
                         "commercial": "yes" if v.commercial else "check", "licence": v.licence,
                         "frames": f"{v.frames_per_call}@{v.fps or 'film'}fps" if fam.role == "video" else "",
                         "size": f"{v.size[0]}x{v.size[1]}/{v.multiple}", "installed": "yes" if here else "no",
                         "tiny": f"tiny:{fam.name}:{v.name}", "repo": v.repo, "download": v.download})
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    print_table([{k: r[k] for k in ("family", "variant", "role", "commercial", "frames", "size", "installed", "repo")}
                 for r in rows])
    print("\nlicences:")
    for r in rows:
        print(f"  {r['family']}/{r['variant']}: {r['licence']}")
    print("\nto render for real, fetch the weights once (nothing downloads at render time):")
    for r in rows:
        if r["installed"] == "no":
            print(f"  {r['download']}")
    return EXIT_OK


def cmd_calibrate(args: argparse.Namespace) -> int:
    from farm.calibration import fit, read_render, write_costs

    try:
        renders = [read_render(Path(r)) for r in args.renders]
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    costs, measured = fit(renders)
    write_costs(Path(args.output), costs, measured, [str(Path(r).resolve()) for r in args.renders])
    rows = [{"tier": tier, "keyframe s/step": f"{c.keyframe_step_s:.4g}", "video s/frame-step":
             f"{c.video_frame_step_s:.4g}", "decode s/frame": f"{c.decode_frame_s:.4g}", "load s": f"{c.load_s:.3g}",
             "from": ", ".join(measured.get(tier, [])) or "ASSUMED"} for tier, c in costs.items()]
    print_table(rows)
    print(f"wrote {args.output}; set `costs: {args.output}` in the farm config (or FARM_COSTS) to plan with it")
    return EXIT_OK


def cmd_convert_weights(args: argparse.Namespace) -> int:
    """Pickled official weights (an IP-Adapter's or InstantID's .bin) to safetensors, once: the render
    path itself never loads a pickle."""
    from farm.gpu.identity import convert_pickle
    from farm.models import ModelError

    source = Path(args.source)
    dest = Path(args.output) if args.output else source.with_suffix(".safetensors")
    if dest.exists() and not args.force:
        print(f"error: {dest} exists (--force replaces it)", file=sys.stderr)
        return EXIT_INVALID
    try:
        keys = convert_pickle(source, dest)
    except (OSError, ModelError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    print(f"wrote {dest}: {len(keys)} tensors, read with torch.load(weights_only=True)")
    return EXIT_OK


def cmd_plan(args: argparse.Namespace) -> int:
    from farm.jobsetup import setup_job
    from farm.manifest import load

    try:
        manifest = load(args.file)
        setup = setup_job(manifest, Path(args.file).parent, {"models": args.models})
    except ManifestError as exc:
        for error in exc.errors:
            print(error)
        return EXIT_INVALID
    specs, plan = setup.specs, setup.plan
    if args.simulate:
        from farm.calibration import load_costs
        from farm.config import current
        from farm.sim.engine import Faults
        from farm.sim.report import deadline_answer, simulate_file
        from farm.sim.sizing import parse_duration

        config = current()
        try:
            faults = Faults(error_rate=args.fail_rate, oom_rate=args.oom_rate, seed=args.seed)
            source = args.costs or config.costs
            costs = load_costs(source) if source else None
            label = f"calibrated, {source}" if source else "ASSUMED figures (farm/sim/costs.py): calibrate them"
            print(simulate_file(args.file, args.simulate, models=args.models, faults=faults, costs=costs,
                                costs_label=label))
            deadline = parse_duration(args.deadline) if args.deadline else manifest.deadline_s
            if deadline is not None:
                print(deadline_answer(setup, args.simulate, deadline, costs=costs, prices=config.prices))
        except (ValueError, OSError, RuntimeError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_INVALID
        return EXIT_OK
    rows = [{"stage": s.id, "kind": s.kind, "shot": s.shot or "", "frames": s.segment.frames if s.segment else "",
             "deps": ",".join(s.deps)} for s in plan.stages.values()]
    print_table(rows)
    print(f"\n{len(plan.shots)} shots, {len(plan.stages)} stages, {sum(sp.frames for sp in plan.shots)} frames "
          f"at {plan.fps} fps, {specs['video'].frames_per_call} frames per video call")
    for ref in setup.characters.values():
        shots = [sp.shot.id for sp in plan.shots
                 if ref.name in sp.shot.characters and sp.first_frame_from == "keyframe"]
        print(f"character {ref.name}: {len(ref.images)} reference image{'s' if len(ref.images) > 1 else ''}, "
              f"{ref.method} at strength {ref.strength}, encoded once (identity:{ref.name}) for "
              f"shot{'s' if len(shots) > 1 else ''} {', '.join(shots)}")
    return EXIT_OK


def _until_ctrl_c() -> None:
    from farm.driver import until_ctrl_c

    print("rendered; the pages stay up until Ctrl-C", flush=True)
    until_ctrl_c()


def cmd_render(args: argparse.Namespace) -> int:
    from farm.driver import RenderError, render
    from farm.models import ModelError

    try:
        result = render(args.file, args.output, models=args.models, workers=args.workers, tier=args.tier,
                        progress=not args.quiet, draft=args.preview, cache=not args.no_cache,
                        priority=args.priority, ui_port=args.port if args.ui else None,
                        until_closed=_until_ctrl_c if args.ui else None)
    except ManifestError as exc:
        for error in exc.errors:
            print(error, file=sys.stderr)
        return EXIT_INVALID
    except (ModelError, RenderError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    for shot in result.lock["shots"]:
        for warning in shot["warnings"]:
            print(f"warning: {warning}", file=sys.stderr)
    print(f"wrote {result.layout.final} ({len(result.lock['shots'])} shots) in {result.seconds:.1f} s")
    if result.lock["tiny_models"]:
        print("note: tiny random-weight models were used; the film is noise by design")
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    import ray
    from ray import serve

    from farm.config import current
    from farm.driver import port_problem, serve_api, until_ctrl_c
    from farm.egress import is_loopback
    from farm.rayenv import local_ray_options, prepare_local_ray

    if not ray.is_initialized():
        # RAY_ADDRESS set: join that cluster; otherwise a local one, whose API replica serves a loopback
        # port itself (farm/rayenv.py, direct ingress).
        joining = os.environ.get("RAY_ADDRESS")
        if not joining and (problem := port_problem(args.host, args.port)):  # before Ray starts
            print(f"error: {problem}", file=sys.stderr)
            return EXIT_INVALID
        prepare_local_ray(args.port if not joining and is_loopback(args.host) else None)
        ray.init(address=joining or "local", log_to_driver=False,
                 **({"include_dashboard": False} if joining else local_ray_options()))
    try:
        where = serve_api(current(), args.host, args.port, models=args.models, tier=args.tier, workers=args.workers)
    except ValueError as exc:  # a weak token off loopback, a port in use
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    print(f"farm API on http://{args.host}:{args.port} (OpenAPI at /openapi.json), web pages at "
          f"http://{args.host}:{args.port}/ui; Ctrl-C stops it", flush=True)
    print(f"API token: {where if where else 'from FARM_API_TOKEN / api.token'} (the CLI reads it there)", flush=True)
    until_ctrl_c()
    serve.shutdown()
    return EXIT_OK


def _client(args: argparse.Namespace) -> Any:
    from farm.client import Client
    from farm.config import current
    from farm.tokens import stored_token

    return Client(args.server or current().server, args.token or current().api.token or stored_token())


def _client_call(fn: Any) -> int:
    from farm.client import ApiError

    try:
        out = fn()
    except ApiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID if exc.status == 422 else EXIT_FAILED
    except OSError as exc:
        print(f"error: cannot reach the farm: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if out is not None:
        print(json.dumps(out, indent=2))
    return EXIT_OK


def cmd_submit(args: argparse.Namespace) -> int:
    client = _client(args)
    text = Path(args.file).read_text()

    def run() -> Any:
        job = client.submit(text, priority=args.priority, idempotency_key=args.idempotency_key)
        if not args.wait:
            return job
        from farm.progress import ProgressBars

        bars = ProgressBars(not args.quiet)
        for event in client.events(job["id"]):
            bars(event)
        bars.close()
        return client.status(job["id"])

    return _client_call(run)


def cmd_status(args: argparse.Namespace) -> int:
    client = _client(args)
    return _client_call(lambda: client.status(args.job) if args.job else client.jobs())


def cmd_cancel(args: argparse.Namespace) -> int:
    client = _client(args)
    return _client_call(lambda: client.cancel(args.job))


def cmd_requeue(args: argparse.Namespace) -> int:
    client = _client(args)
    return _client_call(lambda: client.requeue(args.job))


def cmd_priority(args: argparse.Namespace) -> int:
    client = _client(args)
    return _client_call(lambda: client.set_priority(args.job, args.priority))


def cmd_fetch(args: argparse.Namespace) -> int:
    client = _client(args)
    return _client_call(lambda: {"wrote": str(client.fetch(args.job, Path(args.output)))})


def cmd_workers(args: argparse.Namespace) -> int:
    client = _client(args)
    return _client_call(client.workers)


def cmd_config_show(args: argparse.Namespace) -> int:
    from farm.config import describe, load_config

    config, sources = load_config(args.config)
    if args.json:
        print(json.dumps([{"key": k, "value": v, "source": src} for k, v, src in describe(config, sources)], indent=2))
    else:
        print_table([{"key": k, "value": _fmt(v), "source": src} for k, v, src in describe(config, sources)])
    return EXIT_OK


def _gb(n: int) -> str:
    return f"{n / 1e9:.3f} GB"


def cmd_cache_du(args: argparse.Namespace) -> int:
    from farm.cache import ArtifactCache
    from farm.config import current
    from farm.store import Store

    config = current()
    cache = ArtifactCache(config.cache_path)
    usage = cache.usage(Store(config.store_path).pinned_keys())
    report = {"dir": str(cache.root), "files": usage.files, "bytes": usage.bytes, "by_kind": dict(usage.by_kind),
              "pinned_bytes": usage.pinned_bytes, "cap_bytes": config.cache_cap_bytes,
              "stale_temp_files": usage.stale_temp}
    if args.json:
        print(json.dumps(report, indent=2))
        return EXIT_OK
    cap = "none" if config.cache_cap_bytes is None else _gb(config.cache_cap_bytes)
    print(f"{cache.root}: {usage.files} files, {_gb(usage.bytes)} (cap {cap}); "
          f"{_gb(usage.pinned_bytes)} needed by queued and running jobs")
    print_table([{"kind": kind, "size": _gb(n)} for kind, n in sorted(usage.by_kind.items())])
    return EXIT_OK


def cmd_cache_gc(args: argparse.Namespace) -> int:
    from farm.cache import ArtifactCache
    from farm.config import current
    from farm.store import Store

    config = current()
    if args.cap_gb is not None and args.cap_gb < 0:
        print("error: --cap-gb: must be 0 or more", file=sys.stderr)
        return EXIT_INVALID
    cap = int(args.cap_gb * 1e9) if args.cap_gb is not None else config.cache_cap_bytes
    if cap is None:
        print("error: no cap: set cache_cap_gb in the farm config or pass --cap-gb", file=sys.stderr)
        return EXIT_INVALID
    cache = ArtifactCache(config.cache_path)
    report = cache.gc(cap, Store(config.store_path).pinned_keys(), grace_s=args.grace_s, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    print(f"{verb} {report.removed} files ({_gb(report.freed)}); {_gb(report.left)} left, cap {_gb(cap)}")
    if report.over_cap:
        print("still over the cap: the rest is needed by queued or running jobs, or was used in the last "
              f"{args.grace_s:g} s", file=sys.stderr)
    return EXIT_OK


def _fmt(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "-".join(str(v) for v in value)
    return str(value)


def print_table(rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    cols = list(dict.fromkeys(c for row in rows for c in row))
    width = {c: max(len(str(c)), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
    print("  ".join(str(c).ljust(width[c]) for c in cols).rstrip())
    for row in rows:
        print("  ".join(str(row.get(c, "")).ljust(width[c]) for c in cols).rstrip())


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="farm", description="A Ray render farm for AI video.")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="farm config file (default $FARM_CONFIG, else <state dir>/config.yaml if it exists)")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("validate", help="check a storyboard manifest; exit 2 with one line per error")
    s.add_argument("file")
    s.add_argument("--models", choices=["tiny"], default=None,
                   help="validate for a tiny render: the models need not be downloaded")
    s.set_defaults(func=cmd_validate)

    s = sub.add_parser("schema", help="print the manifest's JSON Schema (for editor autocompletion)")
    s.set_defaults(func=cmd_schema)

    s = sub.add_parser("presets", help="print the preset tables (tiers, quality, scenes, motion, I2VGen-XL)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_presets)

    s = sub.add_parser("families", help="the model families: role, licence, frames, installed, what to download")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_families)

    s = sub.add_parser("plan", help="print the stage table of a storyboard")
    s.add_argument("file")
    s.add_argument("--models", choices=["tiny"], default=None)
    s.add_argument("--simulate", metavar="CLUSTER",
                   help="estimate the makespan on a cluster: a cluster.yaml or a file with `tiers: {high: 4, mid: 8}`")
    s.add_argument("--fail-rate", type=float, default=0.0, metavar="P",
                   help="with --simulate: the share of GPU attempts that fail with an error (then retried)")
    s.add_argument("--oom-rate", type=float, default=0.0, metavar="P",
                   help="with --simulate: the share of GPU attempts that run out of memory (walk the preset ladder)")
    s.add_argument("--seed", type=int, default=0, help="with --simulate: seed of the simulated faults")
    s.add_argument("--deadline", default=None, metavar="T",
                   help="with --simulate: how many GPUs of which tier (within the cluster file's) finish by T "
                        "(5400, 90m, 2h), and at what cost (the config's `prices:`); default: the manifest's")
    s.add_argument("--costs", default=None, metavar="FILE",
                   help="with --simulate: a `farm calibrate` costs file (default: the config's `costs:`, else "
                        "the assumed figures)")
    s.set_defaults(func=cmd_plan)

    s = sub.add_parser("convert-weights", help="convert pickled weights (.bin, .pt) to .safetensors once, "
                                                "loading them with torch.load(weights_only=True)")
    s.add_argument("source", help="the pickled file (e.g. ip-adapter_sdxl_vit-h.bin)")
    s.add_argument("-o", "--output", help="where to write (default: beside it, .safetensors)")
    s.add_argument("--force", action="store_true", help="replace an existing output")
    s.set_defaults(func=cmd_convert_weights)

    s = sub.add_parser("calibrate", help="fit the cost model to finished renders (their ledger and lockfile)")
    s.add_argument("renders", nargs="+", metavar="RENDER",
                   help="a finished render's output folder (or its ledger.parquet)")
    s.add_argument("-o", "--output", required=True, help="the costs file to write (YAML)")
    s.set_defaults(func=cmd_calibrate)

    s = sub.add_parser("render", help="render a storyboard on a local Ray")
    s.add_argument("file")
    s.add_argument("-o", "--output", default="out", help="output folder (default: ./out)")
    s.add_argument("--models", choices=["tiny"], default=None,
                   help="use tiny random-weight models of the same families (offline demo and tests)")
    s.add_argument("--workers", type=int, default=None, help="worker actors (default: one per GPU, else 1)")
    s.add_argument("--tier", choices=["auto", "high", "mid", "low", "cpu"], default="auto",
                   help="force every worker's VRAM tier presets (default: read from the GPU)")
    s.add_argument("--preview", action="store_true",
                   help="draft render: long side 256 px, 4 steps, no final upscale (same shots, cuts, seeds)")
    s.add_argument("--no-cache", action="store_true", help="render every stage again instead of reusing outputs")
    s.add_argument("--priority", type=int, default=0, help="higher runs first when jobs share the farm")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    s.add_argument("--ui", action="store_true",
                   help="serve the web pages on 127.0.0.1 while it renders (the URL is printed), and after it "
                        "until Ctrl-C")
    s.add_argument("--port", type=int, default=8000, help="with --ui: the pages' port (default: 8000)")
    s.set_defaults(func=cmd_render)
    s = sub.add_parser("serve", help="run the HTTP API (Ray Serve) on this machine's Ray or RAY_ADDRESS")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--models", choices=["tiny"], default=None, help="render every job with tiny models")
    s.add_argument("--tier", choices=["auto", "high", "mid", "low", "cpu"], default="auto")
    s.add_argument("--workers", type=int, default=None)
    s.set_defaults(func=cmd_serve)

    def remote(name: str, help_text: str) -> argparse.ArgumentParser:
        r = sub.add_parser(name, help=help_text)
        r.add_argument("--server", default=None, help="farm URL (default: the farm config's server, $FARM_SERVER, "
                       "or http://127.0.0.1:8000)")
        r.add_argument("--token", default=None, help="API token (default: the farm config's, or $FARM_API_TOKEN)")
        return r

    s = remote("submit", "submit a storyboard to a running farm")
    s.add_argument("file")
    s.add_argument("--priority", type=int, default=0)
    s.add_argument("--idempotency-key", default=None, help="the same key returns the same job instead of a new one")
    s.add_argument("--wait", action="store_true", help="follow the job's events with progress bars")
    s.add_argument("-q", "--quiet", action="store_true")
    s.set_defaults(func=cmd_submit)
    s = remote("status", "a job's state and per-shot progress (all jobs without JOB)")
    s.add_argument("job", nargs="?")
    s.set_defaults(func=cmd_status)
    s = remote("cancel", "cancel a job: running stages stop, nothing more starts")
    s.add_argument("job")
    s.set_defaults(func=cmd_cancel)
    s = remote("requeue", "run a failed, cancelled or finished job again; finished stages come from the cache")
    s.add_argument("job")
    s.set_defaults(func=cmd_requeue)
    s = remote("priority", "change a job's priority (higher first; running stages are not preempted)")
    s.add_argument("job")
    s.add_argument("priority", type=int, help="-100 to 100")
    s.set_defaults(func=cmd_priority)
    s = remote("fetch", "download a finished job's film")
    s.add_argument("job")
    s.add_argument("-o", "--output", required=True)
    s.set_defaults(func=cmd_fetch)
    s = remote("workers", "the farm's workers: node, GPU, VRAM, tier, state, loaded models")
    s.set_defaults(func=cmd_workers)

    s = sub.add_parser("config", help="the farm config every entry point reads")
    config_sub = s.add_subparsers(dest="config_command", required=True)
    c = config_sub.add_parser("show", help="every effective value and where it came from (file, variable, default)")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_config_show)

    s = sub.add_parser("cache", help="the stage-output cache: its size, and keeping it under its cap")
    cache_sub = s.add_subparsers(dest="cache_command", required=True)
    c = cache_sub.add_parser("du", help="files and bytes in the cache, by kind, and what queued and running jobs need")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_cache_du)
    c = cache_sub.add_parser("gc", help="evict least recently used outputs until the cache fits its cap "
                                        "(never what a queued or running job needs)")
    c.add_argument("--cap-gb", type=float, default=None, help="the cap for this run (default: cache_cap_gb)")
    c.add_argument("--grace-s", type=float, default=600.0,
                   help="spare what was used this recently (a stage may be about to read it)")
    c.add_argument("--dry-run", action="store_true", help="say what would go, remove nothing")
    c.set_defaults(func=cmd_cache_gc)
    return p


def main(argv: list[str] | None = None) -> int:
    import signal

    # `farm presets | head` should end quietly, like any Unix tool.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    args = parser().parse_args(argv)
    from farm.config import ConfigError, install, load_config

    try:
        install(load_config(args.config)[0])  # one config for this process and the actors it starts
    except ConfigError as exc:
        print(f"error: farm config: {exc}", file=sys.stderr)
        return EXIT_INVALID
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
