"""segwatch trainer: builds, trains, evaluates and exports the U-Net models (TensorFlow/Keras).

Runs on a workstation or a GPU server; the agent never imports this package.
"""

__version__ = "0.1.0"
