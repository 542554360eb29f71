"""``segwatch-agent``: run the agent, replay data onto MQTT, run the demo."""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import sys
from pathlib import Path


def _configure_logging(level: str) -> None:
    # Under systemd the journal adds timestamps; elsewhere print them.
    fmt = "%(levelname)s %(name)s: %(message)s"
    if not os.environ.get("JOURNAL_STREAM"):
        fmt = "%(asctime)s " + fmt
    logging.basicConfig(level=getattr(logging, level.upper()), format=fmt)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="segwatch-agent",
        description="Anomaly segmentation for MQTT sensor streams at the edge.",
    )
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the agent with a configuration file")
    run.add_argument("--config", "-c", required=True, type=Path)
    run.add_argument("--backend", default=None,
                     choices=["auto", "onnxruntime", "litert", "tensorrt"],
                     help="inference backend (default: the configuration's inference.backend)")

    check = sub.add_parser("check", help="validate a configuration and load its model bundles")
    check.add_argument("--config", "-c", required=True, type=Path)

    rep = sub.add_parser("replay", help="publish a data file onto MQTT as a gateway would")
    rep.add_argument("file", type=Path, help="Dodgers.data, or a CSV with a timestamp column")
    rep.add_argument("--format", choices=["auto", "dodgers", "csv"], default="auto")
    rep.add_argument("--topic", required=True, help="topic to publish on")
    rep.add_argument("--payload", choices=["auto", "channel", "asset"], default="auto",
                     help="channel: {ts, value}; asset: {ts, values}; auto: by channel count")
    rep.add_argument("--host", default="127.0.0.1")
    rep.add_argument("--port", type=int, default=1883)
    rep.add_argument("--speed", type=float, default=1.0,
                     help="times real time; 0 sends as fast as the broker takes it")
    rep.add_argument("--start", help="first sample time to send (ISO 8601 with offset)")
    rep.add_argument("--end", help="last sample time to send (ISO 8601 with offset)")
    rep.add_argument("--time-column", help="CSV timestamp column (default: detected)")
    rep.add_argument("--columns", help="comma-separated CSV columns to send (default: all)")
    rep.add_argument("--qos", type=int, choices=[0, 1], default=1)

    engine = sub.add_parser("build-engine", help="build and cache a bundle's TensorRT engine "
                            "on this machine's GPU, then self-test it")
    engine.add_argument("--bundle", required=True, type=Path, help="model bundle folder")
    engine.add_argument("--precision", choices=["fp16", "fp32"], default="fp16")
    engine.add_argument("--engine-dir", type=Path, default=None,
                        help="engine cache folder (default: BUNDLE/engines)")
    engine.add_argument("--force", action="store_true", help="rebuild even if up to date")

    status = sub.add_parser("status", help="print the running agent's health report; exit 1 "
                            "when it is not running (no report, a stale one, or offline)")
    where = status.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", "-c", type=Path, help="the agent's configuration file")
    where.add_argument("--file", type=Path, help="the status file itself")

    demo = sub.add_parser("demo", help="the Dodgers demo on an embedded MQTT broker")
    demo.add_argument("--data", type=Path, default=None, help="folder with Dodgers.data")
    demo.add_argument("--database", type=Path, default=Path("demo.db"))
    demo.add_argument("--speed", type=float, default=250_000.0)

    args = parser.parse_args(argv)
    _configure_logging(args.log_level)
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        return 130


def _dispatch(args) -> int:
    from agent.bundle import BundleError
    from agent.config import ConfigError, load_config
    from agent.inference import BackendError
    from agent.service import StartupError

    if args.command in ("run", "check"):
        try:
            config = load_config(args.config)
            if args.command == "check":
                from agent.service import build_pipeline  # loads and self-tests the models

                pipeline = build_pipeline(config)
                for name, asset in pipeline.assets.items():
                    s = asset.settings
                    print(f"{name}: model {asset.bundle.model_id}, {len(s.channels)} channel(s),"
                          f" snapshot {s.snapshot_length} x {s.sample_period:g} s, hop {s.hop}, "
                          f"threshold {s.threshold}")
                    reason = getattr(asset.backend, "fallback_reason", None)
                    print(f"{name}: inference on {asset.backend.describe()}"
                          + (f" (not used: {reason})" if reason else ""))
                print(f"{args.config}: OK")
                return 0
            from agent.service import run_agent

            return run_agent(config, args.backend or config.inference_backend)
        except (ConfigError, BundleError, BackendError, StartupError) as exc:
            print(f"segwatch-agent: {exc}", file=sys.stderr)
            return 2

    if args.command == "replay":
        return _replay(args)

    if args.command == "status":
        return _status(args)

    if args.command == "build-engine":
        return _build_engine(args)

    if args.command == "demo":
        from agent.demo import DEFAULT_DATA, run_demo

        return run_demo(args.data or DEFAULT_DATA, args.database, args.speed)
    return 2


def _build_engine(args) -> int:
    from agent.bundle import BundleError, load_bundle
    from agent.inference import BackendError, load_backend
    from agent.inference.tensorrt_backend import build_engine

    try:
        bundle = load_bundle(args.bundle)
        path = build_engine(bundle, args.precision, args.engine_dir, force=args.force)
        backend = load_backend(bundle, "tensorrt", precision=args.precision,
                               engine_dir=args.engine_dir, build_engine=False, strict=True)
    except (BundleError, BackendError) as exc:
        print(f"segwatch-agent build-engine: {exc}", file=sys.stderr)
        return 2
    print(f"{path}: {backend.describe()}; self-test passed, max |error| "
          f"{backend.self_test_error:.1e} against the bundle's reference outputs")
    return 0


def _status(args) -> int:
    """Print the status file as a text report; 0 when the agent is running, else 1."""
    from agent.health import read_status_file, status_file_from_config, status_report

    try:
        path = args.file or status_file_from_config(args.config)
    except (OSError, ValueError) as exc:
        print(f"segwatch-agent status: {exc}", file=sys.stderr)
        return 2
    try:
        status = read_status_file(path)
    except FileNotFoundError:
        print(f"segwatch-agent status: no status file {path}: the agent is not running, or "
              "has not written its first report yet", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"segwatch-agent status: cannot read {path}: {exc}", file=sys.stderr)
        return 1
    text, healthy = status_report(status)
    try:
        print(text, flush=True)
    except BrokenPipeError:  # `segwatch-agent status | head`: the reader left early
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0 if healthy else 1


def _replay(args) -> int:
    import numpy as np

    from agent.datasets import Series, read_csv_series, read_dodgers
    from agent.replay import replay
    from agent.timeutil import TimestampError, parse_timestamp

    fmt = args.format
    if fmt == "auto":
        fmt = "dodgers" if args.file.suffix == ".data" else "csv"
    try:
        series = (read_dodgers(args.file) if fmt == "dodgers"
                  else read_csv_series(args.file, args.time_column))
        lo = parse_timestamp(args.start) if args.start else -np.inf
        hi = parse_timestamp(args.end) if args.end else np.inf
    except (OSError, ValueError, TimestampError) as exc:
        print(f"segwatch-agent replay: {exc}", file=sys.stderr)
        return 2
    if args.columns:
        wanted = [name.strip() for name in args.columns.split(",")]
        unknown = [name for name in wanted if name not in series.channels]
        if unknown:
            print(f"segwatch-agent replay: no column {unknown[0]!r}; columns: "
                  f"{', '.join(series.channels)}", file=sys.stderr)
            return 2
        index = [series.channels.index(name) for name in wanted]
        series = Series(series.ts, series.values[:, index], wanted, series.period)
    keep = (series.ts >= lo) & (series.ts <= hi)
    series = Series(series.ts[keep], series.values[keep], series.channels, series.period)
    if not len(series.ts):
        print("segwatch-agent replay: no samples in the chosen time range", file=sys.stderr)
        return 2
    first = dt.datetime.fromtimestamp(series.ts[0], dt.timezone.utc).strftime("%Y-%m-%d %H:%M")
    print(f"replay: {len(series.ts):,} rows of {', '.join(series.channels)} from {first} UTC "
          f"to {args.host}:{args.port} {args.topic}", file=sys.stderr)
    try:
        result = replay(series, args.host, args.port, args.topic, args.speed, args.payload,
                        args.qos)
    except (OSError, ValueError) as exc:
        print(f"segwatch-agent replay: {exc}", file=sys.stderr)
        return 1
    print(f"replay: {result.samples:,} samples in {result.messages:,} messages, "
          f"{result.seconds:.1f} s", file=sys.stderr)
    return 0
