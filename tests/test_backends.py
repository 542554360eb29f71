"""Inference backends: self-tests, auto selection, fallbacks, and the TensorRT engine cache.

The CPU backends run on a tiny exported bundle (a U-Net of 256 points). TensorRT's module
and its engine-cache logic are tested without a GPU; the tests that build and run engines
skip with the reason when tensorrt, pycuda or a GPU is missing.
"""

import json
import logging
import os
import shutil
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

from agent.bundle import TFLITE_FILE, load_bundle, sha256_file
from agent.inference import (
    TOLERANCE, BackendError, candidates, cpu_threads, load_backend, self_test,
)
from agent.inference import tensorrt_backend as trt_backend

METADATA = {
    "name": "tiny", "architecture": "unet", "channels": ["a"], "classes": ["spike"],
    "activation": "sigmoid", "sample_period": 1.0, "snapshot_length": 256, "hop": 64,
    "threshold": 0.5, "normalization": {"mode": "fixed", "center": [0.0], "scale": [1.0]},
}


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    pytest.importorskip("tensorflow", reason="the trainer extra (TensorFlow) is not installed")
    import keras

    from trainer.export import export_bundle
    from trainer.unet import build_unet

    keras.utils.set_random_seed(0)
    model = build_unet(n_channels=1, n_classes=1, model_length=256)
    return export_bundle(model, tmp_path_factory.mktemp("b") / "tiny", METADATA)


def _copy(bundle_dir, tmp_path, name="copy"):
    copy = tmp_path / name
    shutil.copytree(bundle_dir, copy)
    return copy


def _relist(bundle, name):
    """Record ``name``'s current sha256 in bundle.json, as an export would."""
    meta = json.loads((bundle / "bundle.json").read_text())
    meta["files"][name] = sha256_file(bundle / name)
    (bundle / "bundle.json").write_text(json.dumps(meta))


# CPU backends -----------------------------------------------------------------------------

@pytest.mark.parametrize("name, expected", [("onnxruntime", "onnxruntime-cpu"),
                                            ("litert", "litert-xnnpack")])
def test_cpu_backend_passes_its_self_test(bundle_dir, name, expected):
    backend = load_backend(load_bundle(bundle_dir), name, threads=1, strict=True)
    assert backend.name == expected and backend.kind == name
    assert backend.precision == "fp32" and backend.fallback_reason is None
    assert 0 <= backend.self_test_error <= TOLERANCE["fp32"]
    assert "1 thread" in backend.describe()


def test_litert_resizes_for_any_batch_and_agrees_with_onnxruntime(bundle_dir):
    bundle = load_bundle(bundle_dir)
    litert = load_backend(bundle, "litert", strict=True)
    ort = load_backend(bundle, "onnxruntime", strict=True)
    rng = np.random.default_rng(1)
    for size in (1, 3, 64, 1, 65):
        batch = rng.normal(size=(size, 256, 1)).astype(np.float32)
        got = litert.run(batch)
        assert got.shape == (size, 256, 1)
        assert np.abs(got - ort.run(batch)).max() <= TOLERANCE["fp32"]
    with pytest.raises(ValueError, match="shape"):
        litert.run(np.zeros((2, 128, 1), np.float32))


def test_self_test_catches_a_backend_whose_batch_disagrees_with_single_snapshots(bundle_dir):
    bundle = load_bundle(bundle_dir)
    good = load_backend(bundle, "onnxruntime", strict=True)

    class BatchDependent:
        name, precision = "batch-dependent", "fp32"

        def run(self, batch):
            return good.run(batch) + (0.01 if len(batch) > 1 else 0.0)

    with pytest.raises(BackendError, match="batched and single-snapshot outputs differ"):
        self_test(BatchDependent(), bundle)

    class NotFinite(BatchDependent):
        def run(self, batch):
            out = good.run(batch)
            out[0, 0, 0] = np.nan
            return out

    with pytest.raises(BackendError, match="non-finite"):
        self_test(NotFinite(), bundle)


# Selection and fallback ------------------------------------------------------------------

def test_auto_takes_litert_here_and_logs_why(bundle_dir, caplog):
    if _tensorrt_ready() is None:
        pytest.skip("this machine has TensorRT and a GPU: auto takes TensorRT")
    caplog.set_level(logging.INFO, logger="agent.inference")
    backend = load_backend(load_bundle(bundle_dir))
    assert backend.name == "litert-xnnpack"
    assert "tensorrt" in backend.fallback_reason
    chosen = [r.getMessage() for r in caplog.records if "inference on" in r.getMessage()]
    assert len(chosen) == 1 and "LiteRT" in chosen[0] and "tensorrt" in chosen[0]


def test_candidates_put_tensorrt_first_only_when_installed():
    order, skipped = candidates("auto")
    kinds = [kind for kind, _ in order]
    assert kinds[-2:] == ["litert", "onnxruntime"]
    if "tensorrt" in kinds:
        assert kinds[0] == "tensorrt" and not skipped
    else:
        assert skipped and skipped[0].startswith("tensorrt: ")
    assert [k for k, _ in candidates("litert", strict=True)[0]] == ["litert"]
    assert [k for k, _ in candidates("tensorrt")[0]] == ["tensorrt", "litert", "onnxruntime"]
    with pytest.raises(BackendError, match="unknown inference backend"):
        candidates("openvino")


def test_a_bundle_without_tflite_falls_back_to_onnxruntime(bundle_dir, tmp_path, caplog):
    copy = _copy(bundle_dir, tmp_path)
    (copy / TFLITE_FILE).unlink()
    meta = json.loads((copy / "bundle.json").read_text())
    del meta["files"][TFLITE_FILE]
    (copy / "bundle.json").write_text(json.dumps(meta))
    bundle = load_bundle(copy)
    assert bundle.tflite_file is None

    caplog.set_level(logging.INFO, logger="agent.inference")
    backend = load_backend(bundle)
    assert backend.name == "onnxruntime-cpu"
    assert f"has no {TFLITE_FILE}" in backend.fallback_reason
    assert any(f"has no {TFLITE_FILE}" in r.getMessage() for r in caplog.records)

    with pytest.raises(BackendError, match=f"has no {TFLITE_FILE}"):
        load_backend(bundle, "litert", strict=True)
    caplog.clear()
    backend = load_backend(bundle, "litert")
    assert backend.name == "onnxruntime-cpu"
    assert any(r.levelno == logging.WARNING and "requested backend litert" in r.getMessage()
               for r in caplog.records)


def test_a_truncated_tflite_is_refused_by_checksum_and_onnxruntime_takes_over(
        bundle_dir, tmp_path):
    copy = _copy(bundle_dir, tmp_path)
    data = (copy / TFLITE_FILE).read_bytes()
    (copy / TFLITE_FILE).write_bytes(data[: len(data) // 2])
    bundle = load_bundle(copy)  # the bundle stays usable: model.onnx is intact
    assert "checksum" in bundle.unusable[TFLITE_FILE]
    backend = load_backend(bundle)
    assert backend.name == "onnxruntime-cpu" and "checksum" in backend.fallback_reason


def test_a_corrupt_tflite_with_a_matching_checksum_fails_in_litert_not_the_agent(
        bundle_dir, tmp_path):
    copy = _copy(bundle_dir, tmp_path)
    data = (copy / TFLITE_FILE).read_bytes()
    (copy / TFLITE_FILE).write_bytes(data[: len(data) // 3])
    _relist(copy, TFLITE_FILE)  # as if exported broken: the checksum cannot catch it
    backend = load_backend(load_bundle(copy))
    assert backend.name == "onnxruntime-cpu"
    assert backend.fallback_reason.count("litert: ") == 1


def test_no_working_backend_is_an_error_with_every_reason(bundle_dir, tmp_path):
    copy = _copy(bundle_dir, tmp_path)
    with np.load(copy / "reference.npz") as ref:
        inputs, outputs = ref["inputs"], ref["outputs"]
    np.savez_compressed(copy / "reference.npz", inputs=inputs, outputs=outputs + 0.01)
    _relist(copy, "reference.npz")
    with pytest.raises(BackendError) as info:
        load_backend(load_bundle(copy))
    message = str(info.value)
    assert "litert: " in message and "onnxruntime: " in message
    assert message.count("differ from the bundle's reference") == 2


def test_unknown_backend_or_precision_is_refused(bundle_dir):
    bundle = load_bundle(bundle_dir)
    with pytest.raises(BackendError, match="unknown inference backend"):
        load_backend(bundle, "cuda")
    with pytest.raises(BackendError, match="unknown precision"):
        load_backend(bundle, precision="int8")


def test_cpu_threads_defaults_to_the_cpus_this_process_may_use():
    assert cpu_threads(3) == 3
    assert cpu_threads(0) == len(os.sched_getaffinity(0))


# TensorRT without a GPU ------------------------------------------------------------------

def _tensorrt_ready() -> str | None:
    """None when TensorRT can run here, else why not (the skip reason)."""
    try:
        import pycuda.driver as cuda
        import tensorrt  # noqa: F401
    except ImportError as exc:
        return f"tensorrt or pycuda not installed ({exc})"
    try:
        cuda.init()
        if cuda.Device.count() == 0:
            return "no CUDA device"
    except cuda.Error as exc:
        return f"CUDA cannot start: {exc}"
    return None


def test_tensorrt_module_imports_without_tensorrt_and_fails_cleanly(bundle_dir):
    if not _tensorrt_ready():
        pytest.skip("TensorRT can run here; the GPU tests cover it")
    bundle = load_bundle(bundle_dir)
    with pytest.raises(BackendError, match="tensorrt|pycuda|CUDA"):
        trt_backend.TensorRTBackend(bundle)
    backend = load_backend(bundle, "tensorrt", precision="fp32")
    assert backend.kind in ("litert", "onnxruntime")
    assert backend.fallback_reason.startswith("tensorrt: ")


def test_build_engine_command_without_tensorrt_says_what_to_install(bundle_dir):
    if not _tensorrt_ready():
        pytest.skip("TensorRT can run here; the GPU tests cover it")
    result = subprocess.run([sys.executable, "-m", "agent", "build-engine", "--bundle",
                             str(bundle_dir), "--precision", "fp32"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "segwatch-agent build-engine:" in result.stderr
    assert "pip install" in result.stderr or "CUDA" in result.stderr


GPU = trt_backend.GpuInfo("NVIDIA Jetson Orin", "8.7")


@pytest.fixture
def cache(bundle_dir, tmp_path):
    """A written engine cache (fake engine bytes) and what this 'machine' expects."""
    bundle = load_bundle(bundle_dir)
    engine, sidecar = trt_backend.engine_paths(bundle, "fp16", tmp_path / "engines")
    expected = trt_backend.engine_metadata(bundle, "fp16", GPU, "10.3.0")
    trt_backend.write_engine_cache(engine, sidecar, os.urandom(4096), expected)
    return bundle, engine, sidecar, expected


def test_engine_cache_is_used_when_everything_matches(cache):
    bundle, engine, sidecar, expected = cache
    assert engine.name == "model.fp16.engine" and sidecar.name == "model.fp16.engine.json"
    assert trt_backend.check_engine_cache(engine, sidecar, expected) is None
    recorded = json.loads(sidecar.read_text())
    assert recorded["onnx_sha256"] == bundle.metadata["files"]["model.onnx"]
    assert recorded["engine_bytes"] == 4096 and recorded["gpu_name"] == GPU.name
    assert recorded["profile"] == {"min": 1, "opt": 64, "max": 64}
    assert not list(engine.parent.glob(".*tmp"))


def test_default_engine_folder_is_next_to_the_bundle(bundle_dir):
    bundle = load_bundle(bundle_dir)
    engine, _ = trt_backend.engine_paths(bundle, "fp32")
    assert engine == bundle_dir / "engines" / "model.fp32.engine"


@pytest.mark.parametrize("key, value", [
    ("gpu_name", "NVIDIA A2"),
    ("compute_capability", "8.6"),
    ("tensorrt_version", "10.7.0"),
    ("precision", "fp32"),
    ("onnx_sha256", "0" * 64),
    ("profile", {"min": 1, "opt": 8, "max": 8}),
])
def test_an_engine_built_elsewhere_is_detected(cache, key, value):
    _, engine, sidecar, expected = cache
    here = dict(expected, **{key: value})
    reason = trt_backend.check_engine_cache(engine, sidecar, here)
    assert reason and key in reason and repr(value) in reason


def test_a_truncated_or_corrupt_engine_is_detected(cache):
    _, engine, sidecar, expected = cache
    data = engine.read_bytes()
    engine.write_bytes(data[:1000])
    assert "truncated" in trt_backend.check_engine_cache(engine, sidecar, expected)
    engine.write_bytes(bytes(len(data)))
    assert "corrupt" in trt_backend.check_engine_cache(engine, sidecar, expected)


def test_missing_or_broken_engine_files_are_detected(cache):
    _, engine, sidecar, expected = cache
    sidecar.write_text("{not json")
    assert "unreadable" in trt_backend.check_engine_cache(engine, sidecar, expected)
    sidecar.write_text("[1, 2]")
    assert "not a JSON object" in trt_backend.check_engine_cache(engine, sidecar, expected)
    sidecar.unlink()
    assert "missing" in trt_backend.check_engine_cache(engine, sidecar, expected)
    engine.unlink()
    assert "no engine" in trt_backend.check_engine_cache(engine, sidecar, expected)


def test_a_build_that_died_is_not_retried_at_start(cache):
    _, engine, _, _ = cache
    marker = engine.with_name(engine.name + ".building")
    assert trt_backend.build_marker_state(engine) is None

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    marker.write_text(f"{dead.pid} 0\n")
    state, reason = trt_backend.build_marker_state(engine)
    assert state == "crashed" and "build-engine" in reason

    marker.write_text(f"{os.getppid()} 0\n")  # a live process that is not us
    assert trt_backend.build_marker_state(engine)[0] == "running"

    with trt_backend._BuildMarker(engine):  # our own build in progress
        assert marker.read_text().split()[0] == str(os.getpid())
        assert trt_backend.build_marker_state(engine) is None
    assert not marker.exists()


# TensorRT on a GPU -------------------------------------------------------------------------

needs_gpu = pytest.mark.skipif(_tensorrt_ready() is not None,
                               reason=f"needs TensorRT on a GPU: {_tensorrt_ready()}")


@needs_gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tensorrt_builds_caches_and_self_tests_an_engine(bundle_dir, tmp_path, precision):
    bundle = load_bundle(bundle_dir)
    engines = tmp_path / "engines"
    backend = load_backend(bundle, "tensorrt", precision=precision, engine_dir=engines,
                           strict=True)
    assert backend.name == f"tensorrt-{precision}"
    assert backend.self_test_error <= TOLERANCE[precision]
    engine, sidecar = trt_backend.engine_paths(bundle, precision, engines)
    built = engine.stat().st_mtime_ns

    again = load_backend(bundle, "tensorrt", precision=precision, engine_dir=engines,
                         build_engine=False, strict=True)
    assert engine.stat().st_mtime_ns == built  # the cache was used, not rebuilt
    batch = np.random.default_rng(2).normal(size=(70, 256, 1)).astype(np.float32)
    ort = load_backend(bundle, "onnxruntime", strict=True)
    assert np.abs(again.run(batch) - ort.run(batch)).max() <= TOLERANCE[precision]


@needs_gpu
def test_tensorrt_rebuilds_a_truncated_engine(bundle_dir, tmp_path):
    bundle = load_bundle(bundle_dir)
    engines = tmp_path / "engines"
    load_backend(bundle, "tensorrt", precision="fp32", engine_dir=engines, strict=True)
    engine, sidecar = trt_backend.engine_paths(bundle, "fp32", engines)
    data = engine.read_bytes()
    engine.write_bytes(data[: len(data) // 2])
    with pytest.raises(BackendError, match="truncated"):
        load_backend(bundle, "tensorrt", precision="fp32", engine_dir=engines,
                     build_engine=False, strict=True)
    backend = load_backend(bundle, "tensorrt", precision="fp32", engine_dir=engines,
                           strict=True)
    assert backend.name == "tensorrt-fp32"
    recorded = json.loads(sidecar.read_text())
    assert engine.stat().st_size == recorded["engine_bytes"] > len(data) // 2

    # Without rebuilding at load, a truncated engine is a fallback to the CPU, not a crash.
    engine.write_bytes(engine.read_bytes()[:1000])
    backend = load_backend(bundle, "tensorrt", precision="fp32", engine_dir=engines,
                           build_engine=False)
    assert backend.kind in ("litert", "onnxruntime") and "truncated" in backend.fallback_reason


@needs_gpu
def test_tensorrt_does_not_retry_a_build_that_killed_the_agent(bundle_dir, tmp_path):
    bundle = load_bundle(bundle_dir)
    engines = tmp_path / "engines"
    engine, _ = trt_backend.engine_paths(bundle, "fp16", engines)
    engines.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    engine.with_name(engine.name + ".building").write_text(f"{dead.pid} 0\n")
    backend = load_backend(bundle, "tensorrt", engine_dir=engines)
    assert backend.kind in ("litert", "onnxruntime")
    assert "did not finish" in backend.fallback_reason and not engine.exists()


# Configuration ---------------------------------------------------------------------------

def _config(inference: dict):
    from pathlib import Path

    from agent.config import parse_config

    raw = {
        "broker": {"host": "127.0.0.1", "port": 1883, "client_id": "gw1"},
        "database": "alarms.db",
        "inference": inference,
        "assets": [{"name": "pump1", "sample_period": "1s", "model": "../models/dodgers-unet",
                    "channels": [{"name": "flow", "topic": "plant/pump1/flow"}]}],
    }
    return parse_config(raw, Path("/etc/segwatch/agent.yaml"))


def test_configuration_chooses_the_backend_precision_and_engine_folder():
    from agent.config import ConfigError

    default = _config({})
    assert (default.inference_backend, default.inference_precision) == ("auto", "fp16")
    assert default.engine_dir is None
    chosen = _config({"backend": "tensorrt", "precision": "fp32", "engine_dir": "engines"})
    assert chosen.inference_backend == "tensorrt" and chosen.inference_precision == "fp32"
    assert str(chosen.engine_dir) == "/etc/segwatch/engines"
    for bad, key in (({"backend": "cuda"}, "inference.backend"),
                     ({"precision": "int8"}, "inference.precision")):
        with pytest.raises(ConfigError, match=key):
            _config(bad)


# TensorRT's code path on a stand-in runtime ------------------------------------------------
#
# Without a GPU the real API cannot run, but the backend's own logic can: the engine
# cache, the build, buffers sized for the profile, batches split at 64, copies in and out,
# and context push/pop. These stand-ins follow the tensorrt 10 and pycuda calls the backend
# makes; the "engine" runs the ONNX graph with ONNX Runtime on "device" arrays.

class _StandInCuda:
    class Error(Exception):
        pass

    def __init__(self):
        self.memory: dict[int, np.ndarray] = {}
        self.depth = 0
        self.copies = 0
        runtime = self

        class Context:
            def push(self):
                runtime.depth += 1

            def pop(self):
                assert runtime.depth > 0, "pop without push"
                runtime.depth -= 1

        class Device:
            count = staticmethod(lambda: 1)

            def __init__(self, index):
                assert index == 0

            def name(self):
                return "Stand-in GPU"

            def compute_capability(self):
                return (8, 7)

            def retain_primary_context(self):
                return Context()

        class Allocation:
            def __init__(self, nbytes):
                self.address = 0x1000 + len(runtime.memory) * 0x100000
                runtime.memory[self.address] = np.zeros(nbytes // 4, np.float32)

            def __int__(self):
                return self.address

            def free(self):
                runtime.memory.pop(self.address)

        class Stream:
            handle = 7

            def synchronize(self):
                pass

        self.Device, self.Stream = Device, Stream
        self.mem_alloc = Allocation

    def init(self):
        pass

    def pagelocked_empty(self, shape, dtype):
        return np.empty(shape, dtype)

    def memcpy_htod_async(self, device, host, stream):
        assert self.depth > 0, "copy outside the context"
        flat = np.ascontiguousarray(host).reshape(-1)
        self.memory[int(device)][:flat.size] = flat
        self.copies += 1

    def memcpy_dtoh_async(self, host, device, stream):
        assert self.depth > 0, "copy outside the context"
        host.reshape(-1)[:] = self.memory[int(device)][:host.size]
        self.copies += 1


def _stand_in_tensorrt(cuda: _StandInCuda, builds: list):
    import types

    import onnxruntime as ort

    trt = types.SimpleNamespace(__version__="10.0.0-standin")
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
    trt.BuilderFlag = types.SimpleNamespace(FP16="fp16", TF32="tf32")
    trt.TensorIOMode = types.SimpleNamespace(INPUT="in", OUTPUT="out")
    trt.nptype = lambda dtype: np.float32
    magic = b"STAND-IN ENGINE\n"

    class Network:
        def get_input(self, i):
            return types.SimpleNamespace(name="snapshot")

    class Parser:
        num_errors = 0

        def __init__(self, network, logger):
            self.network = network

        def parse(self, data):
            self.network.onnx = data
            return True

    class Config:
        def __init__(self):
            self.flags, self.profiles = set(), []

        def set_memory_pool_limit(self, pool, size):
            pass

        def set_flag(self, flag):
            self.flags.add(flag)

        def clear_flag(self, flag):
            self.flags.discard(flag)

        def add_optimization_profile(self, profile):
            self.profiles.append(profile)

    class Profile:
        def set_shape(self, name, low, opt, high):
            self.shapes = (name, low, opt, high)

    class Builder:
        def __init__(self, logger):
            pass

        create_network = staticmethod(lambda flags: Network())
        create_builder_config = staticmethod(Config)
        create_optimization_profile = staticmethod(Profile)

        def build_serialized_network(self, network, config):
            builds.append((sorted(config.flags), config.profiles[0].shapes))
            return magic + network.onnx

    class Context:
        def __init__(self, session):
            self.session, self.addresses, self.shape = session, {}, None

        def set_tensor_address(self, name, address):
            self.addresses[name] = address

        def set_input_shape(self, name, shape):
            assert 1 <= shape[0] <= 64, f"batch {shape[0]} outside the profile"
            self.shape = shape

        def execute_async_v3(self, stream_handle):
            assert cuda.depth > 0 and stream_handle == 7
            size = int(np.prod(self.shape))
            batch = cuda.memory[self.addresses["snapshot"]][:size].reshape(self.shape)
            out = self.session.run(None, {"snapshot": batch})[0].reshape(-1)
            cuda.memory[self.addresses["scores"]][:out.size] = out
            return True

    class Engine:
        num_io_tensors = 2

        def __init__(self, onnx):
            self.session = ort.InferenceSession(onnx, providers=["CPUExecutionProvider"])

        def get_tensor_name(self, i):
            return ("snapshot", "scores")[i]

        def get_tensor_mode(self, name):
            return "in" if name == "snapshot" else "out"

        def get_tensor_dtype(self, name):
            return "float32"

        def create_execution_context(self):
            return Context(self.session)

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            return Engine(data[len(magic):]) if data.startswith(magic) else None

    trt.Builder, trt.OnnxParser, trt.Runtime = Builder, Parser, Runtime
    return trt


@pytest.fixture
def stand_in(monkeypatch):
    import types

    cuda, builds = _StandInCuda(), []
    trt = _stand_in_tensorrt(cuda, builds)
    pycuda = types.ModuleType("pycuda")
    pycuda.driver = cuda
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "pycuda", pycuda)
    monkeypatch.setitem(sys.modules, "pycuda.driver", cuda)
    return cuda, builds


def test_tensorrt_path_builds_caches_runs_and_reuses_an_engine(bundle_dir, tmp_path, stand_in):
    cuda, builds = stand_in
    bundle = load_bundle(bundle_dir)
    engines = tmp_path / "engines"
    backend = load_backend(bundle, "tensorrt", precision="fp32", engine_dir=engines,
                           strict=True)
    assert backend.name == "tensorrt-fp32" and backend.fallback_reason is None
    assert "Stand-in GPU" in backend.describe()
    assert builds == [([], ("snapshot", (1, 256, 1), (64, 256, 1), (64, 256, 1)))]
    engine, sidecar = trt_backend.engine_paths(bundle, "fp32", engines)
    recorded = json.loads(sidecar.read_text())
    assert recorded["gpu_name"] == "Stand-in GPU" and recorded["compute_capability"] == "8.7"
    assert recorded["tensorrt_version"] == "10.0.0-standin"
    assert not engine.with_name(engine.name + ".building").exists()

    batch = np.random.default_rng(3).normal(size=(150, 256, 1)).astype(np.float32)
    expected = load_backend(bundle, "onnxruntime", strict=True).run(batch)
    copies = cuda.copies
    assert np.abs(backend.run(batch) - expected).max() <= 1e-5
    assert cuda.copies - copies == 6  # 64 + 64 + 22: one copy in and one out for each
    assert cuda.depth == 0

    again = load_backend(bundle, "tensorrt", precision="fp32", engine_dir=engines,
                         build_engine=False, strict=True)
    assert len(builds) == 1 and again.name == "tensorrt-fp32"
    fp16 = load_backend(bundle, "tensorrt", precision="fp16", engine_dir=engines, strict=True)
    assert fp16.name == "tensorrt-fp16" and builds[-1][0] == ["fp16"]
    backend.close()


def test_tensorrt_path_rebuilds_a_stale_engine_and_falls_back_when_it_may_not(
        bundle_dir, tmp_path, stand_in):
    _, builds = stand_in
    bundle = load_bundle(bundle_dir)
    engines = tmp_path / "engines"
    load_backend(bundle, "tensorrt", engine_dir=engines, strict=True)
    engine, sidecar = trt_backend.engine_paths(bundle, "fp16", engines)

    recorded = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps(dict(recorded, gpu_name="NVIDIA A2")))
    fallback = load_backend(bundle, "tensorrt", engine_dir=engines, build_engine=False)
    assert fallback.kind == "litert" and "'NVIDIA A2'" in fallback.fallback_reason
    assert "build-engine" in fallback.fallback_reason
    rebuilt = load_backend(bundle, "tensorrt", engine_dir=engines, strict=True)
    assert rebuilt.name == "tensorrt-fp16" and len(builds) == 2

    engine.write_bytes(engine.read_bytes()[:100])
    assert load_backend(bundle, "tensorrt", engine_dir=engines).kind == "tensorrt"
    assert len(builds) == 3  # truncated: rebuilt at load

    recorded = json.loads(sidecar.read_text())
    engine.write_bytes(b"not an engine")  # deserializes to None, sidecar made to match
    sidecar.write_text(json.dumps(dict(recorded, engine_bytes=13,
                                       engine_sha256=sha256_file(engine))))
    assert load_backend(bundle, "tensorrt", engine_dir=engines).kind == "tensorrt"
    assert len(builds) == 4

    engine.with_name(engine.name + ".building").write_text("999999999 0\n")
    engine.unlink()
    crashed = load_backend(bundle, "tensorrt", engine_dir=engines)
    assert crashed.kind == "litert" and "did not finish" in crashed.fallback_reason
    assert len(builds) == 4
    path = trt_backend.build_engine(bundle, "fp16", engines)  # by hand: retries the build
    assert path == engine and len(builds) == 5
    assert not engine.with_name(engine.name + ".building").exists()


def test_tensorrt_path_reports_an_unwritable_engine_folder(bundle_dir, tmp_path, stand_in):
    if os.geteuid() == 0:
        blocked = tmp_path / "file-not-folder"
        blocked.write_text("")
        engines = blocked / "engines"  # cannot create a folder under a file, even as root
    else:
        engines = tmp_path / "ro"
        engines.mkdir(mode=0o500)
    backend = load_backend(load_bundle(bundle_dir), "tensorrt", engine_dir=engines)
    assert backend.kind == "litert"
    assert "cannot write the engine cache" in backend.fallback_reason
