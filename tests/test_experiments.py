"""The transfer experiments end to end, tiny: pretrain a base bundle on streamed synthetic
series, transfer it (unusual shapes; a plant's CSV), export, and run the bundles through the
agent's streaming pipeline."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import json  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

pytest.importorskip("keras", reason="the trainer extra (TensorFlow) is not installed")

from agent.bundle import load_bundle  # noqa: E402
from trainer import curves, finetune, nab, pretrain  # noqa: E402
from trainer.synthetic import CLASSES  # noqa: E402

LENGTH = 256  # the shortest model length of the U-Net (4 ** 4)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A base bundle from a tiny pretraining run (64 series, one epoch)."""
    folder = tmp_path_factory.mktemp("pretrain")
    report = pretrain.run(folder / "base", folder / "pretrain.json", series=64, epochs=1,
                          batch=16, seed=0, command="test", length=LENGTH,
                          validation_series=16, test_series=16, figure=None, tflite=False,
                          run_eagerly=True)
    return folder / "base", report


def test_pretraining_exports_a_versioned_deployable_bundle_with_its_keras_model(base):
    folder, report = base
    bundle = load_bundle(folder)

    assert bundle.model_id.startswith(f"base-unet-v{pretrain.VERSION}-")
    assert bundle.classes == list(CLASSES)
    assert bundle.metadata["normalization"]["mode"] == "snapshot"
    assert bundle.metadata["hop"] == LENGTH // 4
    assert bundle.metadata["threshold"] in pretrain.THRESHOLDS
    training = bundle.metadata["training"]
    assert training["series"] == 64 and training["epochs"] == 1 and training["seed"] == 0
    assert training["command"] == "test" and training["seconds"] > 0

    keras_model = pretrain.load_keras(folder)
    inputs, outputs = bundle.reference()
    np.testing.assert_allclose(keras_model.predict(inputs, verbose=0), outputs, atol=1e-4)

    written = json.loads((folder.parent / "pretrain.json").read_text())
    assert written["model_id"] == bundle.model_id
    assert set(written["test"]["per_class"]) == set(CLASSES)
    assert written["data"]["series_seen"] == 64


def test_a_changed_keras_file_is_refused(base, tmp_path):
    import shutil

    folder, _ = base
    copy = tmp_path / "base"
    shutil.copytree(folder, copy)
    keras_file = copy / pretrain.KERAS_FILE
    keras_file.write_bytes(keras_file.read_bytes() + b"\0")

    with pytest.raises(ValueError, match="checksum"):
        pretrain.load_keras(copy)


def test_curves_experiment_scores_scratch_and_both_transfer_strategies(base, tmp_path):
    folder, _ = base
    results = tmp_path / "curves.json"

    report = curves.run(folder, results, seeds=(1,), command="test", epochs=1, n_train=8,
                        n_test=8, length=LENGTH, figures=tmp_path, run_eagerly=True)

    assert set(report["scores"]) == {"scratch", "transfer-multipliers", "transfer-freeze"}
    for variant in report["scores"].values():
        assert 0.0 <= variant["mean"] <= 1.0 and variant["seeds"][0]["seed"] == 1
    assert json.loads(results.read_text())["data"]["train"] == "first 8"
    assert (tmp_path / "synthetic-curves-transfer-freeze.png").stat().st_size > 0


def test_stream_scores_are_the_agents_ensembled_scores_row_by_row(base):
    folder, _ = base
    model = nab.load_onnx(folder)
    rng = np.random.default_rng(3)
    n = 4 * LENGTH
    ts = 1_700_000_000.0 + np.arange(n)
    values = np.sin(np.arange(n) / 9.0) + 0.05 * rng.normal(size=n)

    streamed = nab.stream_scores(model, "a", ts, values[:, None], ["value"])

    assert streamed.scores.shape == (n, len(CLASSES))
    scored = np.isfinite(streamed.scores).all(axis=1)
    # At most the first eighth of a snapshot is masked as the stream's start; the rest is
    # scored, to the last row.
    assert not scored[0] and scored[LENGTH // 8:].all()
    assert ((streamed.scores[scored] >= 0) & (streamed.scores[scored] <= 1)).all()
    assert streamed.counters["snapshots_scored"] >= n // (LENGTH // 4) - 1


def test_nab_anomaly_score_is_the_largest_class_score():
    scores = np.array([[0.1, 0.7, 0.2], [np.nan, np.nan, np.nan], [0.3, np.nan, 0.1]])
    got = nab.anomaly_score(scores)
    assert got[0] == 0.7 and np.isnan(got[1]) and got[2] == 0.3


def _plant_csv(folder, n=3000, period=10.0):
    """Two channels at 10 s with level faults, and their spans CSV."""
    rng = np.random.default_rng(0)
    t0 = 1_717_200_000.0
    ts = t0 + period * np.arange(n)
    flow = 5.0 + np.sin(np.arange(n) / 30.0) + 0.1 * rng.normal(size=n)
    pressure = 2.0 + 0.05 * rng.normal(size=n)
    spans = []
    for start in range(200, n - 100, 450):
        flow[start:start + 60] -= 3.0
        spans.append((ts[start], ts[start + 59]))
    pressure[1000] = np.nan  # an empty cell: a missing sample
    lines = ["time,flow,pressure"] + [
        f"{t:.0f},{f:.4f},{'' if np.isnan(p) else f'{p:.4f}'}"
        for t, f, p in zip(ts, flow, pressure)]
    (folder / "plant.csv").write_text("\n".join(lines) + "\n")
    (folder / "spans.csv").write_text("start,end,class\n" + "".join(
        f"{a:.0f},{b:.0f},low_flow\n" for a, b in spans))
    return ts


def _task(folder, base_folder, channels, **extra):
    lines = [
        "name: plant-test",
        f"base: {base_folder}",
        "out: out",
        "data:",
        "  files: plant.csv",
        f"  channels: [{', '.join(channels)}]",
        "labels: spans.csv",
        "classes: {low_flow: level}",
        "augmentations: [jitter, dropout]",
        "epochs: 1",
        "snapshots_per_epoch: 8",
        "batch: 4",
        f"snapshot_length: {LENGTH}",
        f"model_length: {LENGTH}",
        "normalization: fixed",
        "split: {test_fraction: 0.3}",
    ] + [f"{k}: {v}" for k, v in extra.items()]
    path = folder / "task.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("channels,architecture", [(["flow"], "unet"),
                                                   (["flow", "pressure"], "munet")])
def test_finetune_on_a_plant_csv_exports_a_bundle_and_its_holdout_evaluation(
        base, tmp_path, channels, architecture):
    base_folder, _ = base
    _plant_csv(tmp_path)
    config = _task(tmp_path, base_folder, channels)

    evaluation = finetune.run(config, "test", tflite=False, run_eagerly=True)

    bundle = load_bundle(tmp_path / "out")
    assert bundle.metadata["architecture"] == architecture
    assert bundle.channels == channels and bundle.classes == ["low_flow"]
    assert bundle.metadata["training"]["base_model_id"] == load_bundle(base_folder).model_id
    written = json.loads((tmp_path / "out" / finetune.EVALUATION_FILE).read_text())
    assert written == evaluation
    # The holdout starts at row round(0.7 * 2,999) = 2,099: 901 rows, with the fault at
    # row 2,450 (the one at 2,000 ends before the cut).
    assert evaluation["split"]["holdout_rows"] == 901
    assert evaluation["events"]["events"] == 1
    assert evaluation["events"]["detected"] in (0, 1)
    assert set(evaluation["iou"]["per_class"]) == {"low_flow"}


def test_task_file_errors_name_the_key_and_the_fix(tmp_path, base):
    base_folder, _ = base
    _plant_csv(tmp_path)
    config = _task(tmp_path, base_folder, ["flow"], colour="blue")
    with pytest.raises(finetune.TaskError, match="key 'colour': unknown key"):
        finetune.load_task(config)

    config = _task(tmp_path, base_folder, ["flow"], strategy="gentle")
    with pytest.raises(finetune.TaskError, match="key 'strategy'.*multipliers"):
        finetune.load_task(config)

    config = _task(tmp_path, base_folder, ["level"])
    with pytest.raises(finetune.TaskError, match="no column 'level'"):
        finetune.run(config, "test", tflite=False, run_eagerly=True)


def test_a_forbidden_augmentation_is_refused_before_training(tmp_path, base):
    base_folder, _ = base
    _plant_csv(tmp_path)
    config = _task(tmp_path, base_folder, ["flow"])
    text = config.read_text().replace("[jitter, dropout]", "[random_trend]")
    config.write_text(text)

    with pytest.raises(ValueError, match="random_trend.*low_flow"):
        finetune.run(config, "test", tflite=False, run_eagerly=True)


def test_spans_outside_the_task_classes_are_refused(tmp_path):
    path = tmp_path / "spans.csv"
    path.write_text("start,end,class\n2024-05-01 10:00:00,2024-05-01 10:05:00,leak\n")
    with pytest.raises(finetune.TaskError, match="class 'leak' is not one of"):
        finetune.read_spans(path, ["low_flow"])

    path.write_text("start,end,class\n2024-05-01 10:00:00,2024-05-01T10:05:00Z,leak\n")
    spans = finetune.read_spans(path, ["leak"])
    assert spans[0].end - spans[0].start == 300.0
