"""Model bundles: export, parity check, checksums, and the agent's self-test."""

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

pytest.importorskip("tensorflow", reason="the trainer extra (TensorFlow) is not installed")

from agent.bundle import BundleError, load_bundle  # noqa: E402
from agent.inference import BackendError, load_backend  # noqa: E402
from trainer.export import ParityError, check_parity, export_bundle, to_onnx  # noqa: E402
from trainer.unet import build_unet  # noqa: E402

METADATA = {
    "name": "tiny", "architecture": "unet", "channels": ["a"], "classes": ["spike"],
    "activation": "sigmoid", "sample_period": 1.0, "snapshot_length": 1024, "hop": 256,
    "threshold": 0.5, "normalization": {"mode": "fixed", "center": [0.0], "scale": [1.0]},
}


@pytest.fixture(scope="module")
def model():
    import keras

    keras.utils.set_random_seed(0)
    return build_unet(n_channels=1, n_classes=1)


@pytest.fixture(scope="module")
def bundle_dir(model, tmp_path_factory):
    return export_bundle(model, tmp_path_factory.mktemp("b") / "tiny", METADATA)


def test_round_trip_keeps_metadata_and_outputs(model, bundle_dir):
    bundle = load_bundle(bundle_dir)
    assert bundle.model_id.startswith("tiny-")
    assert bundle.model_length == 1024 and bundle.channels == ["a"]
    assert bundle.metadata["parity_max_abs_error"] <= 1e-4
    backend = load_backend(bundle)  # runs the self-test against the reference outputs
    x = np.random.default_rng(5).normal(size=(3, 1024, 1)).astype(np.float32)
    np.testing.assert_allclose(backend.run(x), model.predict(x, verbose=0), atol=1e-4)


def test_export_refuses_a_graph_that_disagrees_with_keras(model):
    other = build_unet(n_channels=1, n_classes=1)
    other.set_weights([w + 0.05 for w in model.get_weights()])
    onnx_bytes = to_onnx(other)
    x = np.random.default_rng(1).normal(size=(2, 1024, 1)).astype(np.float32)
    with pytest.raises(ParityError, match="differ"):
        check_parity(model, onnx_bytes, x)


def test_tampered_model_file_is_refused(bundle_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(bundle_dir, copy)
    data = bytearray((copy / "model.onnx").read_bytes())
    data[-10] ^= 0xFF
    (copy / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="checksum"):
        load_bundle(copy)


def test_missing_or_broken_metadata_is_refused(bundle_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(bundle_dir, copy)
    meta = json.loads((copy / "bundle.json").read_text())
    del meta["classes"]
    (copy / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="classes"):
        load_bundle(copy)
    (copy / "bundle.json").unlink()
    with pytest.raises(BundleError, match="missing"):
        load_bundle(copy)


def test_self_test_fails_when_reference_outputs_differ(bundle_dir, tmp_path):
    import shutil

    from agent.bundle import sha256_file

    copy = tmp_path / "copy"
    shutil.copytree(bundle_dir, copy)
    with np.load(copy / "reference.npz") as ref:
        inputs, outputs = ref["inputs"], ref["outputs"]
    np.savez_compressed(copy / "reference.npz", inputs=inputs, outputs=outputs + 0.01)
    meta = json.loads((copy / "bundle.json").read_text())
    meta["files"]["reference.npz"] = sha256_file(copy / "reference.npz")
    (copy / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BackendError, match="reference"):
        load_backend(load_bundle(copy))


def test_shipped_dodgers_bundle_loads_and_passes_its_self_test(dodgers_bundle):
    bundle = load_bundle(dodgers_bundle)
    load_backend(bundle)
    assert bundle.classes == ["game_traffic"] and bundle.channels == ["count"]
    assert bundle.metadata["training"]["command"].startswith("segwatch-train dodgers")


def _edit_metadata(bundle_dir, tmp_path, **changes):
    import shutil

    copy = tmp_path / "edited"
    shutil.copytree(bundle_dir, copy)
    meta = json.loads((copy / "bundle.json").read_text())
    meta.update(changes)
    (copy / "bundle.json").write_text(json.dumps(meta))
    return copy


@pytest.mark.parametrize("changes, message", [
    ({"threshold": 7}, "threshold"),
    ({"hop": 0}, "hop"),
    ({"normalization": {"mode": "fixed", "center": [0.0], "scale": [0.0]}}, "scale positive"),
])
def test_metadata_values_that_would_mislead_the_agent_are_refused(bundle_dir, tmp_path,
                                                                 changes, message):
    with pytest.raises(BundleError, match=message):
        load_bundle(_edit_metadata(bundle_dir, tmp_path, **changes))


def test_classes_must_match_the_model_outputs(bundle_dir, tmp_path):
    bundle = load_bundle(_edit_metadata(bundle_dir, tmp_path, classes=["a", "b", "c"]))
    with pytest.raises(BackendError, match="declares"):
        load_backend(bundle)
