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
