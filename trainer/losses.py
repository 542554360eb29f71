"""Soft Dice loss for segmentation masks (batch, length, classes)."""

from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="segwatch")
def soft_dice_loss(y_true, y_pred, smooth: float = 1.0):
    """1 - Dice per snapshot and class, averaged; ``smooth`` keeps empty masks defined."""
    y_true = ops.cast(y_true, y_pred.dtype)
    intersection = ops.sum(y_true * y_pred, axis=1)
    total = ops.sum(y_true, axis=1) + ops.sum(y_pred, axis=1)
    dice = (2.0 * intersection + smooth) / (total + smooth)
    return 1.0 - ops.mean(dice, axis=-1)
