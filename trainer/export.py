"""Export a trained Keras model as a model bundle (ONNX graph + metadata + reference outputs).

Export converts with tf2onnx, runs the same fixed inputs through Keras and ONNX Runtime, and
refuses to write a bundle when they disagree by more than ``PARITY_TOLERANCE``. It also
converts the model to LiteRT (``model.tflite``, float32, dynamic batch) and checks that file
the same way against the LiteRT interpreter. The bundle is written to a temporary folder and
moved into place only when complete.

``add_tflite`` gives a bundle exported before LiteRT support its ``model.tflite``: it
rebuilds the Keras U-Net from the ONNX graph's weights (the trainer's layer names) and
checks the result against the bundle's reference outputs. It reads U-Net bundles only;
MU-Net bundles always had their LiteRT file from export. Run it as
``python -m trainer.export add-tflite BUNDLE``.
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

from agent.bundle import (
    FORMAT, METADATA, MODEL_FILE, REFERENCE_FILE, TFLITE_FILE, load_bundle, sha256_file,
)

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


def repo_relative(path: str | Path) -> str:
    """``path`` relative to the repository (for results files), or as given outside it."""
    root = Path(__file__).resolve().parent.parent
    try:
        return Path(path).resolve().relative_to(root).as_posix()
    except ValueError:
        return str(path)


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


def to_tflite(model) -> bytes:
    """The LiteRT flatbuffer of a Keras model: float32, no quantization, dynamic batch."""
    import tensorflow as tf

    with tempfile.TemporaryDirectory(prefix="segwatch-tflite-") as tmp:
        model.export(tmp, format="tf_saved_model", verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(tmp)
        return converter.convert()


def run_tflite(tflite_bytes: bytes, inputs: np.ndarray) -> np.ndarray:
    """Outputs of the LiteRT interpreter (XNNPACK, as the agent runs it) for ``inputs``."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=tflite_bytes, num_threads=1)
    index = interpreter.get_input_details()[0]["index"]
    interpreter.resize_tensor_input(index, list(inputs.shape), strict=True)
    interpreter.allocate_tensors()
    interpreter.set_tensor(index, np.ascontiguousarray(inputs, dtype=np.float32))
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"]).copy()


def check_tflite_parity(tflite_bytes: bytes, inputs: np.ndarray,
                        expected: np.ndarray) -> float:
    """Largest difference between LiteRT's outputs and ``expected`` (Keras's).

    Raises ParityError above ``PARITY_TOLERANCE``.
    """
    got = run_tflite(tflite_bytes, inputs)
    if got.shape != expected.shape:
        raise ParityError(f"LiteRT output shape {got.shape} != Keras {expected.shape}")
    error = float(np.abs(got - expected).max())
    if not error <= PARITY_TOLERANCE:
        raise ParityError(f"LiteRT and Keras differ by {error:.3e} on the reference inputs "
                          f"(tolerance {PARITY_TOLERANCE:.0e}); bundle not written")
    return error


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
                  real_inputs: np.ndarray | None = None, tflite: bool = True) -> Path:
    """Write a verified bundle for ``model`` to ``out_dir`` (replacing it) and return it.

    ``metadata`` holds the task's fields (channels, classes, activation, normalization,
    snapshot_length, hop, sample_period, threshold, min_duration, training, ...); export adds
    format, model length, files, checksums and the model id. ``tflite=False`` leaves out
    ``model.tflite`` (the agent then cannot use LiteRT for this bundle).
    """
    out_dir = Path(out_dir)
    onnx_bytes = to_onnx(model)
    inputs = reference_inputs(model, real_inputs)
    outputs, error = check_parity(model, onnx_bytes, inputs)
    log.info("parity check passed: max |ONNX - Keras| = %.2e", error)
    tflite_bytes = None
    if tflite:
        tflite_bytes = to_tflite(model)
        tflite_error = check_tflite_parity(tflite_bytes, inputs, outputs)
        log.info("LiteRT parity check passed: max |LiteRT - Keras| = %.2e", tflite_error)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".bundle-", dir=out_dir.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; an agent may run as another user
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
        if tflite_bytes is not None:
            (staging / TFLITE_FILE).write_bytes(tflite_bytes)
            meta["files"][TFLITE_FILE] = sha256_file(staging / TFLITE_FILE)
            meta["tflite_parity_max_abs_error"] = tflite_error
        (staging / METADATA).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        load_bundle(staging)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out_dir


def _onnx_layer_weights(onnx_path: Path) -> dict[str, dict[str, np.ndarray]]:
    """Weights of the trainer's Conv1D and BatchNormalization layers, by Keras layer name.

    tf2onnx keeps the Keras layer scopes in node names (``<model>/<layer>_1/convolution``,
    ``.../BiasAdd`` or ``.../Add`` where the activation is fused, ``.../batchnorm/mul_1``,
    ``.../batchnorm/add_1``); the second input of
    each of those nodes is a constant. Inference-mode batch normalization is a multiply and
    an add, so it comes back as a scale and an offset.
    """
    import re

    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    pattern = re.compile(r"/([A-Za-z0-9_]+?)(?:_\d+)?/(convolution|BiasAdd|Add|batchnorm/mul_1|"
                         r"batchnorm/add_1)$")
    roles = {"convolution": "kernel", "BiasAdd": "bias", "Add": "bias",
             "batchnorm/mul_1": "scale", "batchnorm/add_1": "offset"}
    layers: dict[str, dict[str, np.ndarray]] = {}
    for node in graph.node:
        match = pattern.search(node.name)
        if match and len(node.input) > 1 and node.input[1] in constants:
            layers.setdefault(match.group(1), {})[roles[match.group(2)]] = \
                constants[node.input[1]]
    return layers


def keras_from_onnx_unet(bundle_dir: str | Path):
    """The Keras U-Net of a bundle, rebuilt from the weights in its ONNX graph."""
    from trainer.unet import build_unet

    bundle = load_bundle(bundle_dir)
    if bundle.metadata.get("architecture") != "unet":
        raise ValueError(f"{bundle_dir}: architecture {bundle.metadata.get('architecture')!r}; "
                         "only U-Net bundles can be rebuilt from their ONNX graph")
    model = build_unet(len(bundle.channels), len(bundle.classes), bundle.activation,
                       bundle.model_length)
    found = _onnx_layer_weights(bundle.model_file)
    for layer in model.layers:
        if not layer.weights:
            continue
        weights = found.get(layer.name)
        if weights is None:
            raise ValueError(f"{bundle.model_file}: no weights for layer {layer.name!r}")
        if layer.__class__.__name__ == "Conv1D":
            # ONNX Conv kernel (out, in, 1, k) -> Keras Conv1D kernel (k, in, out).
            kernel = weights["kernel"][:, :, 0, :].transpose(2, 1, 0)
            layer.set_weights([kernel, weights["bias"].reshape(-1)])
        elif layer.__class__.__name__ == "BatchNormalization":
            # y = scale * x + offset: gamma = scale, beta = offset, mean 0, variance 1 - eps.
            scale, offset = weights["scale"].reshape(-1), weights["offset"].reshape(-1)
            variance = np.full_like(scale, 1.0 - layer.epsilon)
            layer.set_weights([scale, offset, np.zeros_like(scale), variance])
        else:
            raise ValueError(f"layer {layer.name!r} ({layer.__class__.__name__}) has weights "
                             "that this rebuild does not know")
    return model


def add_tflite(bundle_dir: str | Path) -> float:
    """Add ``model.tflite`` to a U-Net bundle exported without it; return the parity error.

    The LiteRT file must reproduce the bundle's reference outputs within
    ``PARITY_TOLERANCE``; bundle.json gains the file's sha256. ``model.onnx`` is unchanged,
    and so is the model id.
    """
    bundle_dir = Path(bundle_dir)
    model = keras_from_onnx_unet(bundle_dir)
    bundle = load_bundle(bundle_dir)
    inputs, expected = bundle.reference()
    tflite_bytes = to_tflite(model)
    error = check_tflite_parity(tflite_bytes, inputs, expected)
    staging = bundle_dir / f".{TFLITE_FILE}.tmp"
    staging.write_bytes(tflite_bytes)
    staging.replace(bundle_dir / TFLITE_FILE)
    meta = dict(bundle.metadata)
    meta["files"] = {**meta["files"], TFLITE_FILE: sha256_file(bundle_dir / TFLITE_FILE)}
    meta["tflite_parity_max_abs_error"] = error
    meta_tmp = bundle_dir / f".{METADATA}.tmp"
    meta_tmp.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    meta_tmp.replace(bundle_dir / METADATA)
    load_bundle(bundle_dir)
    log.info("%s: added %s (max |LiteRT - reference| = %.2e)", bundle_dir, TFLITE_FILE, error)
    return error


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m trainer.export")
    sub = parser.add_subparsers(dest="command", required=True)
    add = sub.add_parser("add-tflite", help="add model.tflite to a U-Net bundle without one")
    add.add_argument("bundle", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(f"{args.bundle}: model.tflite added, max |LiteRT - reference| = "
          f"{add_tflite(args.bundle):.2e}")
