"""Inference backends: one file per runtime behind one small interface.

A backend scores a batch of prepared snapshots ``(batch, model_length, channels)`` float32
and returns the model outputs ``(batch, model_length, outputs)`` float32. Backends:

- ``tensorrt`` (``tensorrt_backend.py``): NVIDIA GPUs; an engine built from the bundle's
  ONNX graph and cached next to the bundle; FP16 (default) or FP32.
- ``litert`` (``litert_backend.py``): the bundle's ``model.tflite`` on LiteRT with XNNPACK,
  CPU, float32.
- ``onnxruntime`` (``onnxruntime_backend.py``): the bundle's ONNX graph; CPU, or CUDA where
  the ``onnxruntime-gpu`` package is installed.

A backend's runtime is imported only when that backend is tried. ``load_backend`` tries the
requested backend (``auto``: the best that works here, see ``candidates``), self-tests it,
and falls back along the same order when it cannot run or fails its self-test: the reason
is logged and kept in ``backend.fallback_reason``, which the agent's status shows.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import Protocol

import numpy as np

from agent.bundle import ModelBundle

log = logging.getLogger(__name__)

BACKENDS = ("auto", "onnxruntime", "litert", "tensorrt")
PRECISIONS = ("fp16", "fp32")

# The CPU backends in order of preference; the order is the measured one in
# docs/inference.md (LiteRT with XNNPACK was faster than ONNX Runtime at batch 1 and 64).
CPU_ORDER = ("litert", "onnxruntime")

# Self-test tolerances on the model outputs (probabilities in [0, 1]). FP32 backends differ
# from Keras only by the order of float32 sums (about 1e-6 here; 1e-4 is the export's
# parity tolerance). FP16 rounds every activation to 11 significant bits (relative 4.9e-4)
# through 19 convolutions; measured differences are a few 1e-3 after the sigmoid, so 2e-2
# leaves room and is still 5x finer than the alarm hysteresis (0.1).
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2}


class BackendError(RuntimeError):
    """A backend that cannot run this bundle here; the message says why and what to do."""


class Backend(Protocol):
    kind: str  # onnxruntime, litert, tensorrt
    name: str  # kind and device or precision, e.g. "litert-xnnpack", "tensorrt-fp16"
    precision: str  # fp32 or fp16
    fallback_reason: str | None  # why better candidates were not used; None: first choice
    self_test_error: float  # largest difference from the bundle's reference outputs

    def run(self, batch: np.ndarray) -> np.ndarray: ...

    def describe(self) -> str: ...


def cpu_threads(threads: int = 0) -> int:
    """``threads``, or the CPUs this process may run on when 0."""
    if threads > 0:
        return threads
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _onnxruntime_has_cuda() -> bool:
    """Whether the CUDA build of ONNX Runtime is installed (without importing it)."""
    from importlib import metadata

    try:
        metadata.version("onnxruntime-gpu")
    except metadata.PackageNotFoundError:
        return False
    return True


def candidates(name: str = "auto", strict: bool = False) -> tuple[list[tuple], list[str]]:
    """Backends to try in order, as ``(kind, options)``, and the reasons for those skipped.

    ``auto``: TensorRT when tensorrt and pycuda are installed (whether a GPU is there is
    known only once it is tried), ONNX Runtime on CUDA when onnxruntime-gpu is installed,
    then the CPU backends in ``CPU_ORDER``. A named backend comes first, followed by the
    CPU backends as fallbacks unless ``strict``.
    """
    if name not in BACKENDS:
        raise BackendError(f"unknown inference backend {name!r}; use one of "
                           f"{', '.join(BACKENDS)}")
    skipped: list[str] = []
    order: list[tuple] = []
    if name == "auto":
        if _installed("tensorrt") and _installed("pycuda"):
            order.append(("tensorrt", {}))
        else:
            skipped.append("tensorrt: the tensorrt and pycuda packages are not installed "
                           "(pip install 'segwatch[tensorrt]' on a machine with an NVIDIA GPU)")
        if _onnxruntime_has_cuda():
            order.append(("onnxruntime", {"device": "cuda"}))
        order += [(kind, {"device": "cpu"} if kind == "onnxruntime" else {})
                  for kind in CPU_ORDER]
        return order, skipped
    order.append((name, {}))
    if not strict:
        order += [(kind, {"device": "cpu"} if kind == "onnxruntime" else {})
                  for kind in CPU_ORDER if kind != name]
    return order, skipped


def _create(kind: str, bundle: ModelBundle, threads: int, precision: str, options: dict,
            engine_dir, build_engine: bool):
    if kind == "onnxruntime":
        from agent.inference.onnxruntime_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend(bundle, threads=threads, device=options.get("device", "auto"))
    if kind == "litert":
        from agent.inference.litert_backend import LiteRTBackend

        return LiteRTBackend(bundle, threads=threads)
    from agent.inference.tensorrt_backend import TensorRTBackend

    return TensorRTBackend(bundle, precision=precision, engine_dir=engine_dir,
                           build=build_engine)


def load_backend(bundle: ModelBundle, name: str = "auto", threads: int = 0, *,
                 precision: str = "fp16", engine_dir=None, build_engine: bool = True,
                 strict: bool = False) -> Backend:
    """Load ``bundle`` on backend ``name`` (or the best that works), self-tested.

    ``threads``: CPU threads for the CPU backends (0: every CPU this process may use).
    ``precision``: TensorRT's (fp16 or fp32; the CPU backends run fp32). ``engine_dir``:
    where TensorRT engines are cached (default: ``engines/`` in the bundle folder).
    ``build_engine``: build a missing or stale engine at load (may take minutes).
    ``strict``: raise instead of falling back to a CPU backend.

    Raises BackendError when no backend works; its message has every reason.
    """
    if precision not in PRECISIONS:
        raise BackendError(f"unknown precision {precision!r}; use fp16 or fp32")
    order, reasons = candidates(name, strict)
    for kind, options in order:
        try:
            backend = _create(kind, bundle, threads, precision, options, engine_dir,
                              build_engine)
            backend.self_test_error = self_test(backend, bundle)
        except BackendError as exc:
            reason = f"{kind}: {exc}"
        except Exception as exc:  # a runtime's own exception types: report, try the next
            log.debug("backend %s failed", kind, exc_info=True)
            reason = f"{kind}: {type(exc).__name__}: {exc}"
        else:
            backend.fallback_reason = "; ".join(reasons) or None
            _log_choice(bundle, name, backend)
            return backend
        reasons.append(reason)
        if kind == name or kind == "tensorrt":
            log.warning("model %s: %s", bundle.model_id, reason)
        else:
            log.info("model %s: %s", bundle.model_id, reason)
    raise BackendError(f"model {bundle.model_id}: no inference backend works: "
                       + "; ".join(reasons))


def _log_choice(bundle: ModelBundle, requested: str, backend) -> None:
    why = f" (not used: {backend.fallback_reason})" if backend.fallback_reason else ""
    message = (f"model %s: inference on %s, self-test passed (max |error| %.1e vs the "
               f"bundle's reference, tolerance %.0e)%s")
    args = (bundle.model_id, backend.describe(), backend.self_test_error,
            TOLERANCE[backend.precision], why)
    # A named backend replaced by another is a warning; auto's choice is information.
    if requested not in ("auto", backend.kind):
        log.warning("requested backend %s not used; " + message, requested, *args)
    else:
        log.info(message, *args)


def self_test(backend: Backend, bundle: ModelBundle, tolerance: float | None = None) -> float:
    """Check a backend on the bundle's reference inputs; return the largest error.

    Outputs must be finite and of the declared shape, the batch must agree with the same
    snapshots run one at a time, and both with the reference outputs Keras gave at export,
    within ``TOLERANCE[backend.precision]``. Raises BackendError otherwise.
    """
    if tolerance is None:
        tolerance = TOLERANCE[backend.precision]
    inputs, expected = bundle.reference()
    batched = np.asarray(backend.run(inputs))
    outputs = len(bundle.classes) + (1 if bundle.activation == "softmax" else 0)
    if batched.shape != (len(inputs), bundle.model_length, outputs):
        raise BackendError(f"{bundle.path}: the model gives outputs of shape "
                           f"{batched.shape[1:]} but bundle.json declares "
                           f"({bundle.model_length}, {outputs}) for {len(bundle.classes)} "
                           f"{bundle.activation} class(es)")
    if not np.isfinite(batched).all():
        raise BackendError(f"{backend.name}: self-test gave non-finite outputs")
    single = np.concatenate([np.asarray(backend.run(inputs[i:i + 1]))
                             for i in range(len(inputs))])
    spread = float(np.abs(single - batched).max())
    if not spread <= tolerance:
        raise BackendError(f"{backend.name}: batched and single-snapshot outputs differ by "
                           f"{spread:.2e} (tolerance {tolerance:.0e})")
    error = float(np.abs(batched - expected).max())
    if not error <= tolerance:
        raise BackendError(f"{backend.name}: outputs differ from the bundle's reference by "
                           f"{error:.2e} (tolerance {tolerance:.0e})")
    return error
