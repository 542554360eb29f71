"""Inference benchmark: snapshots per second and latency per batch, per model and backend.

Models (random weights, seeded; speed does not depend on the weights): U-Net (C = 1) and
MU-Net (C = 8 and 19), snapshots of 1,024 points. Each model is exported as the trainer
exports a bundle (ONNX + LiteRT, parity-checked) and loaded through ``load_backend`` with
its self-test, so the figures are those of the agent's own code path. Backends:

- ``keras-per-snapshot``: the trainer's Keras model called on one snapshot at a time,
  ``model(x, training=False)`` (the plain call; ``predict`` per snapshot is slower still);
- ``keras-batched``: the model through a ``tf.function`` traced once per batch size, at
  every batch size, 1 included (Keras at its fastest: its batch-1 row is the conservative
  per-snapshot baseline, and its ratio is printed too);
- ``onnxruntime``, ``litert``: the agent's CPU backends;
- ``tensorrt-fp32``, ``tensorrt-fp16``: where tensorrt, pycuda and a GPU are present.

Snapshots/s are from the median call (batch / median latency), which other processes
on a shared machine disturb less than the mean; the mean-based figure is stored too.

Multiply-adds per snapshot are counted from the Keras graph: for every Conv1D, output
length x filters x kernel width x input channels (the ONNX graph runs the same
convolutions). Batch normalization, ReLU, pooling, upsampling and concatenation are
element-wise or copies, under 1 % of the arithmetic, and are left out. The arithmetic
limit is the CPU's FP32 peak (``bench/common.py``); a backend's share of it is
snapshots/s x 2 x multiply-adds / peak.

Run: ``python bench/inference.py``. The first run exports the three models (minutes; they
are cached in ``build/bench-models``, keyed by seed and the hash of the model and export
code); later runs take about 2 minutes on 2 cores, most of it Keras on MU-Net.
``--seconds`` per measurement and ``--models`` / ``--batches`` / ``--backends`` change the
grid.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from bench.common import ROOT, header, peak_flops, verdict, write_results  # noqa: E402

MODELS = {"unet": 1, "munet8": 8, "munet19": 19}
BACKENDS = ("keras-per-snapshot", "keras-batched", "onnxruntime", "litert", "tensorrt-fp32",
            "tensorrt-fp16")
TARGET_PEAK_SHARE = 0.70
TARGET_KERAS_RATIO = 10.0
TARGET_UNET_RATE = 2000.0


def multiply_adds(model) -> int:
    """Multiply-adds of one snapshot through every Conv1D of a Keras model."""
    total = 0
    for layer in model.layers:
        if layer.__class__.__name__ == "Conv1D":
            length, filters = layer.output.shape[1], layer.output.shape[2]
            kernel, channels = layer.kernel.shape[0], layer.kernel.shape[1]
            total += length * filters * kernel * channels
    return int(total)


def build(name: str, seed: int):
    import keras

    from trainer import unet

    keras.utils.set_random_seed(seed)
    channels = MODELS[name]
    if name == "unet":
        return unet.build_unet(n_channels=1, n_classes=1)
    if not hasattr(unet, "build_munet"):
        return None
    return unet.build_munet(n_channels=channels, n_classes=1)


def _model_code_hash() -> str:
    import hashlib

    digest = hashlib.sha256()
    for name in ("trainer/unet.py", "trainer/export.py"):
        digest.update((ROOT / name).read_bytes())
    return digest.hexdigest()[:12]


def export(model, channels: int, seed: int):
    """The model's bundle, exported once and cached in ``build/bench-models``.

    The cache key is the model name, the channel count, the seed and the hash of the model
    and export code; weights are seeded, so a cached bundle holds the same model.
    """
    from agent.bundle import BundleError, load_bundle
    from trainer.export import export_bundle

    key = f"{model.name}-c{channels}-seed{seed}-{_model_code_hash()}"
    folder = ROOT / "build" / "bench-models" / key
    if (folder / "bundle.json").is_file():
        try:
            return load_bundle(folder), True
        except BundleError:
            pass

    metadata = {
        "name": model.name, "architecture": "munet" if channels > 1 else "unet",
        "channels": [f"c{i}" for i in range(channels)], "classes": ["anomaly"],
        "activation": "sigmoid", "sample_period": 1.0, "snapshot_length": 1024, "hop": 256,
        "threshold": 0.5,
        "normalization": {"mode": "fixed", "center": [0.0] * channels,
                          "scale": [1.0] * channels},
    }
    return load_bundle(export_bundle(model, folder, metadata)), False


def measure(run, batch: np.ndarray, seconds: float, min_calls: int = 2) -> dict:
    """Call ``run(batch)`` repeatedly for ``seconds`` (at least ``min_calls``) after a warm-up."""
    run(batch)
    latencies = []
    started = time.perf_counter()
    while True:
        t = time.perf_counter()
        run(batch)
        latencies.append(time.perf_counter() - t)
        elapsed = time.perf_counter() - started
        if elapsed >= seconds and len(latencies) >= min_calls:
            break
    median = statistics.median(latencies)
    return {
        "calls": len(latencies),
        # From the median call: robust to other processes taking the CPU now and then.
        "snapshots_per_s": round(len(batch) / median, 1),
        "snapshots_per_s_mean": round(len(batch) * len(latencies) / elapsed, 1),
        "latency_ms_median": round(median * 1e3, 3),
        "latency_ms_p90": round(float(np.percentile(latencies, 90)) * 1e3, 3),
    }


def runners(model, bundle, wanted: list[str], threads: int) -> dict:
    """Callables ``batch -> outputs`` per backend, and the reasons for those left out."""
    from agent.inference import BackendError, load_backend

    import tensorflow as tf

    out, missing = {}, {}
    # Compiled once per batch shape (the warm-up call traces it): Keras at its fastest.
    compiled = tf.function(lambda x: model(x, training=False), reduce_retracing=True)

    def keras_eager(batch):
        return model(batch, training=False).numpy()

    def keras_compiled(batch):
        return compiled(batch).numpy()

    for name in wanted:
        if name.startswith("keras"):
            out[name] = keras_eager if name == "keras-per-snapshot" else keras_compiled
            continue
        kind, _, precision = name.partition("-")
        try:
            backend = load_backend(bundle, kind, threads, precision=precision or "fp32",
                                   strict=True, engine_dir=Path(bundle.path) / "engines")
        except BackendError as exc:
            missing[name] = str(exc).split("no inference backend works: ")[-1]
            continue
        out[name] = backend.run
    return out, missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="unet,munet8,munet19")
    parser.add_argument("--batches", default="1,8,64")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--seconds", type=float, default=1.0, help="per measurement")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("agent.inference").setLevel(logging.ERROR)  # reasons printed below
    record = header("inference")
    peak, _ = peak_flops()
    batches = [int(b) for b in args.batches.split(",")]
    wanted = [b for b in args.backends.split(",") if b]
    record.update(seed=args.seed, batches=batches, seconds_per_measurement=args.seconds,
                  models={}, targets=[])
    rng = np.random.default_rng(args.seed)

    for name in args.models.split(","):
        model = build(name, args.seed)
        channels = MODELS[name]
        if model is None:
            print(f"\n-- {name}: skipped: trainer/unet.py has no build_munet yet")
            record["models"][name] = {"skipped": "trainer/unet.py has no build_munet"}
            continue
        macs = multiply_adds(model)
        started = time.perf_counter()
        bundle, cached = export(model, channels, args.seed)
        how = ("cached bundle" if cached
               else f"exported in {time.perf_counter() - started:.0f} s")
        print(f"\n-- {name} (C = {channels}): {macs / 1e6:.1f} M multiply-adds per snapshot "
              f"(Conv1D layers of the Keras graph); {how}")
        calls, missing = runners(model, bundle, wanted, args.threads)
        for backend, reason in missing.items():
            print(f"   {backend}: not measured: {reason}")
        rows = []
        for backend, run in calls.items():
            for size in ([1] if backend == "keras-per-snapshot" else batches):
                batch = rng.normal(size=(size, 1024, channels)).astype(np.float32)
                row = {"backend": backend, "batch": size,
                       **measure(run, batch, args.seconds)}
                row["gflops"] = round(row["snapshots_per_s"] * 2 * macs / 1e9, 1)
                row["peak_share"] = round(row["gflops"] * 1e9 / peak, 3)
                rows.append(row)
                print(f"   {backend:<19} batch {size:>3}: {row['snapshots_per_s']:>9.1f} "
                      f"snapshots/s, latency {row['latency_ms_median']:>8.2f} ms (p90 "
                      f"{row['latency_ms_p90']:.2f}), {row['gflops']:>6.1f} GFLOP/s = "
                      f"{row['peak_share']:.0%} of peak")
        record["models"][name] = {"channels": channels, "multiply_adds": macs,
                                  "rows": rows, "not_measured": missing}
        _ratios(name, rows, record)
    _targets(record, peak)
    write_results("inference", record, args.out)
    return 0


def _rate(rows, backend, batch):
    return next((r["snapshots_per_s"] for r in rows
                 if r["backend"] == backend and r["batch"] == batch), None)


def _ratios(name: str, rows: list[dict], record: dict) -> None:
    """Ratios measured in this run: each backend against Keras per snapshot, and CPU pair."""
    base = _rate(rows, "keras-per-snapshot", 1)
    compiled = _rate(rows, "keras-batched", 1)
    ratios = {}
    for row in rows:
        if base and not row["backend"].startswith("keras-per"):
            ratios[f"{row['backend']}@{row['batch']} / keras-per-snapshot"] = \
                round(row["snapshots_per_s"] / base, 1)
        if compiled and not row["backend"].startswith("keras"):
            ratios[f"{row['backend']}@{row['batch']} / keras-batched@1"] = \
                round(row["snapshots_per_s"] / compiled, 1)
    for size in (1, 8, 64):
        lite, ort = _rate(rows, "litert", size), _rate(rows, "onnxruntime", size)
        if lite and ort:
            ratios[f"litert / onnxruntime @{size}"] = round(lite / ort, 2)
    record["models"][name]["ratios"] = ratios
    for key, value in ratios.items():
        if "litert / onnxruntime" in key or "@64 / keras" in key:
            print(f"   ratio {key}: {value}")


def _targets(record: dict, peak: float) -> None:
    """The issue's targets for a 2-core CPU machine, for U-Net on the default CPU backend."""
    from agent.inference import CPU_ORDER

    unet = record["models"].get("unet", {})
    rows = unet.get("rows", [])
    cpu = CPU_ORDER[0]
    rate = _rate(rows, cpu, 64)
    base = _rate(rows, "keras-per-snapshot", 1)
    print(f"\n== targets (U-Net, default CPU backend {cpu}, batch 64)")
    if rate is None:
        print("   not measured (run with unet and batch 64)")
        return
    share = rate * 2 * unet["multiply_adds"] / peak
    checks = [
        ("share of the FP32 peak", share, TARGET_PEAK_SHARE, f"{share:.0%}",
         f">= {TARGET_PEAK_SHARE:.0%} (peak {peak / 1e9:.0f} GFLOP/s)"),
        ("snapshots/s", rate, TARGET_UNET_RATE, f"{rate:,.0f}", f">= {TARGET_UNET_RATE:,.0f}"),
    ]
    if base:
        checks.append(("x Keras per snapshot", rate / base, TARGET_KERAS_RATIO,
                       f"{rate / base:.1f}x", f">= {TARGET_KERAS_RATIO:.0f}x"))
    for label, value, target, shown, wanted in checks:
        mark = verdict(value, target)
        print(f"   {label:<24} {shown:>10}   target {wanted:<34} {mark}")
        record["targets"].append({"figure": label, "value": round(value, 3),
                                  "target": target, "verdict": mark, "backend": cpu})


if __name__ == "__main__":
    sys.exit(main())
