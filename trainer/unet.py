"""The 1-D U-Net of Wen & Keyes (2019), built with Keras.

Five encoder sections of two Conv1D(kernel 3) + BatchNorm + ReLU blocks with 16, 32, 64, 128
and 256 filters, MaxPooling1D(4) between sections, four decoder sections of UpSampling1D(4),
concatenation with the matching encoder output and two blocks with that encoder's filter
count, and a kernel-1 Conv1D output section. Layers are named by section (``enc1`` ...
``enc5``, ``dec4`` ... ``dec1``, ``out``) so that transfer learning can address them.
"""

from __future__ import annotations

import keras
from keras import layers

FILTERS = (16, 32, 64, 128, 256)
POOL = 4
MODEL_LENGTH = 1024


def _block(x, filters: int, name: str):
    x = layers.Conv1D(filters, 3, padding="same", name=f"{name}_conv")(x)
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x)


def _section(x, filters: int, name: str):
    x = _block(x, filters, f"{name}_b1")
    return _block(x, filters, f"{name}_b2")


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
) -> keras.Model:
    """Build the paper's U-Net for snapshots of shape (model_length, n_channels)."""
    if model_length % POOL ** (len(FILTERS) - 1):
        raise ValueError(f"model_length must be a multiple of {POOL ** (len(FILTERS) - 1)}")
    units = output_units(n_classes, activation)
    inputs = keras.Input((model_length, n_channels), name="snapshot")

    # Encoder: keep each section's output for the skip connections.
    skips = []
    x = inputs
    for i, filters in enumerate(FILTERS, start=1):
        if i > 1:
            x = layers.MaxPooling1D(POOL, name=f"enc{i}_pool")(x)
        x = _section(x, filters, f"enc{i}")
        skips.append(x)

    # Decoder: upsample, concatenate the matching encoder output, two blocks.
    for i in range(len(FILTERS) - 1, 0, -1):
        x = layers.UpSampling1D(POOL, name=f"dec{i}_up")(x)
        x = layers.Concatenate(name=f"dec{i}_concat")([x, skips[i - 1]])
        x = _section(x, FILTERS[i - 1], f"dec{i}")

    outputs = layers.Conv1D(units, 1, activation=activation, name="out_conv")(x)
    return keras.Model(inputs, outputs, name=name)
