"""Transfer learning: U-Net and MU-Net initialized from a pretrained univariate U-Net, and
the paper's fine-tuning strategies.

A model is split into ten sections, named as in ``trainer.unet``: ``enc1`` ... ``enc5``,
``dec4`` ... ``dec1``, ``out``. A MU-Net's per-channel encoder layers (``ch{c}_enc{i}_...``)
belong to section ``enc{i}``.

Strategies of ``fine_tune``:

- ``scratch`` / ``all``: every section trains at the base learning rate (the two names are
  the same training; ``scratch`` reads better for a model that was not transferred);
- ``multipliers``: section k of ``SECTIONS`` trains at ``lr * LR_MULTIPLIERS[k]``
  (0.01 for ``enc1`` up to 1.0 for ``out``). Adam normalizes gradients, so scaling the
  gradient would change nothing: each section gets its own optimizer with its own learning
  rate, which scales the section's updates. BatchNorm moving statistics are not trained by
  gradient: they follow the new data at the same rate in every section;
- ``freeze``: sections ``enc1`` and ``enc2`` frozen for ``freeze_epochs`` (default half the
  epochs), then every section trains;
- ``munet-stages``: three stages (default: a third of the epochs each): encoder sections 1
  to 4 frozen (for MU-Net: every channel's encoder; ``enc5`` trains), then sections 3 and 4
  unfrozen, then everything.

Frozen sections are frozen entirely: their BatchNormalization layers run in inference mode
and keep their moving statistics. Each stage starts with fresh optimizer state, so that
sections unfrozen late do not meet Adam moments of a different phase.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
import time

import numpy as np

import keras
from keras import ops

from trainer.losses import soft_dice_loss
from trainer.unet import FILTERS, build_munet, build_unet

log = logging.getLogger(__name__)

SECTIONS = ("enc1", "enc2", "enc3", "enc4", "enc5", "dec4", "dec3", "dec2", "dec1", "out")
LR_MULTIPLIERS = tuple(round((k / 10) ** 2, 2) for k in range(1, len(SECTIONS) + 1))
STRATEGIES = ("scratch", "all", "multipliers", "freeze", "munet-stages")
OPTIMIZERS = ("adam", "sgd")

_SECTION_OF = re.compile(r"^(?:ch\d+_)?(enc[1-5]|dec[1-4]|out)_")
_CHANNEL_PREFIX = re.compile(r"^ch\d+_")


def section_of(layer_name: str) -> str | None:
    """The section of a layer named by ``trainer.unet`` (``ch3_enc2_b1_conv`` -> ``enc2``);
    None for layers outside the ten sections (input, ``sample_norm``, channel slices)."""
    match = _SECTION_OF.match(layer_name)
    return match.group(1) if match else None


def section_layers(model: keras.Model) -> dict[str, list]:
    """Layers with weights, by section, in ``SECTIONS`` order."""
    found: dict[str, list] = {section: [] for section in SECTIONS}
    for layer in model.layers:
        if not layer.weights:
            continue
        section = section_of(layer.name)
        if section is None:
            raise ValueError(f"layer {layer.name!r} has weights but belongs to no section; "
                             "build the model with trainer.unet")
        found[section].append(layer)
    return found


# Transfer --------------------------------------------------------------------------------


def _base_layer(base: keras.Model, name: str):
    try:
        return base.get_layer(name)
    except ValueError:
        raise ValueError(f"the base model {base.name!r} has no layer {name!r}; it must be a "
                         "U-Net built by trainer.unet.build_unet") from None


def _check_univariate(base: keras.Model) -> tuple[int, int]:
    length, channels = base.input_shape[1:]
    _base_layer(base, "out_conv")
    if any(_CHANNEL_PREFIX.match(layer.name) for layer in base.layers):
        raise ValueError(f"the base model {base.name!r} must be a U-Net, not a MU-Net")
    return length, channels


def _has_sample_norm(model: keras.Model) -> bool:
    return any(layer.name == "sample_norm" for layer in model.layers)


def transfer_unet(base: keras.Model, n_classes: int, activation: str,
                  sample_norm: bool | None = None, model_length: int | None = None,
                  name: str = "unet_transfer") -> keras.Model:
    """A new U-Net for ``n_classes`` with every layer but the output section copied from
    ``base``.

    Weights are copied by layer name (BatchNormalization moving statistics included); the
    output section ``out_conv`` is freshly initialized (Keras' global seed decides its
    values). The new model takes the base's channels; ``model_length`` (default the base's)
    may differ, since convolutions do not depend on it. ``sample_norm`` (default: as the
    base) adds or drops the weightless sample-wise normalization layer.
    """
    length, channels = _check_univariate(base)
    if sample_norm is None:
        sample_norm = _has_sample_norm(base)
    model = build_unet(channels, n_classes, activation, model_length or length, name=name,
                       sample_norm=sample_norm)

    copied = 0
    for layer in model.layers:
        if not layer.weights or section_of(layer.name) == "out":
            continue
        source = _base_layer(base, layer.name).get_weights()
        _check_shapes(layer, source)
        layer.set_weights(source)
        copied += 1
    log.info("U-Net transfer from %s: %d layers copied, output section fresh", base.name,
             copied)
    return model


def _check_shapes(layer, source: list[np.ndarray]) -> None:
    shapes = [w.shape for w in layer.get_weights()]
    if [s.shape for s in source] != shapes:
        raise ValueError(f"layer {layer.name!r}: base weights {[s.shape for s in source]} do "
                         f"not fit {shapes}")


def _widened_kernel(kernel: np.ndarray, width: int, n_channels: int, keep: int) -> np.ndarray:
    """Conv1D ``kernel`` (3, keep + w, filters) widened to (3, keep + C * w, filters): the
    first ``keep`` input rows as they are, the other w rows tiled C times and divided by C."""
    per_channel = kernel[:, keep:, :]
    tiled = np.tile(per_channel, (1, n_channels, 1)) / n_channels
    widened = np.concatenate([kernel[:, :keep, :], tiled], axis=1)
    assert widened.shape[1] == width, (widened.shape, width)
    return widened


def _widened_rows() -> dict[str, int]:
    """MU-Net convolutions whose input is C merged channel outputs, with the number of
    leading input rows that are not per channel (the decoder's upsampled input)."""
    rows = {f"enc{len(FILTERS)}_b1_conv": 0}
    for i in range(1, len(FILTERS)):
        rows[f"dec{i}_b1_conv"] = FILTERS[i]
    return rows


def transfer_munet(base: keras.Model, n_channels: int, n_classes: int, activation: str,
                   sample_norm: bool | None = None, model_length: int | None = None,
                   shared_init: str = "tile", name: str = "munet_transfer") -> keras.Model:
    """A new MU-Net for ``n_channels`` and ``n_classes`` initialized from a univariate U-Net.

    What is copied from ``base`` (by layer name, BatchNormalization statistics included):

    - every channel's encoder sections 1 to 4 (``ch{c}_enc{i}_...``) from the base's
      ``enc{i}_...``: all channels start as the same copy of the base encoder;
    - every layer of ``enc5`` and of the decoder whose shape is the base's: all but the
      first convolution of ``enc5`` and of each decoder section;
    - those first convolutions, whose input holds the C channels' merged outputs, with
      ``shared_init="tile"`` (default): the base kernel's rows for one encoder output are
      repeated for each channel and divided by C (rows for the decoder's upsampled input are
      copied as they are). The convolution then starts by seeing the mean over channels of
      the encoder features, so with identical channels (or C = 1) the new model computes
      exactly what the base computed, up to the output section. ``shared_init="fresh"``
      leaves them at Keras' random initialization instead.

    Fresh: the output section ``out_conv`` always.
    """
    if shared_init not in ("tile", "fresh"):
        raise ValueError(f"shared_init must be 'tile' or 'fresh', not {shared_init!r}")
    length, channels = _check_univariate(base)
    if channels != 1:
        raise ValueError(f"MU-Net transfer needs a univariate base model; {base.name!r} takes "
                         f"{channels} channels")
    if sample_norm is None:
        sample_norm = _has_sample_norm(base)
    model = build_munet(n_channels, n_classes, activation, model_length or length,
                        sample_norm=sample_norm, name=name)

    widened_rows = _widened_rows()
    counts = {"copied": 0, "widened": 0, "fresh": 0}
    for layer in model.layers:
        if not layer.weights or section_of(layer.name) == "out":
            continue
        source = _base_layer(base, _CHANNEL_PREFIX.sub("", layer.name)).get_weights()
        target = layer.get_weights()
        if [s.shape for s in source] == [t.shape for t in target]:
            layer.set_weights(source)
            counts["copied"] += 1
        elif layer.name in widened_rows and shared_init == "tile":
            kernel = _widened_kernel(source[0], target[0].shape[1], n_channels,
                                     widened_rows[layer.name])
            layer.set_weights([kernel, source[1]])
            counts["widened"] += 1
        elif layer.name in widened_rows:
            counts["fresh"] += 1
        else:
            _check_shapes(layer, source)
    log.info("MU-Net transfer from %s to %d channels: %d layers copied, %d widened, %d fresh "
             "(and the output section)", base.name, n_channels, counts["copied"],
             counts["widened"], counts["fresh"])
    return model


# Losses ----------------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="segwatch")
def cce_dice_loss(y_true, y_pred):
    """Categorical cross-entropy (mean over the snapshot) plus soft Dice over every output,
    background included: the loss for softmax (single-label) models."""
    y_true = ops.cast(y_true, y_pred.dtype)
    cross_entropy = ops.mean(keras.losses.categorical_crossentropy(y_true, y_pred), axis=1)
    return cross_entropy + soft_dice_loss(y_true, y_pred)


def default_loss(model: keras.Model):
    """``soft_dice_loss`` for a sigmoid output, ``cce_dice_loss`` for softmax."""
    activation = model.get_layer("out_conv").activation.__name__
    if activation == "sigmoid":
        return soft_dice_loss
    if activation == "softmax":
        return cce_dice_loss
    raise ValueError(f"no default loss for the output activation {activation!r}; pass loss=")


# Fine-tuning -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Stage:
    """Epochs trained with ``frozen`` sections held fixed."""

    epochs: int
    frozen: frozenset[str]


def plan_stages(strategy: str, epochs: int, freeze_epochs: int | None = None,
                stage_epochs: tuple[int, int, int] | None = None) -> list[Stage]:
    """The stages of ``strategy`` over ``epochs`` (stages of zero epochs left out)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, not {epochs}")
    every = frozenset()
    if strategy == "freeze":
        frozen_for = epochs // 2 if freeze_epochs is None else freeze_epochs
        if not 0 <= frozen_for <= epochs:
            raise ValueError(f"freeze_epochs {frozen_for} must be between 0 and epochs {epochs}")
        stages = [Stage(frozen_for, frozenset({"enc1", "enc2"})),
                  Stage(epochs - frozen_for, every)]
    elif strategy == "munet-stages":
        if stage_epochs is None:
            third = epochs // 3
            stage_epochs = (third, third, epochs - 2 * third)
        if len(stage_epochs) != 3 or sum(stage_epochs) != epochs or min(stage_epochs) < 0:
            raise ValueError(f"stage_epochs {tuple(stage_epochs)} must be three counts that "
                             f"add up to epochs {epochs}")
        stages = [Stage(stage_epochs[0], frozenset({"enc1", "enc2", "enc3", "enc4"})),
                  Stage(stage_epochs[1], frozenset({"enc1", "enc2"})),
                  Stage(stage_epochs[2], every)]
    else:
        stages = [Stage(epochs, every)]
    return [stage for stage in stages if stage.epochs > 0]


def _set_frozen(model: keras.Model, frozen: frozenset[str]) -> None:
    for section, members in section_layers(model).items():
        for layer in members:
            layer.trainable = section not in frozen


def _make_optimizer(kind: str, lr: float):
    if kind == "adam":
        return keras.optimizers.Adam(lr)
    if kind == "sgd":
        return keras.optimizers.SGD(lr)
    raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, not {kind!r}")


def _optimizer_groups(model: keras.Model, strategy: str, lr: float, kind: str) -> list:
    """(optimizer, variables) pairs for the trainable variables: one per section with
    ``multipliers``, one for all otherwise."""
    by_section = {section: [v for layer in members for v in layer.trainable_weights]
                  for section, members in section_layers(model).items()}
    if strategy == "multipliers":
        groups = [(_make_optimizer(kind, lr * multiplier), by_section[section])
                  for section, multiplier in zip(SECTIONS, LR_MULTIPLIERS)]
    else:
        groups = [(_make_optimizer(kind, lr), [v for vs in by_section.values() for v in vs])]
    groups = [(optimizer, variables) for optimizer, variables in groups if variables]
    for optimizer, variables in groups:
        optimizer.build(variables)
    return groups


def _compiled(step, model: keras.Model):
    """``step`` as a tf.function traced once, for batches (x, y) of any size.

    Each stage compiles its own step (its trainable variables differ). Wrapped in a partial,
    the step is its own key in TensorFlow's retracing statistics, which otherwise would
    count the stages of successive runs as retracings of one function and warn.
    """
    import tensorflow as tf

    spec = (tf.TensorSpec((None, *model.input_shape[1:]), tf.float32),
            tf.TensorSpec((None, *model.output_shape[1:]), tf.float32))
    return tf.function(functools.partial(step), input_signature=spec)


def _train_step(model: keras.Model, loss_fn, groups: list, eager: bool):
    import tensorflow as tf

    variables = [v for _, group in groups for v in group]

    def step(x, y):
        with tf.GradientTape() as tape:
            predicted = model(x, training=True)
            value = ops.mean(loss_fn(y, predicted))
            if model.losses:
                value = value + ops.sum(model.losses)
        gradients = tape.gradient(value, variables)
        start = 0
        for optimizer, group in groups:
            optimizer.apply(gradients[start:start + len(group)], group)
            start += len(group)
        return value

    return step if eager else _compiled(step, model)


def _eval_step(model: keras.Model, loss_fn, eager: bool):
    def step(x, y):
        return ops.mean(loss_fn(y, model(x, training=False)))

    return step if eager else _compiled(step, model)


class _Batches:
    """Batches of (x, y) from a tuple of two 3-D arrays or from a tf.data.Dataset / iterable
    of batches.

    Arrays are shuffled each pass. With ``steps`` an epoch is that many batches, drawn from
    one stream that continues across epochs (arrays: reshuffled at each pass); without, an
    epoch is one pass, which an infinite dataset does not have.
    """

    def __init__(self, data, batch_size: int, steps: int | None, rng: np.random.Generator,
                 shuffle: bool, what: str):
        self.what = what
        self.steps = steps
        if steps is not None and steps < 1:
            raise ValueError(f"{what}: steps must be at least 1, not {steps}")
        self.arrays = None
        if isinstance(data, tuple) and len(data) == 2 and all(
                getattr(part, "ndim", None) == 3 for part in data):
            x, y = (np.asarray(part, dtype=np.float32) for part in data)
            if len(x) != len(y) or len(x) == 0:
                raise ValueError(f"{what}: x and y must have the same, non-zero number of "
                                 f"snapshots, not {len(x)} and {len(y)}")
            self.arrays = (x, y)
            self.batch_size, self.rng, self.shuffle = batch_size, rng, shuffle
        else:
            self.data = data
            self._check_finite_or_steps()
        self._stream = None

    def _check_finite_or_steps(self) -> None:
        import tensorflow as tf

        if self.steps is not None:
            return
        if isinstance(self.data, tf.data.Dataset):
            if self.data.cardinality() == tf.data.INFINITE_CARDINALITY:
                raise ValueError(f"{self.what}: the dataset is infinite; give its steps "
                                 "per epoch")
        elif iter(self.data) is self.data:
            raise ValueError(f"{self.what}: an iterator can be read once; give its steps per "
                             "epoch or pass a tf.data.Dataset")

    def _array_passes(self):
        x, y = self.arrays
        while True:
            order = self.rng.permutation(len(x)) if self.shuffle else np.arange(len(x))
            for lo in range(0, len(x), self.batch_size):
                index = np.sort(order[lo:lo + self.batch_size])
                yield x[index], y[index]

    def epoch(self):
        if self.steps is None:
            if self.arrays is not None:
                passes = self._array_passes()
                n_batches = -(-len(self.arrays[0]) // self.batch_size)
                yield from (next(passes) for _ in range(n_batches))
            else:
                yield from self.data
            return
        if self._stream is None:
            self._stream = self._array_passes() if self.arrays is not None else iter(self.data)
        for i in range(self.steps):
            try:
                yield next(self._stream)
            except StopIteration:
                raise ValueError(f"{self.what}: ran out after {i} of {self.steps} steps; "
                                 "repeat the dataset or lower the steps") from None


def _mean_loss(step, batches: _Batches, epoch: int) -> float:
    import tensorflow as tf

    total, count = 0.0, 0
    for x, y in batches.epoch():
        n = int(x.shape[0])
        total += float(step(tf.cast(x, tf.float32), tf.cast(y, tf.float32))) * n
        count += n
    if count == 0:
        raise ValueError(f"{batches.what}: no batch in epoch {epoch}")
    return total / count


def fine_tune(model: keras.Model, train_data, epochs: int, strategy: str, lr: float = 1e-3,
              val_data=None, loss=None, seed: int = 0, batch_size: int = 32,
              steps_per_epoch: int | None = None, validation_steps: int | None = None,
              freeze_epochs: int | None = None,
              stage_epochs: tuple[int, int, int] | None = None,
              optimizer: str = "adam", on_epoch_end=None, run_eagerly: bool = False) -> dict:
    """Train ``model`` in place with ``strategy`` (see the module docstring); return its
    history.

    ``train_data`` and ``val_data``: a pair of arrays ``(x, y)`` of shapes (n, length,
    channels) and (n, length, outputs), batched by ``batch_size`` and shuffled each epoch,
    or a ``tf.data.Dataset`` (or other iterable) of ``(x, y)`` batches. An infinite dataset
    needs ``steps_per_epoch`` (``validation_steps``; validation then reads the next batches
    of one stream each epoch, so for the same batches every epoch pass arrays or a finite
    dataset). ``loss`` defaults to
    ``default_loss(model)``; ``optimizer`` is ``adam`` or ``sgd`` (plain steps, for checks).
    ``seed`` sets Keras' global seed and the shuffling. ``on_epoch_end(epoch, history)``, if
    given, is called after each epoch (1-based) with the history so far. ``run_eagerly``
    skips compiling the training step: slower per batch, but no tracing (seconds per stage),
    which suits runs of a few batches.

    The history: ``loss`` (mean training loss per epoch, under training-mode BatchNorm),
    ``val_loss`` (when ``val_data``; inference-mode BatchNorm), ``seconds`` (per epoch),
    ``stage`` (1-based stage of each epoch), ``stages`` (epochs and frozen sections of
    each), ``total_seconds``, ``strategy``, ``lr``, ``optimizer``, ``seed``. Layers'
    ``trainable`` flags are restored when it returns.
    """
    stages = plan_stages(strategy, epochs, freeze_epochs, stage_epochs)
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, not {optimizer!r}")
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    loss_fn = loss or default_loss(model)
    train = _Batches(train_data, batch_size, steps_per_epoch, rng, True, "training data")
    val = (None if val_data is None else
           _Batches(val_data, batch_size, validation_steps, rng, False, "validation data"))
    evaluate = None if val is None else _eval_step(model, loss_fn, run_eagerly)

    history: dict = {"strategy": strategy, "lr": lr, "optimizer": optimizer, "seed": seed,
                     "stages": [{"epochs": s.epochs, "frozen": sorted(s.frozen)} for s in stages],
                     "loss": [], "seconds": [], "stage": []}
    if val is not None:
        history["val_loss"] = []
    trainable = {layer.name: layer.trainable for layer in model.layers}
    started = time.perf_counter()
    epoch = 0
    try:
        for number, stage in enumerate(stages, start=1):
            _set_frozen(model, stage.frozen)
            groups = _optimizer_groups(model, strategy, lr, optimizer)
            step = _train_step(model, loss_fn, groups, run_eagerly)
            for _ in range(stage.epochs):
                epoch += 1
                epoch_started = time.perf_counter()
                history["loss"].append(_mean_loss(step, train, epoch))
                if val is not None:
                    history["val_loss"].append(_mean_loss(evaluate, val, epoch))
                history["seconds"].append(time.perf_counter() - epoch_started)
                history["stage"].append(number)
                log.info("epoch %d/%d (stage %d, frozen: %s): loss %.4f%s, %.1f s", epoch,
                         epochs, number, ", ".join(sorted(stage.frozen)) or "none",
                         history["loss"][-1],
                         f", val {history['val_loss'][-1]:.4f}" if val is not None else "",
                         history["seconds"][-1])
                if on_epoch_end is not None:
                    on_epoch_end(epoch, history)
    finally:
        for layer in model.layers:
            layer.trainable = trainable[layer.name]
    history["total_seconds"] = time.perf_counter() - started
    return history
