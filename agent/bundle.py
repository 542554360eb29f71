"""Model bundles: the ONNX graph of a trained model with everything needed to run it.

A bundle is a folder:

- ``bundle.json``: metadata (model id, architecture, model length, channels in order,
  classes and activation, normalization, snapshot length and hop, sample period, suggested
  threshold and minimum duration, training data and code version, sha256 of every file);
- ``model.onnx``: the graph, input ``snapshot`` (batch, model length, channels), output
  (batch, model length, outputs);
- ``reference.npz``: fixed inputs and the outputs Keras gave for them at export, for the
  self-test at load;
- ``model.tflite`` (optional, listed in ``files`` when present): the same model for LiteRT.

``load_bundle`` verifies checksums and fields and refuses a bundle that does not pass. An
optional file that fails its checksum does not refuse the bundle: it is recorded in
``ModelBundle.unusable`` (with the reason) and the backend that needs it is not used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import numpy as np

from agent.snapshot import Normalizer

log = logging.getLogger(__name__)

FORMAT = "segwatch-bundle/1"
METADATA = "bundle.json"
MODEL_FILE = "model.onnx"
REFERENCE_FILE = "reference.npz"
TFLITE_FILE = "model.tflite"  # optional: the same model for LiteRT


class BundleError(ValueError):
    """A model bundle that cannot be used; the message says which file and why."""


@dataclasses.dataclass(frozen=True)
class ModelBundle:
    path: Path
    metadata: dict
    unusable: dict = dataclasses.field(default_factory=dict)  # optional file -> reason

    @property
    def model_id(self) -> str:
        return self.metadata["model_id"]

    @property
    def model_length(self) -> int:
        return int(self.metadata["model_length"])

    @property
    def channels(self) -> list[str]:
        return list(self.metadata["channels"])

    @property
    def classes(self) -> list[str]:
        return list(self.metadata["classes"])

    @property
    def activation(self) -> str:
        return self.metadata["activation"]

    @property
    def model_file(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def tflite_file(self) -> Path | None:
        """The LiteRT model, or None for a bundle exported without one."""
        return self.path / TFLITE_FILE if TFLITE_FILE in self.metadata["files"] else None

    def normalizer(self, mode: str = "bundle") -> Normalizer:
        """The bundle's fixed scales (``bundle``) or per-snapshot scaling (``snapshot``)."""
        norm = self.metadata["normalization"]
        clip = float(norm.get("clip", 10.0))
        if mode == "snapshot" or norm["mode"] == "snapshot":
            return Normalizer("snapshot", clip=clip)
        return Normalizer(
            "fixed",
            center=np.asarray(norm["center"], dtype=np.float64),
            scale=np.asarray(norm["scale"], dtype=np.float64),
            clip=clip,
        )

    def class_scores(self, outputs: np.ndarray) -> np.ndarray:
        """Scores of the anomaly classes: softmax bundles drop the background output 0."""
        return outputs[..., 1:] if self.activation == "softmax" else outputs

    def reference(self) -> tuple[np.ndarray, np.ndarray]:
        with np.load(self.path / REFERENCE_FILE) as data:
            return data["inputs"], data["outputs"]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


_REQUIRED = {
    "format": str, "model_id": str, "architecture": str, "model_length": int,
    "channels": list, "classes": list, "activation": str, "normalization": dict,
    "snapshot_length": int, "hop": int, "threshold": (int, float), "files": dict,
}


def _check_values(metadata: dict, meta_path: Path) -> None:
    """Values that would load but make the agent silently wrong."""
    def fail(message: str):
        raise BundleError(f"{meta_path}: {message}")

    if not metadata["channels"] or not metadata["classes"]:
        fail("'channels' and 'classes' must not be empty")
    if not 0.0 <= metadata["threshold"] <= 1.0:
        fail(f"threshold {metadata['threshold']} is outside 0 to 1")
    if not 1 <= metadata["hop"] <= metadata["snapshot_length"]:
        fail(f"hop {metadata['hop']} must be between 1 and snapshot_length "
             f"{metadata['snapshot_length']}")
    if metadata["model_length"] < 16:
        fail(f"model_length {metadata['model_length']} is too short")
    norm = metadata["normalization"]
    if norm.get("mode") not in ("fixed", "snapshot"):
        fail("normalization.mode must be 'fixed' or 'snapshot'")
    if norm["mode"] == "fixed":
        n = len(metadata["channels"])
        center, scale = norm.get("center", []), norm.get("scale", [])
        if len(center) != n or len(scale) != n:
            fail(f"fixed normalization needs a center and a scale per channel ({n})")
        if not all(isinstance(x, (int, float)) and np.isfinite(x) for x in center) or \
                not all(isinstance(x, (int, float)) and np.isfinite(x) and x > 0 for x in scale):
            fail("normalization center must be finite numbers and scale positive numbers")


def load_bundle(path: str | Path) -> ModelBundle:
    """Read a bundle folder, check its fields and the sha256 of each of its files."""
    path = Path(path)
    meta_path = path / METADATA
    try:
        metadata = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"{meta_path}: missing; is {path} a model bundle folder?") from None
    except (OSError, ValueError) as exc:
        raise BundleError(f"{meta_path}: unreadable: {exc}") from None

    for key, kind in _REQUIRED.items():
        if not isinstance(metadata.get(key), kind):
            raise BundleError(f"{meta_path}: field {key!r} is missing or of the wrong type")
    if metadata["format"] != FORMAT:
        raise BundleError(f"{meta_path}: format {metadata['format']!r}; this agent reads "
                          f"{FORMAT!r}")
    if metadata["activation"] not in ("sigmoid", "softmax"):
        raise BundleError(f"{meta_path}: activation must be sigmoid or softmax")
    _check_values(metadata, meta_path)

    # Required files refuse the bundle; an optional listed file (model.tflite) only itself.
    unusable = {}
    for name in dict.fromkeys([MODEL_FILE, REFERENCE_FILE, *metadata["files"]]):
        expected = metadata["files"].get(name)
        file = path / name
        problem = None
        if not file.is_file():
            problem = f"{file}: missing from the bundle"
        elif expected is None or sha256_file(file) != expected:
            problem = (f"{file}: checksum does not match bundle.json; the file is corrupt or "
                       "was changed after export. Re-export the bundle.")
        if problem and name in (MODEL_FILE, REFERENCE_FILE):
            raise BundleError(problem)
        if problem:
            log.warning("%s; the bundle is used without it", problem)
            unusable[name] = problem
    log.debug("bundle %s verified (%s)", path, metadata["model_id"])
    return ModelBundle(path, metadata, unusable)
