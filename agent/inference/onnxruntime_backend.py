"""ONNX Runtime backend: the bundle's ONNX graph on the CPU, or on CUDA where installed.

CPU tuning: every graph optimization (constant folding, Conv + Add + Relu fusion), one
sequential executor (the U-Net is a chain: parallel branches would only add hand-offs),
``threads`` intra-op threads (default: every CPU this process may use), and no spinning of
idle worker threads, so that the agent's MQTT thread gets the CPU between batches.

CUDA: used when the ``onnxruntime-gpu`` package is installed and a device is there
(``device="cuda"``, or ``"auto"``). ONNX Runtime silently drops to its CPU provider when CUDA
cannot start; this backend checks the providers the session really got and says so.
"""

from __future__ import annotations

import logging

import numpy as np

from agent.bundle import ModelBundle
from agent.inference import BackendError, cpu_threads

log = logging.getLogger(__name__)


class OnnxRuntimeBackend:
    kind = "onnxruntime"
    precision = "fp32"

    def __init__(self, bundle: ModelBundle, threads: int = 0, device: str = "auto"):
        if device not in ("auto", "cpu", "cuda"):
            raise BackendError(f"unknown ONNX Runtime device {device!r}; use auto, cpu or cuda")
        import onnxruntime as ort

        available = ort.get_available_providers()
        if device == "cuda" and "CUDAExecutionProvider" not in available:
            raise BackendError("this ONNX Runtime has no CUDA provider (install onnxruntime-gpu)")
        use_cuda = device != "cpu" and "CUDAExecutionProvider" in available
        providers = (["CUDAExecutionProvider", "CPUExecutionProvider"] if use_cuda
                     else ["CPUExecutionProvider"])

        self.threads = cpu_threads(threads)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(bundle.model_file), options,
                                                providers=providers)
        except Exception as exc:  # ONNX Runtime raises its own exception types
            raise BackendError(f"{bundle.model_file}: ONNX Runtime cannot load it: {exc}")
        got = self.session.get_providers()
        if use_cuda and "CUDAExecutionProvider" not in got:
            if device == "cuda":
                raise BackendError("ONNX Runtime could not start its CUDA provider (no GPU, "
                                   "or a CUDA/cuDNN version it does not support)")
            log.info("ONNX Runtime could not start its CUDA provider; running on the CPU")
        self.device = "cuda" if "CUDAExecutionProvider" in got else "cpu"
        self.input_name = self.session.get_inputs()[0].name
        self.name = f"onnxruntime-{self.device}"
        self.fallback_reason: str | None = None
        self.self_test_error = float("nan")

    def describe(self) -> str:
        if self.device == "cuda":
            return "ONNX Runtime on CUDA, fp32"
        return f"ONNX Runtime on the CPU, fp32, {self.threads} thread(s)"

    def run(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        return self.session.run(None, {self.input_name: batch})[0]
