"""Transfer learning: weights really transfer, frozen sections stay put, learning-rate
multipliers scale each section's updates, and transferred MU-Nets export to bundles the
agent runs."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

keras = pytest.importorskip("keras", reason="the trainer extra (TensorFlow) is not installed")

from trainer.transfer import (LR_MULTIPLIERS, SECTIONS, cce_dice_loss, default_loss,  # noqa: E402
                              fine_tune, plan_stages, section_of, transfer_munet,
                              transfer_unet)
from trainer.unet import build_munet, build_unet  # noqa: E402

LENGTH = 256


@pytest.fixture(scope="module")
def base():
    """A univariate U-Net with random (non-initial) weights, BatchNorm statistics included,
    so that equal values after transfer mean copied values."""
    keras.utils.set_random_seed(0)
    model = build_unet(model_length=LENGTH, name="base")
    rng = np.random.default_rng(0)
    for variable in model.weights:
        shape = tuple(variable.shape)
        if "variance" in variable.path:
            variable.assign(rng.uniform(0.5, 1.5, shape).astype("float32"))
        else:
            variable.assign((0.1 * rng.normal(size=shape)).astype("float32"))
    return model


def data(channels=1, outputs=1, n=8, seed=0, softmax=False):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, LENGTH, channels)).astype("float32")
    if softmax:
        y = np.eye(outputs, dtype="float32")[rng.integers(0, outputs, (n, LENGTH))]
    else:
        y = (rng.random((n, LENGTH, outputs)) > 0.7).astype("float32")
    return x, y


def weights_by_layer(model):
    return {layer.name: [np.array(w) for w in layer.get_weights()]
            for layer in model.layers if layer.weights}


def changed(before, after, name):
    return any(not np.array_equal(a, b) for a, b in zip(before[name], after[name]))


def layers_in(model, sections):
    return [layer.name for layer in model.layers
            if layer.weights and section_of(layer.name) in sections]


# Sections and multipliers ------------------------------------------------------------------


def test_ten_sections_with_squared_multipliers():
    assert SECTIONS == ("enc1", "enc2", "enc3", "enc4", "enc5", "dec4", "dec3", "dec2", "dec1",
                        "out")
    assert LR_MULTIPLIERS == (0.01, 0.04, 0.09, 0.16, 0.25, 0.36, 0.49, 0.64, 0.81, 1.0)


def test_every_weighted_layer_belongs_to_a_section():
    assert section_of("enc3_b2_bn") == "enc3"
    assert section_of("ch12_enc4_b1_conv") == "enc4"
    assert section_of("dec1_b2_conv") == "dec1" and section_of("out_conv") == "out"
    assert section_of("sample_norm") is None and section_of("ch0_slice") is None
    model = build_munet(2, model_length=LENGTH)
    assert all(section_of(layer.name) for layer in model.layers if layer.weights)


# U-Net transfer ----------------------------------------------------------------------------


def test_unet_transfer_copies_every_layer_but_the_output(base):
    model = transfer_unet(base, n_classes=3, activation="sigmoid")
    source = weights_by_layer(base)
    copied = 0
    for name, weights in weights_by_layer(model).items():
        if name == "out_conv":
            continue
        for got, expected in zip(weights, source[name]):
            np.testing.assert_array_equal(got, expected)
        copied += 1
    assert copied == len(source) - 1
    assert model.get_layer("out_conv").kernel.shape == (1, 16, 3)
    assert base.get_layer("out_conv").kernel.shape == (1, 16, 1)


def test_unet_transfer_initializes_the_output_section_afresh(base):
    model = transfer_unet(base, n_classes=1, activation="sigmoid")
    assert not np.array_equal(model.get_layer("out_conv").get_weights()[0],
                              base.get_layer("out_conv").get_weights()[0])


def test_unet_transfer_sets_sample_norm_and_softmax_outputs(base):
    model = transfer_unet(base, n_classes=2, activation="softmax", sample_norm=True)
    assert model.get_layer("sample_norm") is not None
    assert model.output_shape == (None, LENGTH, 3)
    np.testing.assert_array_equal(model.get_layer("enc1_b1_conv").get_weights()[0],
                                  base.get_layer("enc1_b1_conv").get_weights()[0])


# MU-Net transfer ---------------------------------------------------------------------------


def test_munet_transfer_copies_the_base_encoder_into_every_channel(base):
    model = transfer_munet(base, n_channels=3, n_classes=2, activation="softmax")
    source = weights_by_layer(base)
    target = weights_by_layer(model)
    for c in range(3):
        for name in [n for n in source if section_of(n) in ("enc1", "enc2", "enc3", "enc4")]:
            for got, expected in zip(target[f"ch{c}_{name}"], source[name]):
                np.testing.assert_array_equal(got, expected)

    # Shared layers of the base's shape are copied as they are.
    for name in ("enc5_b1_bn", "enc5_b2_conv", "dec4_b2_conv", "dec1_b1_bn", "dec1_b2_conv"):
        for got, expected in zip(target[name], source[name]):
            np.testing.assert_array_equal(got, expected)


def test_munet_transfer_tiles_the_merged_input_kernels(base):
    model = transfer_munet(base, n_channels=3, n_classes=1, activation="sigmoid")
    kernel, bias = model.get_layer("enc5_b1_conv").get_weights()
    base_kernel, base_bias = base.get_layer("enc5_b1_conv").get_weights()
    np.testing.assert_allclose(kernel, np.tile(base_kernel, (1, 3, 1)) / 3, rtol=1e-6)
    np.testing.assert_array_equal(bias, base_bias)

    # Decoder: upsampled rows copied, skip rows tiled over the channels.
    kernel = model.get_layer("dec2_b1_conv").get_weights()[0]
    base_kernel = base.get_layer("dec2_b1_conv").get_weights()[0]
    np.testing.assert_array_equal(kernel[:, :64], base_kernel[:, :64])
    np.testing.assert_allclose(kernel[:, 64:], np.tile(base_kernel[:, 64:], (1, 3, 1)) / 3,
                               rtol=1e-6)


def test_munet_transfer_on_identical_channels_computes_what_the_base_computes(base):
    model = transfer_munet(base, n_channels=3, n_classes=1, activation="sigmoid")
    features = keras.Model(model.input, model.get_layer("dec1_b2_relu").output)
    base_features = keras.Model(base.input, base.get_layer("dec1_b2_relu").output)
    x = data()[0][:2]
    np.testing.assert_allclose(np.array(features(np.repeat(x, 3, axis=2), training=False)),
                               np.array(base_features(x, training=False)), atol=1e-4)


def test_munet_transfer_fresh_leaves_the_merged_input_kernels_random(base):
    model = transfer_munet(base, n_channels=2, n_classes=1, activation="sigmoid",
                           shared_init="fresh")
    kernel = model.get_layer("enc5_b1_conv").get_weights()[0]
    base_kernel = base.get_layer("enc5_b1_conv").get_weights()[0]
    assert not np.allclose(kernel, np.tile(base_kernel, (1, 2, 1)) / 2)
    np.testing.assert_array_equal(model.get_layer("ch1_enc4_b2_conv").get_weights()[0],
                                  base.get_layer("enc4_b2_conv").get_weights()[0])


def test_munet_transfer_needs_a_univariate_unet_base(base):
    with pytest.raises(ValueError, match="univariate"):
        transfer_munet(build_unet(n_channels=2, model_length=LENGTH), 3, 1, "sigmoid")
    with pytest.raises(ValueError, match="not a MU-Net"):
        transfer_unet(build_munet(1, model_length=LENGTH), 1, "sigmoid")


# Fine-tuning -------------------------------------------------------------------------------


def test_freeze_holds_the_first_two_sections_then_trains_every_section(base):
    model = transfer_unet(base, n_classes=1, activation="sigmoid")
    before = weights_by_layer(model)
    after_epoch = {}
    history = fine_tune(model, data(), epochs=2, strategy="freeze", batch_size=8,
                        run_eagerly=True,
                        on_epoch_end=lambda epoch, _: after_epoch.update(
                            {epoch: weights_by_layer(model)}))
    assert history["stages"] == [{"epochs": 1, "frozen": ["enc1", "enc2"]},
                                 {"epochs": 1, "frozen": []}]
    assert history["stage"] == [1, 2] and len(history["loss"]) == 2

    # Epoch 1: sections 1 and 2 unchanged, BatchNorm statistics included; the rest trains.
    frozen = layers_in(model, ("enc1", "enc2"))
    assert len(frozen) == 8
    assert not any(changed(before, after_epoch[1], name) for name in frozen)
    for name in layers_in(model, SECTIONS[2:]):
        assert changed(before, after_epoch[1], name), name

    # Epoch 2: every section trains.
    assert all(changed(after_epoch[1], after_epoch[2], name)
               for name in layers_in(model, SECTIONS))
    assert all(layer.trainable for layer in model.layers)


@pytest.mark.parametrize("stage_epochs, frozen", [
    ((1, 0, 0), ("enc1", "enc2", "enc3", "enc4")),
    ((0, 1, 0), ("enc1", "enc2")),
])
def test_munet_stages_freeze_the_channel_encoders(base, stage_epochs, frozen):
    model = transfer_munet(base, n_channels=2, n_classes=1, activation="sigmoid")
    before = weights_by_layer(model)
    fine_tune(model, data(channels=2), epochs=1, strategy="munet-stages",
              stage_epochs=stage_epochs, batch_size=8, run_eagerly=True)
    after = weights_by_layer(model)
    held = layers_in(model, frozen)
    assert len(held) == 2 * 4 * len(frozen)  # 2 channels x (2 convs + 2 batchnorms) per section
    assert not any(changed(before, after, name) for name in held)
    trained = layers_in(model, set(SECTIONS) - set(frozen))
    assert all(changed(before, after, name) for name in trained)


def test_munet_stages_default_to_thirds_of_the_epochs():
    stages = plan_stages("munet-stages", 7)
    assert [s.epochs for s in stages] == [2, 2, 3]
    assert [sorted(s.frozen) for s in stages] == [["enc1", "enc2", "enc3", "enc4"],
                                                  ["enc1", "enc2"], []]


def _gradients(model, x, y):
    import tensorflow as tf

    with tf.GradientTape() as tape:
        loss = keras.ops.mean(default_loss(model)(y, model(x, training=True)))
    variables = model.trainable_variables
    return {v.path: np.array(g) for v, g in zip(variables, tape.gradient(loss, variables))}


def test_multipliers_scale_each_sections_update(base):
    """With plain SGD one step moves every weight by -lr * multiplier * gradient."""
    model = transfer_unet(base, n_classes=1, activation="sigmoid")
    x, y = data(n=4)
    gradients = _gradients(model, x, y)
    before = {v.path: np.array(v) for v in model.trainable_variables}
    lr = 0.1
    fine_tune(model, (x, y), epochs=1, strategy="multipliers", lr=lr, batch_size=4,
              optimizer="sgd")
    for section, multiplier in zip(SECTIONS, LR_MULTIPLIERS):
        kernels = [f"{name}/kernel" for name in layers_in(model, (section,))
                   if name.endswith("conv")]
        update = np.concatenate([(np.array(model.get_layer(k.split("/")[0]).kernel)
                                  - before[k]).ravel() for k in kernels])
        step = np.concatenate([-lr * gradients[k].ravel() for k in kernels])
        ratio = np.dot(update, step) / np.dot(step, step)
        assert ratio == pytest.approx(multiplier, rel=1e-2), section


def test_multipliers_with_adam_order_the_updates_by_section(base):
    model = transfer_unet(base, n_classes=1, activation="sigmoid")
    before = weights_by_layer(model)
    lr = 1e-3
    fine_tune(model, data(n=4), epochs=1, strategy="multipliers", lr=lr, batch_size=4,
              run_eagerly=True)
    after = weights_by_layer(model)
    sizes = []
    for section in SECTIONS:
        convs = [n for n in layers_in(model, (section,)) if n.endswith("conv")]
        moves = np.concatenate([np.abs(after[n][0] - before[n][0]).ravel() for n in convs])
        # Kernel taps that see only padding (enc5 works on one point here) do not move.
        sizes.append(np.median(moves[moves > 0]) / lr)
    assert sizes == sorted(sizes)
    # Adam's first step moves a weight by about its learning rate.
    assert sizes[0] == pytest.approx(LR_MULTIPLIERS[0], rel=0.3)
    assert sizes[-1] == pytest.approx(LR_MULTIPLIERS[-1], rel=0.3)


def test_scratch_trains_from_a_dataset_with_steps_and_reports_history():
    import tensorflow as tf

    keras.utils.set_random_seed(3)
    model = build_unet(n_classes=2, activation="softmax", model_length=LENGTH)
    x, y = data(outputs=3, softmax=True)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(4).repeat()
    history = fine_tune(model, dataset, epochs=2, strategy="scratch", steps_per_epoch=2,
                        val_data=(x, y), run_eagerly=True)
    assert len(history["loss"]) == len(history["val_loss"]) == len(history["seconds"]) == 2
    assert history["total_seconds"] >= sum(history["seconds"])
    assert all(np.isfinite(history["loss"])) and history["strategy"] == "scratch"


def test_an_infinite_dataset_needs_steps_per_epoch():
    import tensorflow as tf

    model = build_unet(model_length=LENGTH)
    dataset = tf.data.Dataset.from_tensor_slices(data()).batch(4).repeat()
    with pytest.raises(ValueError, match="steps per epoch"):
        fine_tune(model, dataset, epochs=1, strategy="all")


def test_bad_strategies_and_stage_counts_are_refused():
    with pytest.raises(ValueError, match="unknown strategy"):
        plan_stages("warm", 3)
    with pytest.raises(ValueError, match="add up"):
        plan_stages("munet-stages", 3, stage_epochs=(1, 1, 2))
    with pytest.raises(ValueError, match="freeze_epochs"):
        plan_stages("freeze", 3, freeze_epochs=4)


def test_softmax_models_default_to_cross_entropy_plus_dice():
    model = build_unet(n_classes=2, activation="softmax", model_length=LENGTH)
    assert default_loss(model) is cce_dice_loss
    y = data(outputs=3, softmax=True)[1]
    perfect = float(keras.ops.mean(cce_dice_loss(y, np.clip(y, 1e-7, 1.0))))
    uniform = float(keras.ops.mean(cce_dice_loss(y, np.full_like(y, 1 / 3))))
    assert perfect < 0.01 < uniform


# Export and the agent --------------------------------------------------------------------


def _metadata(channels, classes, activation, name):
    return {
        "name": name, "architecture": name.split("-")[0], "channels": channels,
        "classes": classes, "activation": activation, "sample_period": 1.0,
        "snapshot_length": LENGTH, "hop": LENGTH, "threshold": 0.0, "hysteresis": 0.1,
        "normalization": {"mode": "fixed", "center": [0.0] * len(channels),
                          "scale": [1.0] * len(channels)},
    }


def test_transferred_munet_bundle_runs_in_the_agent(base, tmp_path):
    from agent.bundle import load_bundle
    from agent.inference import load_backend
    from agent.pipeline import AssetPipeline, Pipeline, run_series, settings_from_bundle
    from trainer.export import export_bundle

    model = transfer_munet(base, n_channels=3, n_classes=2, activation="softmax")
    fine_tune(model, data(channels=3, outputs=3, n=4, softmax=True), epochs=1,
              strategy="munet-stages", stage_epochs=(1, 0, 0), batch_size=4, run_eagerly=True)
    meta = _metadata(["a", "b", "c"], ["gesture_1", "gesture_2"], "softmax", "munet-test")
    bundle = load_bundle(export_bundle(model, tmp_path / "munet", meta))
    backend = load_backend(bundle)  # self-test against the Keras reference outputs
    assert bundle.metadata["parity_max_abs_error"] <= 1e-4

    # A short 3-channel stream: four snapshots, one alarm per class at threshold 0.
    ts = np.arange(4 * LENGTH, dtype=float)
    values = np.stack([np.sin(ts / 9), np.cos(ts / 17), 0.01 * ts - 5], axis=1)
    pipeline = Pipeline([AssetPipeline(settings_from_bundle(bundle, "loop"), bundle,
                                       backend)])
    events = run_series(pipeline, "loop", ts, values, bundle.channels)
    assert pipeline.counters["snapshots_scored"] == 4
    assert sorted(e.class_name for e in events if e.state == "active") == \
        ["gesture_1", "gesture_2"]

    # The stream's scores are the model's class outputs, background dropped.
    x = values.reshape(4, LENGTH, 3).astype("float32")
    np.testing.assert_allclose(bundle.class_scores(backend.run(x)),
                               model.predict(x, verbose=0)[..., 1:], atol=1e-4)


def test_unet_with_sample_norm_exports_with_parity(base, tmp_path):
    from agent.bundle import load_bundle
    from agent.inference import load_backend
    from trainer.export import export_bundle

    model = transfer_unet(base, n_classes=1, activation="sigmoid", sample_norm=True)
    meta = _metadata(["level"], ["spike"], "sigmoid", "unet-test")
    bundle = load_bundle(export_bundle(model, tmp_path / "unet", meta))
    backend = load_backend(bundle)
    x = (100.0 + 3.0 * np.random.default_rng(4).normal(size=(2, LENGTH, 1))).astype("float32")
    np.testing.assert_allclose(backend.run(x), model.predict(x, verbose=0), atol=1e-4)
