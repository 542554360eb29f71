"""Export a trained Keras model as a model bundle (ONNX graph + metadata + reference outputs).

Export converts with tf2onnx, runs the same fixed inputs through Keras and ONNX Runtime, and
refuses to write a bundle when they disagree by more than ``PARITY_TOLERANCE``. The bundle is
written to a temporary folder and moved into place only when complete.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from agent.bundle import FORMAT, METADATA, MODEL_FILE, REFERENCE_FILE, load_bundle, sha256_file

log = logging.getLogger(__name__)

PARITY_TOLERANCE = 1e-4
OPSET = 17


class ParityError(RuntimeError):
    """ONNX Runtime and Keras disagree on the export's reference inputs."""


def code_version() -> str:
    """The git commit of the code (with ``-dirty`` for local changes), or ``unknown``."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, text=True,
                             capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, text=True, capture_output=True).stdout.strip()
        return f"{sha}-dirty" if dirty else sha
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def to_onnx(model) -> bytes:
    """The ONNX graph of a Keras model; input ``snapshot`` with a dynamic batch axis."""
    import tensorflow as tf
    import tf2onnx

    length, channels = model.input_shape[1:]
    spec = (tf.TensorSpec((None, length, channels), tf.float32, name="snapshot"),)
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=OPSET)
    return proto.SerializeToString()


def check_parity(model, onnx_bytes: bytes, inputs: np.ndarray) -> tuple[np.ndarray, float]:
    """Keras outputs for ``inputs`` and the largest difference from ONNX Runtime's.

    Raises ParityError above ``PARITY_TOLERANCE``.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    expected = model.predict(inputs, verbose=0)
    got = session.run(None, {session.get_inputs()[0].name: inputs})[0]
    if got.shape != expected.shape:
        raise ParityError(f"ONNX output shape {got.shape} != Keras {expected.shape}")
    error = float(np.abs(got - expected).max())
    if not error <= PARITY_TOLERANCE:
        raise ParityError(f"ONNX Runtime and Keras differ by {error:.3e} on the reference "
                          f"inputs (tolerance {PARITY_TOLERANCE:.0e}); bundle not written")
    return expected, error


def reference_inputs(model, real: np.ndarray | None = None, seed: int = 0) -> np.ndarray:
    """Fixed inputs for the parity check and the agent's self-test: noise, steps, real data."""
    length, channels = model.input_shape[1:]
    rng = np.random.default_rng(seed)
    t = np.linspace(0, 1, length)[:, None]
    synthetic = [
        rng.normal(size=(length, channels)),
        np.repeat(np.sin(2 * np.pi * 8 * t), channels, axis=1),
        np.repeat((t > 0.5) * 3.0 - 1.0, channels, axis=1),
        np.zeros((length, channels)),
    ]
    batch = np.stack(synthetic)
    if real is not None:
        batch = np.concatenate([batch, real[:4]])
    return batch.astype(np.float32)


def export_bundle(model, out_dir: str | Path, metadata: dict,
                  real_inputs: np.ndarray | None = None) -> Path:
    """Write a verified bundle for ``model`` to ``out_dir`` (replacing it) and return it.

    ``metadata`` holds the task's fields (channels, classes, activation, normalization,
    snapshot_length, hop, sample_period, threshold, min_duration, training, ...); export adds
    format, model length, files, checksums and the model id.
    """
    out_dir = Path(out_dir)
    onnx_bytes = to_onnx(model)
    inputs = reference_inputs(model, real_inputs)
    outputs, error = check_parity(model, onnx_bytes, inputs)
    log.info("parity check passed: max |ONNX - Keras| = %.2e", error)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".bundle-", dir=out_dir.parent))
    try:
        (staging / MODEL_FILE).write_bytes(onnx_bytes)
        np.savez_compressed(staging / REFERENCE_FILE, inputs=inputs, outputs=outputs)
        model_sha = sha256_file(staging / MODEL_FILE)
        meta = dict(metadata)
        meta.update(
            format=FORMAT,
            model_id=f"{metadata.get('name', out_dir.name)}-{model_sha[:12]}",
            model_length=int(model.input_shape[1]),
            opset=OPSET,
            parity_max_abs_error=error,
            created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            code_version=code_version(),
            files={MODEL_FILE: model_sha,
                   REFERENCE_FILE: sha256_file(staging / REFERENCE_FILE)},
        )
        (staging / METADATA).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        load_bundle(staging)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out_dir
