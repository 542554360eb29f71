"""Shared fixtures: a real Mosquitto broker on a free loopback port, data paths, bundles."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from agent.demo import free_port

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
DODGERS = SHARED_DATA / "dodgers"
DODGERS_BUNDLE = ROOT / "models" / "dodgers-unet"


def _mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)),
        None,
    )


class Mosquitto:
    """A Mosquitto process of the test's own, on 127.0.0.1 and a free port."""

    def __init__(self, workdir: Path, extra_config: str = ""):
        binary = _mosquitto_binary()
        if binary is None:
            pytest.fail("mosquitto is not installed (apt-get install mosquitto; .ci/run does)")
        self.binary = binary
        self.port = free_port()
        self.workdir = workdir
        self.extra_config = extra_config
        self.process: subprocess.Popen | None = None

    def start(self) -> "Mosquitto":
        conf = self.workdir / f"mosquitto-{self.port}.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            f"max_queued_messages 100000\n{self.extra_config}"
        )
        self.log = open(self.workdir / f"mosquitto-{self.port}.log", "w")
        self.process = subprocess.Popen([self.binary, "-c", str(conf)], stdout=self.log,
                                        stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                if self.process.poll() is not None:
                    raise RuntimeError(f"mosquitto exited: see {self.log.name}")
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start listening within 10 s")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self.log.close()


@pytest.fixture
def mosquitto(tmp_path):
    broker = Mosquitto(tmp_path).start()
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def dodgers_dir() -> Path:
    if not (DODGERS / "Dodgers.data").is_file():
        pytest.fail(f"the Dodgers data set is expected in {DODGERS}")
    return DODGERS


@pytest.fixture(scope="session")
def dodgers_bundle() -> Path:
    return DODGERS_BUNDLE
