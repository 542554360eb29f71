"""Inference backends: one file per runtime behind one small interface.

A backend scores a batch of prepared snapshots ``(batch, model_length, channels)`` float32
and returns the model outputs ``(batch, model_length, outputs)``. A backend's runtime is
imported only when that backend is chosen.
"""

from __future__ import annotations

import logging
from typing import Protocol

import numpy as np

from agent.bundle import ModelBundle

log = logging.getLogger(__name__)

BACKENDS = ("auto", "onnxruntime")


class BackendError(RuntimeError):
    """A backend that cannot run this bundle here."""


class Backend(Protocol):
    name: str

    def run(self, batch: np.ndarray) -> np.ndarray: ...


def load_backend(bundle: ModelBundle, kind: str = "auto", threads: int = 0) -> Backend:
    """Load ``bundle`` on the backend ``kind`` and self-test it before returning."""
    if kind not in BACKENDS:
        raise BackendError(f"unknown backend {kind!r}; use one of {', '.join(BACKENDS)}")
    from agent.inference.onnxruntime_backend import OnnxRuntimeBackend

    backend = OnnxRuntimeBackend(bundle, threads=threads)
    self_test(backend, bundle)
    log.info("model %s loaded on %s", bundle.model_id, backend.name)
    return backend


def self_test(backend: Backend, bundle: ModelBundle, tolerance: float = 1e-4) -> None:
    """Outputs finite, batched equal to single, and equal to the bundle's reference outputs."""
    inputs, expected = bundle.reference()
    batched = backend.run(inputs)
    outputs = len(bundle.classes) + (1 if bundle.activation == "softmax" else 0)
    if batched.shape[1:] != (bundle.model_length, outputs):
        raise BackendError(f"{bundle.path}: the model gives outputs of shape {batched.shape[1:]}"
                           f" but bundle.json declares ({bundle.model_length}, {outputs}) for "
                           f"{len(bundle.classes)} {bundle.activation} class(es)")
    if not np.isfinite(batched).all():
        raise BackendError(f"{backend.name}: self-test gave non-finite outputs")
    single = np.concatenate([backend.run(inputs[i:i + 1]) for i in range(len(inputs))])
    if np.abs(single - batched).max() > tolerance:
        raise BackendError(f"{backend.name}: batched and single-snapshot outputs disagree")
    error = float(np.abs(batched - expected).max())
    if error > tolerance:
        raise BackendError(f"{backend.name}: outputs differ from the bundle's reference by "
                           f"{error:.2e} (tolerance {tolerance:.0e})")
