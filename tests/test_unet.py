"""The U-Net has the paper's architecture."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest

keras = pytest.importorskip("keras", reason="the trainer extra (TensorFlow) is not installed")

from trainer.unet import build_unet  # noqa: E402


def conv_layers(model, prefix):
    return [layer for layer in model.layers
            if layer.name.startswith(prefix) and layer.name.endswith("_conv")]


def test_encoder_sections_have_the_papers_filters_and_lengths():
    model = build_unet(n_channels=1, n_classes=1)
    assert model.input_shape == (None, 1024, 1)
    for section, (filters, length) in enumerate(
            [(16, 1024), (32, 256), (64, 64), (128, 16), (256, 4)], start=1):
        convs = conv_layers(model, f"enc{section}_")
        assert len(convs) == 2
        for conv in convs:
            assert conv.filters == filters
            assert conv.kernel_size == (3,) and conv.padding == "same" and conv.strides == (1,)
            assert conv.output.shape[1] == length
    pools = [layer for layer in model.layers if layer.name.endswith("_pool")]
    assert len(pools) == 4 and all(p.pool_size == (4,) for p in pools)


def test_each_block_is_conv_batchnorm_relu():
    model = build_unet()
    names = [layer.name for layer in model.layers]
    for conv in [n for n in names if n.endswith("_conv") and n != "out_conv"]:
        block = conv[: -len("_conv")]
        assert f"{block}_bn" in names and f"{block}_relu" in names
        assert names.index(f"{block}_bn") == names.index(conv) + 1


def test_decoder_upsamples_concatenates_and_mirrors_filters():
    model = build_unet()
    for section, filters in zip((4, 3, 2, 1), (128, 64, 32, 16)):
        up = model.get_layer(f"dec{section}_up")
        assert up.size == 4
        concat = model.get_layer(f"dec{section}_concat")
        skip = model.get_layer(f"enc{section}_b2_relu")
        assert skip.output in concat.input or any(t is skip.output for t in concat.input)
        convs = conv_layers(model, f"dec{section}_")
        assert [c.filters for c in convs] == [filters, filters]


@pytest.mark.parametrize("activation, classes, units", [("sigmoid", 3, 3), ("softmax", 3, 4)])
def test_output_section(activation, classes, units):
    model = build_unet(n_channels=2, n_classes=classes, activation=activation)
    out = model.get_layer("out_conv")
    assert out.kernel_size == (1,) and out.filters == units
    assert out.activation.__name__ == activation
    assert model.output_shape == (None, 1024, units)


def test_rejects_lengths_that_do_not_pool():
    with pytest.raises(ValueError, match="multiple of 256"):
        build_unet(model_length=1000)


# Sample-wise normalization -------------------------------------------------------------------


def test_sample_norm_standardizes_each_snapshot_and_channel():
    import numpy as np

    from trainer.unet import SampleNormalization

    rng = np.random.default_rng(0)
    x = rng.normal(loc=[5.0, -300.0], scale=[0.1, 40.0], size=(3, 256, 2)).astype("float32")
    y = keras.ops.convert_to_numpy(SampleNormalization()(x))
    np.testing.assert_allclose(y.mean(axis=1), 0.0, atol=1e-4)
    np.testing.assert_allclose(y.std(axis=1), 1.0, atol=1e-3)


def test_sample_norm_maps_a_flat_snapshot_to_zeros():
    import numpy as np

    from trainer.unet import SampleNormalization

    flat = np.full((1, 256, 1), 7.0, dtype="float32")
    assert not np.abs(keras.ops.convert_to_numpy(SampleNormalization()(flat))).any()


def test_sample_norm_is_the_first_layer_and_adds_no_weights():
    plain = build_unet(model_length=256)
    model = build_unet(model_length=256, sample_norm=True)
    layer = model.get_layer("sample_norm")
    assert layer.input is model.input or layer.input.name == model.input.name
    assert model.count_params() == plain.count_params()
    assert "sample_norm" not in [layer.name for layer in plain.layers]


# MU-Net ------------------------------------------------------------------------------------


def _encoder_params_per_channel():
    params, width = 0, 1
    for filters in (16, 32, 64, 128):
        for _ in range(2):
            params += 3 * width * filters + filters + 4 * filters  # conv + batchnorm
            width = filters
    return params


@pytest.mark.parametrize("channels", [1, 8, 19])
def test_munet_shapes(channels):
    from trainer.unet import build_munet

    model = build_munet(channels, n_classes=2, model_length=256)
    assert model.input.name == "snapshot" and model.input_shape == (None, 256, channels)
    assert model.output_shape == (None, 256, 2)

    # One encoder copy of sections 1 to 4 per channel, one shared fifth section.
    for c in range(channels):
        for section, filters in zip((1, 2, 3, 4), (16, 32, 64, 128)):
            convs = conv_layers(model, f"ch{c}_enc{section}_")
            assert [conv.filters for conv in convs] == [filters, filters]
    assert not conv_layers(model, f"ch{channels}_")
    assert not [layer for layer in model.layers if layer.name.startswith("ch")
                and "enc5" in layer.name]
    assert model.get_layer("enc5_b1_conv").kernel.shape == (3, 128 * channels, 256)
    for section, (up, skip) in zip((4, 3, 2, 1), [(256, 128), (128, 64), (64, 32), (32, 16)]):
        kernel = model.get_layer(f"dec{section}_b1_conv").kernel
        assert kernel.shape == (3, up + channels * skip, skip)

    # Parameters: the U-Net's, plus per extra channel an encoder and the wider first convs.
    unet = build_unet(n_channels=1, n_classes=2, model_length=256).count_params()
    wider = 3 * 128 * 256 + sum(3 * f * f for f in (16, 32, 64, 128))
    assert model.count_params() == unet + (channels - 1) * (_encoder_params_per_channel()
                                                             + wider)


def test_munet_skips_merge_every_channels_encoder_section():
    from trainer.unet import build_munet

    model = build_munet(3, model_length=256)
    for section in (1, 2, 3, 4):
        merge = model.get_layer(f"enc{section}_merge")
        sources = {t.name for t in merge.input}
        assert sources == {model.get_layer(f"ch{c}_enc{section}_b2_relu").output.name
                           for c in range(3)}
        concat = model.get_layer(f"dec{section}_concat")
        assert merge.output.name in {t.name for t in concat.input}


def test_munet_channel_encoders_see_only_their_channel():
    import numpy as np

    from trainer.unet import build_munet

    keras.utils.set_random_seed(1)
    model = build_munet(3, model_length=256)
    probe = keras.Model(model.input, [model.get_layer(f"ch{c}_enc4_b2_relu").output
                                      for c in range(3)])
    x = np.random.default_rng(0).normal(size=(2, 256, 3)).astype("float32")
    changed = x.copy()
    changed[:, :, 1] += 5.0
    before = [np.array(t) for t in probe(x, training=False)]
    after = [np.array(t) for t in probe(changed, training=False)]
    np.testing.assert_array_equal(before[0], after[0])
    np.testing.assert_array_equal(before[2], after[2])
    assert np.abs(before[1] - after[1]).max() > 1e-3


def test_munet_with_sample_norm_saves_and_loads(tmp_path):
    import numpy as np

    from trainer.unet import build_munet

    model = build_munet(2, n_classes=1, model_length=256, sample_norm=True)
    model.save(tmp_path / "munet.keras")
    loaded = keras.models.load_model(tmp_path / "munet.keras")
    x = np.random.default_rng(2).normal(size=(2, 256, 2)).astype("float32")
    np.testing.assert_allclose(np.array(loaded(x, training=False)),
                               np.array(model(x, training=False)), atol=1e-6)
