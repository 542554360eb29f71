"""ONNX Runtime backend (CPU)."""

from __future__ import annotations

import numpy as np

from agent.bundle import ModelBundle


class OnnxRuntimeBackend:
    def __init__(self, bundle: ModelBundle, threads: int = 0):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(
                str(bundle.model_file), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # ONNX Runtime raises its own exception types
            from agent.inference import BackendError

            raise BackendError(f"{bundle.model_file}: ONNX Runtime cannot load it: {exc}")
        self.input_name = self.session.get_inputs()[0].name
        self.name = "onnxruntime-cpu"

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(batch)})[0]
