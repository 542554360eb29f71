"""TLS to the broker with a CA made for the test: client certificates, a wrong CA.

``openssl`` makes a CA, a server certificate for 127.0.0.1 and localhost, and a client
certificate in the test's folder. Mosquitto gets a second listener with TLS that requires a
client certificate; the agent connects there, while the test's own clients use the plain
listener.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from agent.demo import free_port
from conftest import Mosquitto
from test_resilience import Agent, Watcher, write_config

ROOT = Path(__file__).resolve().parent.parent


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(folder: Path, name: str) -> None:
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
            "-subj", f"/CN=segwatch test {name}", cwd=folder)


def make_cert(folder: Path, name: str, ca: str, extensions: str) -> None:
    (folder / f"{name}.ext").write_text(extensions)
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
            cwd=folder)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext",
            cwd=folder)


@pytest.fixture
def pki(tmp_path) -> Path:
    if shutil.which("openssl") is None:
        pytest.fail("openssl is not installed (apt-get install openssl)")
    folder = tmp_path / "pki"
    folder.mkdir()
    make_ca(folder, "ca")
    make_ca(folder, "other-ca")
    make_cert(folder, "server", "ca", "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
              "extendedKeyUsage=serverAuth\nsubjectKeyIdentifier=hash\n"
              "authorityKeyIdentifier=keyid,issuer\n")
    make_cert(folder, "segwatch-agent", "ca", "extendedKeyUsage=clientAuth\n"
              "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n")
    return folder


@pytest.fixture
def tls_broker(tmp_path, pki):
    """Mosquitto with its plain listener and a TLS listener that requires a client cert.

    ``user root``: Mosquitto started as root would otherwise switch to the user mosquitto,
    who cannot read the test's private folder (it changes nothing for other users).
    """
    tls_port = free_port()
    broker = Mosquitto(tmp_path, f"user root\nlistener {tls_port} 127.0.0.1\n"
                       f"cafile {pki}/ca.pem\ncertfile {pki}/server.pem\n"
                       f"keyfile {pki}/server.key\nrequire_certificate true\n").start()
    broker.tls_port = tls_port
    yield broker
    broker.stop()


def tls_config(tmp_path: Path, port: int, bundle: Path, pki: Path, ca: str) -> Path:
    return write_config(tmp_path, port, bundle, broker={"tls": {
        "ca_file": str(pki / f"{ca}.pem"), "cert_file": str(pki / "segwatch-agent.pem"),
        "key_file": str(pki / "segwatch-agent.key")}})


def test_agent_connects_with_its_client_certificate(tmp_path, pki, tls_broker,
                                                    dodgers_bundle):
    config = tls_config(tmp_path, tls_broker.tls_port, dodgers_bundle, pki, "ca")
    watcher = Watcher(tls_broker.port)
    agent = Agent(config).start()
    try:
        watcher.wait_online(agent, "agent")
        agent.send(signal.SIGTERM)
        assert agent.wait(30) == 0
        watcher.wait(lambda: watcher.state("agent").get("state") == "offline", 10, "offline")
    finally:
        agent.kill()
        watcher.close()
    assert f"connected to 127.0.0.1:{tls_broker.tls_port}" in agent.log()


def test_a_broker_certificate_from_another_ca_is_refused_with_a_clear_log(tmp_path, pki,
                                                                          tls_broker,
                                                                          dodgers_bundle):
    config = tls_config(tmp_path, tls_broker.tls_port, dodgers_bundle, pki, "other-ca")
    watcher = Watcher(tls_broker.port)
    agent = Agent(config).start()
    try:
        watcher.wait(lambda: "is not trusted" in agent.log() or not agent.alive(), 60,
                     "the TLS refusal in the log")
        assert agent.alive(), agent.log()  # it keeps retrying: the broker may be fixed
        assert watcher.state("agent") == {}  # it never got through
        agent.send(signal.SIGTERM)
        assert agent.wait(30) == 0
    finally:
        agent.kill()
        watcher.close()
    line = next(line for line in agent.log().splitlines() if "is not trusted" in line)
    assert f"TLS: the certificate of 127.0.0.1:{tls_broker.tls_port} is not trusted" in line
    assert "broker.tls.ca_file" in line and "other-ca.pem" in line


def test_a_missing_key_file_is_a_startup_error_naming_the_key(tmp_path, pki, dodgers_bundle):
    config = tls_config(tmp_path, 1, dodgers_bundle, pki, "ca")
    (pki / "segwatch-agent.key").unlink()
    done = subprocess.run([sys.executable, "-m", "agent", "run", "--config", str(config)],
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "key 'broker.tls.key_file'" in done.stderr and "does not exist" in done.stderr
