"""What every benchmark records: the machine, the code version, the command; results files.

The processor's FP32 peak is derived, not measured: cores x clock x FP32 FLOPs per cycle
per core, the last from the vector units the CPU flags imply (``peak_flops`` says which
assumption it made; it is printed and stored with every result).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"


def code_version() -> str:
    """The git commit (``-dirty`` with local changes to tracked files), or ``unknown``."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, text=True,
                             capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, text=True, capture_output=True).stdout.strip()
        return f"{sha}-dirty" if dirty else sha
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty elsewhere)."""
    fields: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return fields
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def clock_ghz(info: dict[str, str]) -> tuple[float, str]:
    """The clock the peak assumes: cpufreq's maximum, else /proc/cpuinfo's 'cpu MHz'."""
    max_freq = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
    try:
        return int(max_freq.read_text()) / 1e6, "cpufreq cpuinfo_max_freq"
    except (OSError, ValueError):
        pass
    try:
        return float(info["cpu MHz"]) / 1e3, "/proc/cpuinfo 'cpu MHz' (no cpufreq: a VM)"
    except (KeyError, ValueError):
        return float("nan"), "unknown"


def flops_per_cycle(info: dict[str, str]) -> tuple[int, str]:
    """FP32 FLOPs per cycle per core (an FMA counts 2) and the assumption behind it."""
    flags = set((info.get("flags") or info.get("Features") or "").split())
    vendor = info.get("vendor_id", "")
    family = int(info.get("cpu family", "0") or 0)
    if "avx512f" in flags:
        if vendor == "AuthenticAMD" and family == 25:
            return 32, ("AMD Zen 4 (family 25) with AVX-512: 512-bit FMAs run as 2 x 256-bit; "
                        "2 FMA pipes x 8 FP32 lanes x 2 = 32")
        return 64, "AVX-512 with 2 FMA units x 16 FP32 lanes x 2 = 64"
    if "avx2" in flags and "fma" in flags:
        return 32, "AVX2 + FMA: 2 FMA units x 8 FP32 lanes x 2 = 32"
    if "avx" in flags:
        return 16, "AVX without FMA: 1 add + 1 multiply of 8 FP32 lanes = 16"
    if "asimd" in flags:
        return 16, "ARM NEON (asimd): 2 x 128-bit FMA pipes x 4 FP32 lanes x 2 = 16"
    return 8, "SSE: 4-lane add + 4-lane multiply = 8"


def peak_flops() -> tuple[float, str]:
    """FP32 peak of the CPUs this process may use, in FLOP/s, and how it was derived."""
    info = _cpuinfo()
    n = cores()
    ghz, clock_source = clock_ghz(info)
    per_cycle, assumption = flops_per_cycle(info)
    text = (f"{n} cores x {ghz:.2f} GHz ({clock_source}) x {per_cycle} FP32 FLOP/cycle "
            f"[{assumption}] = {n * ghz * per_cycle:.0f} GFLOP/s")
    return n * ghz * 1e9 * per_cycle, text


def machine() -> dict:
    info = _cpuinfo()
    peak, how = peak_flops()
    return {
        "cpu_model": info.get("model name") or platform.processor() or "unknown",
        "cores": cores(),
        "cpu_flags_vector": sorted(f for f in (info.get("flags") or "").split()
                                   if f.startswith(("avx", "fma", "amx"))),
        "fp32_peak_gflops": round(peak / 1e9, 1),
        "fp32_peak_assumption": how,
        "python": platform.python_version(),
        "system": f"{platform.system()} {platform.release()} {platform.machine()}",
    }


def header(title: str) -> dict:
    """Print the machine and return the common fields of a results file."""
    record = {
        "benchmark": title,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "code_version": code_version(),
        "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
    }
    m = record["machine"]
    print(f"== {title} ({record['code_version']}) on {m['cpu_model']}, {m['cores']} cores")
    print(f"   FP32 peak: {m['fp32_peak_assumption']}")
    return record


def verdict(value: float, target: float, higher_is_better: bool = True) -> str:
    ok = value >= target if higher_is_better else value <= target
    return "PASS" if ok else "MISS"


def write_results(name: str, record: dict, out: str | os.PathLike | None = None) -> Path:
    path = Path(out) if out else RESULTS / f"bench-{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(f"   written to {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return path
