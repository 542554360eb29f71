"""The agent's health report: the status document as a local file, and its text form.

The worker writes the same document it publishes on the retained status topic to
``<database folder>/<database stem>.status.json`` every ``status_interval`` and at
shutdown, through a temporary file and an atomic rename, so a reader never sees half a file.
``segwatch-agent status`` prints it as text and exits 1 when the agent is not running: no
file, a report older than three status intervals (plus ten seconds), or ``offline``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import yaml

from agent.timeutil import TimestampError, parse_timestamp


def status_file(database: Path) -> Path:
    return database.with_name(f"{database.stem}.status.json")


def status_file_from_config(config_path: Path) -> Path:
    """The status file of an agent configuration, reading only its ``database`` key.

    The full validation is not needed to find the file, and it would ask for the broker
    password, which an operator reading the report may not have.
    """
    try:
        raw = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ValueError(f"{config_path}: not valid YAML: {exc}") from None
    database = raw.get("database") if isinstance(raw, dict) else None
    if not isinstance(database, str) or not database:
        raise ValueError(f"{config_path}: key 'database' is missing; the status file lies "
                         "next to the database")
    path = Path(os.path.expanduser(database))
    return status_file(path if path.is_absolute() else (config_path.parent / path).resolve())


def write_status_file(path: Path, status: dict) -> None:
    """Replace the status file atomically (write a temporary file, then rename it)."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(status, indent=1) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def read_status_file(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def stale_after(status: dict) -> float:
    """Seconds after which a report means the agent stopped writing it."""
    return 3 * float(status.get("status_interval", 10.0)) + 10.0


def status_report(status: dict, now: float | None = None) -> tuple[str, bool]:
    """The text report, and whether the agent is running and writing reports."""
    now = time.time() if now is None else now
    try:
        age = now - parse_timestamp(status.get("time"))
    except TimestampError:
        age = float("inf")
    state = status.get("state", "unknown")
    healthy = state == "online" and age <= stale_after(status)
    counters = status.get("counters", {})
    database = status.get("database", {})

    lines = [
        f"agent {status.get('client_id')}: {state}"
        + ("" if healthy else "  (NOT RUNNING)" if state != "online" else "  (STALE REPORT)"),
        f"  report written {_age(age)} ago; pid {status.get('pid')}, version "
        f"{status.get('version')}, up {_age(status.get('uptime_s', 0))}",
        f"  broker: {'connected' if status.get('connected') else 'NOT CONNECTED'}",
    ]
    for asset, model in sorted(status.get("models", {}).items()):
        lines.append(f"  asset {asset}: model {model}")
    rejected = {k.split(".", 1)[1]: v for k, v in counters.items() if k.startswith("rejected.")}
    lines.append(f"  messages received {counters.get('messages_received', 0)}, samples "
                 f"accepted {counters.get('samples_accepted', 0)}, rejected "
                 f"{sum(rejected.values())}" + _breakdown(rejected))
    scored = counters.get("snapshots_scored", 0)
    seconds = float(status.get("inference_seconds", 0.0))
    per = f", {1000 * seconds / scored:.1f} ms per snapshot" if scored else ""
    lines.append(f"  snapshots scored {scored}, skipped {counters.get('snapshots_skipped', 0)};"
                 f" inference {seconds:.2f} s{per}")
    lines.append(f"  alarms raised {counters.get('alarms_raised', 0)}, cleared "
                 f"{counters.get('alarms_cleared', 0)}, active {status.get('alarms_active', 0)}"
                 f", shelved classes {status.get('shelved_classes', 0)}; outbox pending "
                 f"{status.get('outbox_pending', 0)}")
    refused = {k.split(".", 1)[1]: v for k, v in counters.items()
               if k.startswith("commands_rejected.")}
    lines.append(f"  commands accepted {counters.get('commands_accepted', 0)}, rejected "
                 f"{sum(refused.values())}" + _breakdown(refused))
    db_line = (f"  database {database.get('path')}: {counters.get('db_errors', 0)} error(s), "
               f"WAL {database.get('wal_bytes', 0) / 1e6:.1f} MB")
    if database.get("moved_aside"):
        db_line += f"; DAMAGED FILE MOVED ASIDE to {database['moved_aside']}"
    lines.append(db_line)
    errors = {k: v for k, v in counters.items() if k.startswith("errors.")}
    if errors:
        lines.append("  unexpected errors:" + _breakdown(errors))
    return "\n".join(lines), healthy


def _breakdown(counts: dict) -> str:
    if not counts:
        return ""
    return " (" + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + ")"


def _age(seconds: float) -> str:
    if seconds == float("inf"):
        return "an unknown time"
    seconds = int(max(0, seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
