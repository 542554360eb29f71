"""TensorRT backend: the bundle's ONNX graph as a TensorRT engine on an NVIDIA GPU.

Runtime: tensorrt (10.x API: named I/O tensors, ``execute_async_v3``) with pycuda. Host
buffers are page-locked and sized for the largest batch of the optimization profile, device
buffers are allocated once, and every batch goes host -> device, through the engine and
back on one CUDA stream with asynchronous copies; the call returns after the stream is
synchronized. The CUDA context is the device's primary context, pushed around each call, so
the backend can be loaded in one thread and run in another.

Engines are specific to a GPU model and a TensorRT version. They are built from the
bundle's ``model.onnx`` (FP32 or FP16, one optimization profile for batches 1 to 64, tuned
for 64) and cached next to the bundle, by default in ``<bundle>/engines/``:

- ``model.<precision>.engine``: the serialized engine;
- ``model.<precision>.engine.json``: its sidecar: GPU name and compute capability,
  TensorRT version, precision, the ONNX graph's sha256, the profile, and the engine file's
  size and sha256.

At load the sidecar is compared with this machine and bundle (``check_engine_cache``); a
missing, truncated, corrupt or mismatched engine is rebuilt (``build=True``) or refused,
and ``load_backend`` then falls back to a CPU backend with the reason in the status.

No crash loop: before a build, a marker ``model.<precision>.engine.building`` holding the
process id is written and removed afterwards. If a build kills the process (out of memory,
a driver fault), the marker stays, and the next start does not build again: it falls back
to the CPU and says to run ``segwatch-agent build-engine`` by hand (which removes a stale
marker). Engines are written to a temporary file and renamed, so a power cut leaves either
the old engine or the new one.

FP32 engines are built with TF32 disabled (TF32 would round the convolutions' inputs to 10
bits on Ampere and later, an FP16-sized error in an engine called FP32).

The cache metadata logic (``engine_metadata``, ``check_engine_cache``,
``write_engine_cache``, the build marker) needs neither tensorrt nor a GPU.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from agent.bundle import MODEL_FILE, ModelBundle, sha256_file
from agent.inference import PRECISIONS, BackendError

log = logging.getLogger(__name__)

ENGINE_FORMAT = "segwatch-engine/1"
PROFILE = {"min": 1, "opt": 64, "max": 64}  # batch sizes; the pipeline's MAX_BATCH is 64
WORKSPACE_BYTES = 1 << 30


@dataclasses.dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str  # "8.7"


def engine_paths(bundle: ModelBundle, precision: str,
                 engine_dir: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """The engine file and its sidecar JSON for ``bundle`` at ``precision``."""
    folder = Path(engine_dir) if engine_dir else bundle.path / "engines"
    engine = folder / f"model.{precision}.engine"
    return engine, engine.with_name(engine.name + ".json")


def engine_metadata(bundle: ModelBundle, precision: str, gpu: GpuInfo,
                    tensorrt_version: str) -> dict:
    """What an engine for this bundle, precision, GPU and TensorRT version must record."""
    return {
        "format": ENGINE_FORMAT,
        "model_id": bundle.model_id,
        "onnx_sha256": bundle.metadata["files"][MODEL_FILE],
        "precision": precision,
        "gpu_name": gpu.name,
        "compute_capability": gpu.compute_capability,
        "tensorrt_version": tensorrt_version,
        "profile": dict(PROFILE),
        "input_shape": [bundle.model_length, len(bundle.channels)],
    }


_MATCHED = ("format", "onnx_sha256", "precision", "gpu_name", "compute_capability",
            "tensorrt_version", "profile", "input_shape")


def check_engine_cache(engine_path: Path, sidecar_path: Path, expected: dict) -> str | None:
    """Why the cached engine cannot be used here, or None when it can.

    ``expected`` comes from ``engine_metadata``. Checks, in order: both files present, the
    sidecar readable, every recorded field equal to this machine's and bundle's, and the
    engine file of the recorded size (truncated otherwise) and sha256 (corrupt otherwise).
    """
    if not engine_path.is_file():
        return f"no engine at {engine_path}"
    try:
        recorded = json.loads(sidecar_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"{sidecar_path} is missing (the engine's build did not finish)"
    except (OSError, ValueError) as exc:
        return f"{sidecar_path} is unreadable: {exc}"
    if not isinstance(recorded, dict):
        return f"{sidecar_path} is not a JSON object"
    for key in _MATCHED:
        if recorded.get(key) != expected[key]:
            return (f"the engine was built for {key} {recorded.get(key)!r}, this machine and "
                    f"bundle need {expected[key]!r}")
    size = engine_path.stat().st_size
    if size != recorded.get("engine_bytes"):
        return (f"{engine_path} has {size} bytes, its sidecar records "
                f"{recorded.get('engine_bytes')}: the file is truncated or was replaced")
    if sha256_file(engine_path) != recorded.get("engine_sha256"):
        return f"{engine_path} does not match the sha256 in its sidecar: the file is corrupt"
    return None


def write_engine_cache(engine_path: Path, sidecar_path: Path, engine_bytes: bytes,
                       metadata: dict) -> None:
    """Write the engine, then its sidecar, each through a temporary file and a rename."""
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(metadata, engine_bytes=len(engine_bytes))
    tmp = engine_path.with_name(f".{engine_path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(engine_bytes)
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    meta["engine_sha256"] = sha256_file(tmp)
    sidecar_path.unlink(missing_ok=True)  # an engine without its sidecar is never used
    tmp.replace(engine_path)
    side_tmp = sidecar_path.with_name(f".{sidecar_path.name}.{os.getpid()}.tmp")
    side_tmp.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    side_tmp.replace(sidecar_path)


def _marker(engine_path: Path) -> Path:
    return engine_path.with_name(engine_path.name + ".building")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def build_marker_state(engine_path: Path) -> tuple[str, str] | None:
    """``("running", why)`` or ``("crashed", why)`` from the build marker, or None."""
    marker = _marker(engine_path)
    if not marker.is_file():
        return None
    try:
        pid = int(marker.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        pid = -1  # unreadable: treated as a build that did not finish
    if pid == os.getpid():
        return None
    if pid > 0 and _pid_alive(pid):
        return "running", f"process {pid} is building {engine_path.name} now"
    return "crashed", (f"an earlier build of {engine_path} did not finish (the process ended "
                       f"during the build; marker {marker}); run segwatch-agent build-engine "
                       "to retry it")


class _BuildMarker:
    """``model.<precision>.engine.building`` with our pid while a build runs."""

    def __init__(self, engine_path: Path):
        self.path = _marker(engine_path)

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(f"{os.getpid()} {time.time():.0f}\n")
        return self

    def __exit__(self, *_exc):
        self.path.unlink(missing_ok=True)


def _import_runtime():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendError(f"tensorrt cannot be imported ({exc}); pip install "
                           "'segwatch[tensorrt]' on a machine with an NVIDIA GPU") from None
    try:
        import pycuda.driver as cuda
    except ImportError as exc:
        raise BackendError(f"pycuda cannot be imported ({exc}); pip install pycuda "
                           "(needs the CUDA toolkit's headers to build)") from None
    return trt, cuda


def _open_device(cuda):
    """The primary context of GPU 0 and its description; BackendError without a GPU."""
    try:
        cuda.init()
        if cuda.Device.count() == 0:
            raise BackendError("no CUDA device found")
        device = cuda.Device(0)
        context = device.retain_primary_context()
    except cuda.Error as exc:
        raise BackendError(f"CUDA cannot start: {exc} (is the NVIDIA driver loaded?)") from None
    major, minor = device.compute_capability()
    return context, GpuInfo(device.name(), f"{major}.{minor}")


def _trt_logger(trt):
    return trt.Logger(trt.Logger.WARNING)


def build_serialized_engine(trt, bundle: ModelBundle, precision: str) -> bytes:
    """Parse ``model.onnx``, build an engine at ``precision``, return it serialized."""
    logger = _trt_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(bundle.model_file.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendError(f"{bundle.model_file}: TensorRT cannot parse it: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    else:
        config.clear_flag(trt.BuilderFlag.TF32)
    name = network.get_input(0).name
    shape = (bundle.model_length, len(bundle.channels))
    profile = builder.create_optimization_profile()
    profile.set_shape(name, (PROFILE["min"], *shape), (PROFILE["opt"], *shape),
                      (PROFILE["max"], *shape))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendError(f"TensorRT could not build a {precision} engine for "
                           f"{bundle.model_file} (see its log above)")
    return bytes(serialized)


def build_engine(bundle: ModelBundle, precision: str = "fp16",
                 engine_dir: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Build and cache the engine for ``bundle`` (``segwatch-agent build-engine``).

    Skips the build when a valid engine is cached, unless ``force``. Removes the marker of
    a crashed earlier build (this is the way to retry one). Returns the engine's path.
    """
    if precision not in PRECISIONS:
        raise BackendError(f"unknown precision {precision!r}; use fp16 or fp32")
    trt, cuda = _import_runtime()
    context, gpu = _open_device(cuda)
    engine_path, sidecar = engine_paths(bundle, precision, engine_dir)
    expected = engine_metadata(bundle, precision, gpu, trt.__version__)
    reason = None if force else check_engine_cache(engine_path, sidecar, expected)
    if not force and reason is None:
        log.info("%s is up to date for %s", engine_path, gpu.name)
        return engine_path
    state = build_marker_state(engine_path)
    if state and state[0] == "running":
        raise BackendError(state[1])
    _marker(engine_path).unlink(missing_ok=True)  # a crashed build's: retried here, by hand
    context.push()
    try:
        _build_into_cache(trt, bundle, precision, engine_path, sidecar, expected, gpu)
    finally:
        context.pop()
    return engine_path


def _build_into_cache(trt, bundle, precision, engine_path, sidecar, expected, gpu) -> None:
    log.info("building a TensorRT %s engine for %s on %s (TensorRT %s); this takes a while",
             precision, bundle.model_id, gpu.name, trt.__version__)
    started = time.monotonic()
    try:
        with _BuildMarker(engine_path):
            engine_bytes = build_serialized_engine(trt, bundle, precision)
            meta = dict(expected,
                        built=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                        build_seconds=round(time.monotonic() - started, 1))
            write_engine_cache(engine_path, sidecar, engine_bytes, meta)
    except OSError as exc:
        raise BackendError(f"cannot write the engine cache in {engine_path.parent}: {exc}; "
                           "give the agent write access there or set inference.engine_dir")
    log.info("engine %s built in %.0f s", engine_path, time.monotonic() - started)


class TensorRTBackend:
    kind = "tensorrt"

    def __init__(self, bundle: ModelBundle, precision: str = "fp16",
                 engine_dir: str | os.PathLike | None = None, build: bool = True):
        if precision not in PRECISIONS:
            raise BackendError(f"unknown precision {precision!r}; use fp16 or fp32")
        trt, self._cuda = _import_runtime()
        self._context, self.gpu = _open_device(self._cuda)
        self.precision = precision
        self.name = f"tensorrt-{precision}"
        self.fallback_reason: str | None = None
        self.self_test_error = float("nan")
        self.engine_path, self.sidecar_path = engine_paths(bundle, precision, engine_dir)
        expected = engine_metadata(bundle, precision, self.gpu, trt.__version__)

        self._context.push()
        try:
            engine = self._load_or_build(trt, bundle, expected, build)
            self._setup(engine, bundle)
        finally:
            self._context.pop()

    def _load_or_build(self, trt, bundle, expected, build: bool):
        reason = check_engine_cache(self.engine_path, self.sidecar_path, expected)
        if reason is None:
            engine = self._deserialize(trt)
            if engine is not None:
                return engine
            reason = f"TensorRT {trt.__version__} cannot deserialize {self.engine_path}"
        if not build:
            raise BackendError(f"{reason}; build the engine with: segwatch-agent build-engine "
                               f"--bundle {bundle.path} --precision {self.precision}")
        state = build_marker_state(self.engine_path)
        if state:
            raise BackendError(state[1])
        log.warning("TensorRT engine not usable (%s); building it now", reason)
        _build_into_cache(trt, bundle, self.precision, self.engine_path, self.sidecar_path,
                          expected, self.gpu)
        engine = self._deserialize(trt)
        if engine is None:  # just built here: no second build, fall back instead
            raise BackendError(f"TensorRT cannot deserialize the engine it just built at "
                               f"{self.engine_path}")
        return engine

    def _deserialize(self, trt):
        self._runtime = trt.Runtime(_trt_logger(trt))
        return self._runtime.deserialize_cuda_engine(self.engine_path.read_bytes())

    def _setup(self, engine, bundle: ModelBundle) -> None:
        import tensorrt as trt

        cuda = self._cuda
        self.engine = engine
        self.exec_context = engine.create_execution_context()
        if self.exec_context is None:
            raise BackendError("TensorRT could not create an execution context (GPU memory?)")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise BackendError(f"{self.engine_path}: expected one input and one output tensor, "
                               f"found {inputs} and {outputs}")
        self.input_name, self.output_name = inputs[0], outputs[0]
        for tensor in names:
            if trt.nptype(engine.get_tensor_dtype(tensor)) != np.float32:
                raise BackendError(f"{self.engine_path}: tensor {tensor} is not float32")

        self.max_batch = PROFILE["max"]
        self.snapshot_shape = (bundle.model_length, len(bundle.channels))
        units = len(bundle.classes) + (1 if bundle.activation == "softmax" else 0)
        self.output_shape = (bundle.model_length, units)
        self.host_in = cuda.pagelocked_empty((self.max_batch, *self.snapshot_shape), np.float32)
        self.host_out = cuda.pagelocked_empty((self.max_batch, *self.output_shape), np.float32)
        self.dev_in = cuda.mem_alloc(self.host_in.nbytes)
        self.dev_out = cuda.mem_alloc(self.host_out.nbytes)
        self.stream = cuda.Stream()
        self.exec_context.set_tensor_address(self.input_name, int(self.dev_in))
        self.exec_context.set_tensor_address(self.output_name, int(self.dev_out))

    def close(self) -> None:
        """Free the device buffers now (else when the backend is garbage collected)."""
        self._context.push()
        try:
            self.dev_in.free()
            self.dev_out.free()
        finally:
            self._context.pop()

    def describe(self) -> str:
        return (f"TensorRT {self.precision} on {self.gpu.name} (compute capability "
                f"{self.gpu.compute_capability}), engine {self.engine_path}")

    def run(self, batch: np.ndarray) -> np.ndarray:
        batch = np.asarray(batch, dtype=np.float32)
        if batch.shape[1:] != self.snapshot_shape:
            raise ValueError(f"snapshots of shape {batch.shape[1:]}; the model takes "
                             f"{self.snapshot_shape}")
        cuda = self._cuda
        out = np.empty((len(batch), *self.output_shape), np.float32)
        self._context.push()
        try:
            for lo in range(0, len(batch), self.max_batch):
                n = min(self.max_batch, len(batch) - lo)
                self.host_in[:n] = batch[lo:lo + n]
                cuda.memcpy_htod_async(self.dev_in, self.host_in[:n], self.stream)
                self.exec_context.set_input_shape(self.input_name, (n, *self.snapshot_shape))
                if not self.exec_context.execute_async_v3(self.stream.handle):
                    raise RuntimeError("TensorRT execute_async_v3 failed (see its log)")
                cuda.memcpy_dtoh_async(self.host_out[:n], self.dev_out, self.stream)
                self.stream.synchronize()
                out[lo:lo + n] = self.host_out[:n]
        finally:
            self._context.pop()
        return out
