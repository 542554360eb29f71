"""LiteRT backend: the bundle's ``model.tflite`` on the CPU with the XNNPACK delegate.

The interpreter holds one input shape at a time: a batch of another size resizes the input
tensor and re-plans the tensors (well under a millisecond once XNNPACK has seen the shape;
the first batch of a new size runs about twice as long). ``threads`` XNNPACK threads
(default: every CPU this process may use). An interpreter is not safe to call from two
threads at once; the agent calls it from its one worker thread.

Bundles exported before LiteRT support have no ``model.tflite``; ``python -m trainer.export
add-tflite BUNDLE`` adds it to a U-Net bundle.
"""

from __future__ import annotations

import logging

import numpy as np

from agent.bundle import TFLITE_FILE, ModelBundle
from agent.inference import BackendError, cpu_threads

log = logging.getLogger(__name__)


class LiteRTBackend:
    kind = "litert"
    name = "litert-xnnpack"
    precision = "fp32"

    def __init__(self, bundle: ModelBundle, threads: int = 0):
        if TFLITE_FILE in bundle.unusable:
            raise BackendError(bundle.unusable[TFLITE_FILE])
        if bundle.tflite_file is None:
            raise BackendError(f"{bundle.path} has no {TFLITE_FILE} (exported before LiteRT "
                               "support; add it with: python -m trainer.export add-tflite "
                               f"{bundle.path})")
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:
            raise BackendError("the ai-edge-litert package is not installed "
                               "(pip install ai-edge-litert)") from None

        self.threads = cpu_threads(threads)
        try:
            self.interpreter = Interpreter(model_path=str(bundle.tflite_file),
                                           num_threads=self.threads)
            self.interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise BackendError(f"{bundle.tflite_file}: LiteRT cannot load it: {exc}") from None
        inputs = self.interpreter.get_input_details()
        outputs = self.interpreter.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1:
            raise BackendError(f"{bundle.tflite_file}: expected one input and one output, "
                               f"found {len(inputs)} and {len(outputs)}")
        self.input_index = inputs[0]["index"]
        self.output_index = outputs[0]["index"]
        signature = list(inputs[0]["shape_signature"])
        self.snapshot_shape = (bundle.model_length, len(bundle.channels))
        if signature[0] != -1 or tuple(signature[1:]) != self.snapshot_shape:
            raise BackendError(f"{bundle.tflite_file}: input shape {signature}; expected "
                               f"[-1, {self.snapshot_shape[0]}, {self.snapshot_shape[1]}] "
                               "(a dynamic batch); re-export the bundle")
        self.batch_size = int(inputs[0]["shape"][0])
        self.fallback_reason: str | None = None
        self.self_test_error = float("nan")

    def describe(self) -> str:
        return f"LiteRT with XNNPACK on the CPU, fp32, {self.threads} thread(s)"

    def run(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if batch.shape[1:] != self.snapshot_shape:
            raise ValueError(f"snapshots of shape {batch.shape[1:]}; the model takes "
                             f"{self.snapshot_shape}")
        if len(batch) != self.batch_size:
            self.interpreter.resize_tensor_input(self.input_index, list(batch.shape),
                                                 strict=True)
            self.interpreter.allocate_tensors()
            self.batch_size = len(batch)
        self.interpreter.set_tensor(self.input_index, batch)
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self.output_index)
