"""segwatch agent: streaming anomaly segmentation for MQTT sensor streams.

Data path, one module per step:
``ingest`` (MQTT payloads to samples) -> ``window`` (samples on the grid, snapshots cut every
hop) -> ``snapshot`` (fill, resample to the model length, normalize) -> ``inference``
(ONNX Runtime) -> ``ensemble`` (overlapping snapshot scores averaged per time point) ->
``alarms`` (threshold, on-delay, hysteresis) -> ``store`` (SQLite) and ``service`` (MQTT).

This package never imports TensorFlow.
"""

__version__ = "0.1.0"
