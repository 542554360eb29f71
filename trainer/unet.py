"""The 1-D U-Net of Wen & Keyes (2019) and its multivariate form MU-Net, built with Keras.

U-Net: five encoder sections of two Conv1D(kernel 3) + BatchNorm + ReLU blocks with 16, 32,
64, 128 and 256 filters, MaxPooling1D(4) between sections, four decoder sections of
UpSampling1D(4), concatenation with the matching encoder output and two blocks with that
encoder's filter count, and a kernel-1 Conv1D output section. Layers are named by section
(``enc1`` ... ``enc5``, ``dec4`` ... ``dec1``, ``out``) so that transfer learning can address
them.

MU-Net: the snapshot's C channels are sliced apart; each channel runs through its own copy of
encoder sections 1 to 4 (layers ``ch{c}_enc1`` ... ``ch{c}_enc4``); the C outputs of each
section are concatenated (``enc{i}_merge``), the merged section 4 feeds the shared fifth
section ``enc5``, and the merged sections 1 to 4 are the decoder's skip connections. Decoder
and output section are the U-Net's, with the same names.

Both take an optional sample-wise normalization layer (``sample_norm``) right after the input,
for tasks judged relative to each snapshot rather than to the training data's scale.
"""

from __future__ import annotations

import keras
from keras import layers, ops

FILTERS = (16, 32, 64, 128, 256)
POOL = 4
MODEL_LENGTH = 1024
SAMPLE_NORM_EPSILON = 1e-6


@keras.saving.register_keras_serializable(package="segwatch")
class SampleNormalization(layers.Layer):
    """Standardize each snapshot per channel: ``(x - mean) / sqrt(var + epsilon)`` over time.

    Mean and variance are taken over the model length of each snapshot and channel, so the
    model sees shapes, not levels: a channel that is flat within a snapshot comes out as zeros
    and a level shift between snapshots is invisible. ``epsilon`` (added to the variance)
    bounds the gain on near-flat snapshots to ``1 / sqrt(epsilon)``. No weights; exports to
    ONNX as ReduceMean, Sub, Mul, Add, Sqrt and Div.
    """

    def __init__(self, epsilon: float = SAMPLE_NORM_EPSILON, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = float(epsilon)

    def call(self, inputs):
        mean = ops.mean(inputs, axis=1, keepdims=True)
        centered = inputs - mean
        variance = ops.mean(centered * centered, axis=1, keepdims=True)
        return centered / ops.sqrt(variance + self.epsilon)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}


@keras.saving.register_keras_serializable(package="segwatch")
class ChannelSlice(layers.Layer):
    """Channel ``channel`` of a (batch, length, channels) input, kept as (batch, length, 1)."""

    def __init__(self, channel: int, **kwargs):
        super().__init__(**kwargs)
        self.channel = int(channel)

    def call(self, inputs):
        return inputs[:, :, self.channel:self.channel + 1]

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], 1)

    def get_config(self):
        return {**super().get_config(), "channel": self.channel}


def _block(x, filters: int, name: str):
    x = layers.Conv1D(filters, 3, padding="same", name=f"{name}_conv")(x)
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x)


def _section(x, filters: int, name: str):
    x = _block(x, filters, f"{name}_b1")
    return _block(x, filters, f"{name}_b2")


def _encoder(x, sections: int, prefix: str = "") -> list:
    """Outputs of encoder sections 1 to ``sections``, layers named ``{prefix}enc{i}_...``."""
    outputs = []
    for i, filters in enumerate(FILTERS[:sections], start=1):
        if i > 1:
            x = layers.MaxPooling1D(POOL, name=f"{prefix}enc{i}_pool")(x)
        x = _section(x, filters, f"{prefix}enc{i}")
        outputs.append(x)
    return outputs


def _decoder(x, skips: list, units: int, activation: str):
    """Decoder sections dec4 ... dec1 on the encoder's outputs ``skips``, then the output."""
    for i in range(len(FILTERS) - 1, 0, -1):
        x = layers.UpSampling1D(POOL, name=f"dec{i}_up")(x)
        x = layers.Concatenate(name=f"dec{i}_concat")([x, skips[i - 1]])
        x = _section(x, FILTERS[i - 1], f"dec{i}")
    return layers.Conv1D(units, 1, activation=activation, name="out_conv")(x)


def _inputs(model_length: int, n_channels: int, sample_norm: bool):
    if model_length % POOL ** (len(FILTERS) - 1):
        raise ValueError(f"model_length must be a multiple of {POOL ** (len(FILTERS) - 1)}")
    if n_channels < 1:
        raise ValueError(f"n_channels must be at least 1, not {n_channels}")
    inputs = keras.Input((model_length, n_channels), name="snapshot")
    x = SampleNormalization(name="sample_norm")(inputs) if sample_norm else inputs
    return inputs, x


def output_units(n_classes: int, activation: str) -> int:
    """Output channels: M for multi-label sigmoid, M + 1 (background first) for softmax."""
    if activation == "sigmoid":
        return n_classes
    if activation == "softmax":
        return n_classes + 1
    raise ValueError(f"activation must be 'sigmoid' or 'softmax', not {activation!r}")


def build_unet(
    n_channels: int = 1,
    n_classes: int = 1,
    activation: str = "sigmoid",
    model_length: int = MODEL_LENGTH,
    name: str = "unet",
    sample_norm: bool = False,
) -> keras.Model:
    """Build the paper's U-Net for snapshots of shape (model_length, n_channels).

    ``sample_norm`` adds a ``SampleNormalization`` layer after the input.
    """
    units = output_units(n_classes, activation)
    inputs, x = _inputs(model_length, n_channels, sample_norm)

    # Encoder: each section's output is also a skip connection.
    skips = _encoder(x, len(FILTERS))

    outputs = _decoder(skips[-1], skips, units, activation)
    return keras.Model(inputs, outputs, name=name)


def build_munet(
    n_channels: int,
    n_classes: int = 1,
    activation: str = "sigmoid",
    model_length: int = MODEL_LENGTH,
    sample_norm: bool = False,
    name: str = "munet",
) -> keras.Model:
    """Build MU-Net for snapshots of shape (model_length, n_channels).

    Each channel has its own encoder sections 1 to 4 (``ch{c}_enc1`` ... ``ch{c}_enc4``, c from
    0); the C outputs of section i are concatenated as ``enc{i}_merge`` (channel order), which
    is the skip connection of decoder section i; ``enc5`` pools and encodes the merged section
    4. Parameters grow linearly with C in the encoders and in the first convolution of
    ``enc5`` and of each decoder section, whose input widths are C times the U-Net's.
    """
    units = output_units(n_classes, activation)
    inputs, x = _inputs(model_length, n_channels, sample_norm)

    # One encoder (sections 1 to 4) per channel.
    per_channel = [
        _encoder(ChannelSlice(c, name=f"ch{c}_slice")(x), len(FILTERS) - 1, prefix=f"ch{c}_")
        for c in range(n_channels)
    ]

    # Merge each section across channels; a single channel needs no merge.
    skips = []
    for i in range(1, len(FILTERS)):
        outputs = [encoder[i - 1] for encoder in per_channel]
        skips.append(outputs[0] if n_channels == 1
                     else layers.Concatenate(name=f"enc{i}_merge")(outputs))

    # Shared fifth section, then the U-Net's decoder.
    bottom = layers.MaxPooling1D(POOL, name=f"enc{len(FILTERS)}_pool")(skips[-1])
    bottom = _section(bottom, FILTERS[-1], f"enc{len(FILTERS)}")
    outputs = _decoder(bottom, skips + [bottom], units, activation)
    return keras.Model(inputs, outputs, name=name)
