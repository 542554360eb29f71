"""The paper's real-data experiments (EMG, SKAB, Dodgers transfer): splits, scoring, report.

The training runs themselves are minutes long (``segwatch-train emg``, ``skab``,
``dodgers-transfer``); these tests check, in seconds, the parts that decide what the
figures mean: that splits never leak, that predictions line up with the points they score,
and that the results files render.
"""

import json

import numpy as np
import pytest

from agent.snapshot import Normalizer
from trainer import dodgers_transfer, emg, skab
from trainer.datasets import (EmgRecording, SkabRun, emg_classes, emg_mask, emg_windows,
                              read_skab, read_skab_anomaly_free)
from trainer.report import write_report

from conftest import SHARED_DATA

SKAB_DIR = SHARED_DATA / "skab"


@pytest.fixture(scope="module")
def skab_runs():
    if not SKAB_DIR.exists():
        pytest.skip(f"the shared data set is not here: expected {SKAB_DIR}")
    return read_skab(SKAB_DIR)


def test_skab_folds_hold_every_run_once_and_every_folder(skab_runs):
    folds = skab.skab_folds(skab_runs)
    assert len(folds) == len(skab_runs) == 32
    assert set(folds) == {0, 1, 2}
    for fold in range(skab.FOLDS):
        test = {r.name for r, f in zip(skab_runs, folds) if f == fold}
        train = {r.name for r, f in zip(skab_runs, folds) if f != fold}
        assert not test & train
        # Every folder is tested in every fold, in near-equal parts.
        assert {name.split("/")[0] for name in test} == {"valve1", "valve2", "other"}
    for folder in ("valve1", "valve2", "other"):
        counts = np.bincount([f for r, f in zip(skab_runs, folds)
                              if r.name.startswith(folder)])
        assert counts.max() - counts.min() <= 1
    # Seeds 1, 2, 3 test the three folds: every experiment is tested exactly once.
    tested = [r.name for seed in (1, 2, 3) for r, f in zip(skab_runs, folds)
              if f == (seed - 1) % skab.FOLDS]
    assert sorted(tested) == sorted(r.name for r in skab_runs)
    free = read_skab_anomaly_free(SKAB_DIR)
    assert free.name not in tested


def _run(ts, anomaly, name="valve1/0"):
    values = np.column_stack([np.sin(np.arange(len(ts)) / 7.0 + c) for c in range(8)])
    anomaly = np.asarray(anomaly, np.int8)
    return SkabRun(name, np.asarray(ts, float), values, list(skab.SKAB_CHANNELS), anomaly,
                   np.zeros_like(anomaly))


def test_skab_grid_leaves_missing_seconds_empty_and_keeps_labels():
    ts = 1_600_000_000 + np.array([0, 1, 3, 4, 5, 9])  # a 2 s step and a 4 s gap
    run = _run(ts, [0, 0, 1, 1, 0, 0])
    values, mask = skab.on_grid(run)
    assert values.shape == (10, 8)
    assert np.isnan(values[[2, 6, 7, 8]]).all()
    assert np.array_equal(values[[0, 1, 3, 4, 5, 9]], run.values)
    # A missing slot takes the label of the row before it.
    assert mask[:, 0].tolist() == [0, 0, 0, 1, 1, 0, 0, 0, 0, 0]


def test_skab_scores_alarms_by_event_and_by_row():
    ts = 1_600_000_000 + np.arange(100.0)
    anomaly = np.zeros(100, np.int8)
    anomaly[40:60] = 1
    run = _run(ts, anomaly)
    # One alarm over rows 50-69 (half inside the anomaly), one false alarm over rows 80-84.
    spans = [(ts[50], ts[69]), (ts[80], ts[84])]
    assert skab.rows_alarmed(ts, spans).sum() == 25
    result = skab.score([run], [spans])
    assert (result["events"], result["detected"], result["false_alarms"]) == (1, 1, 1)
    assert (result["tp"], result["fp"], result["fn"], result["tn"]) == (10, 15, 10, 65)
    assert result["f1"] == pytest.approx(10 / (10 + (10 + 15) / 2))
    assert result["far"] == pytest.approx(100 * 15 / 80)
    assert result["mar"] == pytest.approx(50.0)
    # No alarm at all: the event is missed and every anomalous row too.
    missed = skab.score([run], [[]])
    assert (missed["detected"], missed["false_alarms"], missed["mar"]) == (0, 0, 100.0)


def test_skab_training_batches_are_normalized_snapshots_with_labels(skab_runs):
    x, y = next(skab.training_batches(skab_runs[:3], 8, seed=1))
    assert x.shape == (8, skab.MODEL_LENGTH, 8) and y.shape == (8, skab.MODEL_LENGTH, 1)
    assert np.isfinite(x).all() and np.abs(x).max() <= skab.CLIP
    # Per-snapshot normalization: each channel of a snapshot has mean 0.
    assert np.abs(x.mean(axis=1)).max() < 1e-3
    assert set(np.unique(y)) <= {0.0, 1.0}


def _recording(seconds=12.0, seed=0):
    """A fake EMG recording at ~1 kHz rows whose labels change every 1.5 s."""
    rng = np.random.default_rng(seed)
    ts = np.cumsum(rng.uniform(0.0008, 0.0012, int(seconds * 1000)))
    labels = np.array([(0, 2, 1, 3, 4, 5, 6, 0)[int(t / 1.5) % 8] for t in ts])
    return EmgRecording("99", 1, ts, rng.normal(0, 1e-4, (len(ts), 8)), labels)


def test_emg_test_snapshots_cover_every_point_and_stitch_back_in_place():
    recording = _recording()
    normalizer = Normalizer("fixed", center=np.zeros(8), scale=np.full(8, 1e-4))
    x, mask, starts = emg.recording_inputs(recording, normalizer)
    same_x, same_y = emg_windows([recording], emg.LENGTH, emg.TEST_HOP, normalizer=normalizer)
    assert np.array_equal(x, same_x)
    assert starts[-1] == len(mask) - emg.LENGTH
    # Stitching the windows' masks rebuilds the recording's mask point for point.
    stitched = emg.stitch(same_y, starts, len(mask))
    assert np.array_equal(stitched, mask)
    # Overlaps are averaged: a constant output per snapshot k averages where they overlap.
    outputs = np.stack([np.full((emg.LENGTH, 1), float(k)) for k in range(len(starts))])
    mean = emg.stitch(outputs, starts, len(mask))[:, 0]
    assert mean[0] == 0.0 and mean[emg.TEST_HOP] == pytest.approx(0.5)


def test_emg_training_batches_keep_channel_ratios_under_gain():
    recording = _recording()
    normalizer = Normalizer("fixed", center=np.zeros(8), scale=np.full(8, 1e-4))
    x, y = next(emg.training_batches([recording], 4, seed=3, normalizer=normalizer))
    assert x.shape == (4, emg.LENGTH, 8) and y.shape == (4, emg.LENGTH, len(emg_classes()))
    assert np.array_equal(y.sum(axis=2), np.ones((4, emg.LENGTH)))  # single label
    assert np.abs(x).max() <= normalizer.clip


def test_emg_figure_snapshots_show_every_gesture_present():
    truths = [emg_mask(_recording(seconds=40.0, seed=s).labels[::5]) for s in range(2)]
    chosen = emg.figure_snapshots(truths, count=6)
    assert len(chosen) == 6
    shown = set()
    for r, s in chosen:
        shown |= set(np.flatnonzero(truths[r][s:s + emg.LENGTH, 1:].any(0)).tolist())
    present = set(np.flatnonzero(np.concatenate(truths)[:, 1:].any(0)).tolist())
    assert shown == present


def test_dodgers_transfer_batches_and_strategies():
    values = np.arange(6000, dtype=float)[:, None] % 288
    mask = (values > 200).astype(np.float32)
    normalizer = Normalizer("fixed", center=np.array([144.0]), scale=np.array([80.0]))
    x, y = next(dodgers_transfer.snapshot_batches([(values, mask)], normalizer, 8, 1, False))
    assert x.shape == (8, 1024, 1) and y.shape == (8, 1024, 1)
    with pytest.raises(ValueError, match="strategy must be one of"):
        dodgers_transfer.make_trainer(None, "munet-stages")


def _results(tmp_path):
    seeds = [{"seed": s, "detected": 35 + s % 2, "events": 38, "false_alarms": s,
              "model_id": f"m{s}"} for s in (1, 2, 3)]
    spread = dodgers_transfer._spread(seeds)
    transfer = {
        "command": "segwatch-train dodgers-transfer", "code_version": "abc", "seconds": 600,
        "strategy": "freeze", "base": {"bundle": "models/base-unet", "model_id": "base-1"},
        "training": {"epochs": 12, "snapshots_per_epoch": 4096},
        "operating_point": {"snapshot_length": 2048, "threshold": 0.6},
        "seeds": seeds, "spread": spread, "paper": {"detected": 36, "events": 39},
        "scratch": {"results": "results/dodgers-unet.json", "seeds": seeds, "spread": spread},
        "notes": ["transfer minus scratch, mean over seeds: +0.0 games detected"],
    }
    models = {kind: {"mean": 0.4, "std": 0.05, "paper": 0.6, "strategy": "scratch",
                     "per_seed": [{"iou": 0.35}, {"iou": 0.45}]} for kind in emg.MODELS}
    emg_result = {
        "command": "segwatch-train emg", "code_version": "abc", "seeds": [1, 2], "seconds": 700,
        "data": {"subjects": ["01"] * 10, "grid_ms": 5.0, "snapshot_length": 1024,
                 "classes": emg_classes(), "test_hop": 256},
        "training": {"epochs": 9, "snapshots_per_epoch": 256, "optimizer": "adam 0.001",
                     "loss": "cce + dice", "normalization": "fixed", "augmentation": "gain"},
        "base": None, "models": models,
        "split": {"seeds": [{"seed": 1, "test": ["14", "29", "31"]},
                            {"seed": 2, "test": ["01", "05", "29"]}]},
        "figures": ["docs/figures/emg-munet-transfer.png"], "notes": ["below the paper"],
    }
    pooled = {"runs": 32, "events": 32, "detected": 30, "false_alarms": 2, "f1": 0.61,
              "far": 5.0, "mar": 40.0}
    skab_result = {
        "command": "segwatch-train skab", "code_version": "abc", "seeds": [1, 2, 3],
        "seconds": 650, "data": {"runs": 32}, "split": {"by": "experiment"},
        "operating_point": {"snapshot_length": 512, "hop": 64, "threshold": 0.5,
                            "min_duration": 30.0, "chosen": "a priori"},
        "training": {"epochs": 9, "snapshots_per_epoch": 256, "optimizer": "adam 0.001",
                     "loss": "soft dice"},
        "scratch_baseline": False, "paper": "21 of 22 attacks detected, 3 false alarms",
        "models": {"munet_transfer": {"pooled": pooled, "per_seed": [
            {**pooled, "seed": 1, "fold": 0, "events": 12}]}},
        "leaderboard": {"Conv-AE": {"f1": 0.78, "far": 13.55, "mar": 28.02}},
        "notes": ["not the same protocol"],
    }
    for name, result in (("dodgers-transfer", transfer), ("emg", emg_result),
                         ("skab", skab_result)):
        (tmp_path / f"{name}.json").write_text(json.dumps(result))


def test_report_renders_the_three_experiments(tmp_path):
    _results(tmp_path)
    text = write_report(tmp_path, tmp_path / "results.md").read_text()
    assert "| transfer, freeze | 36, 35, 36 of 38 | 1, 2, 3 | 35.7 | 2.0 |" in text
    assert "| munet transfer | scratch | 60.00 % | 40.00 % ± 5.00 | 35.00 %, 45.00 % |" in text
    assert "seed 1: 14, 29, 31; seed 2: 01, 05, 29" in text
    assert "![emg-munet-transfer](figures/emg-munet-transfer.png)" in text
    assert "| munet transfer, all 32 experiments | 30 of 32 | 2 | 0.61 | 5.00 | 40.00 |" in text
    assert "| Conv-AE | 0.78 | 13.55 | 28.02 |" in text
    assert "Scratch baseline run: no." in text
    assert "- not the same protocol" in text
