"""The systemd notification protocol (``sd_notify``), without a dependency.

Under ``Type=notify`` systemd passes the path of a datagram socket in ``$NOTIFY_SOCKET``;
the service writes ``KEY=value`` lines to it: ``READY=1`` once it serves, ``STATUS=...`` for
``systemctl status``, ``WATCHDOG=1`` to feed the watchdog (``WatchdogSec=``, passed as
``$WATCHDOG_USEC``), ``RELOADING=1`` and ``STOPPING=1``. Outside systemd (no
``$NOTIFY_SOCKET``) every call does nothing, so the agent runs the same in a shell.

A name starting with ``@`` is a socket in the abstract namespace. Sending never blocks and
never raises: a notification that cannot be sent is logged once and the agent goes on.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger(__name__)


class Notifier:
    """Sends notifications to the service manager, if there is one."""

    def __init__(self, environ: dict | None = None):
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        self.address: str | bytes | None = None
        if path.startswith("@"):
            self.address = b"\0" + path[1:].encode()
        elif path.startswith("/"):
            self.address = path
        self.watchdog_interval = _watchdog_interval(env)
        self._last_watchdog = float("-inf")
        self._failed = False
        self._socket: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *lines: str) -> bool:
        """Send ``KEY=value`` lines in one datagram; False when not sent."""
        if self.address is None:
            return False
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX,
                                             socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._socket.setblocking(False)
            self._socket.sendto("\n".join(lines).encode(), self.address)
            return True
        except OSError as exc:
            if not self._failed:
                log.warning("cannot notify systemd at %s: %s; systemd will not see the "
                            "agent's state (check NotifyAccess= in the unit)",
                            os.environ.get("NOTIFY_SOCKET"), exc)
                self._failed = True
            return False

    def ready(self, status: str) -> bool:
        return self.send("READY=1", f"STATUS={status}", _monotonic_line())

    def status(self, status: str) -> bool:
        return self.send(f"STATUS={status}")

    def reloading(self) -> bool:
        return self.send("RELOADING=1", _monotonic_line())

    def stopping(self, status: str = "stopping") -> bool:
        return self.send("STOPPING=1", f"STATUS={status}")

    def watchdog(self, force: bool = False) -> bool:
        """Feed the watchdog, at most twice per ``WatchdogSec`` unless ``force``."""
        if self.watchdog_interval is None:
            return False
        now = time.monotonic()
        if not force and now - self._last_watchdog < self.watchdog_interval / 2:
            return False
        self._last_watchdog = now
        return self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _watchdog_interval(env) -> float | None:
    """``WatchdogSec`` in seconds if it applies to this process, else None."""
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        seconds = int(usec) / 1e6
    except ValueError:
        log.warning("WATCHDOG_USEC=%r is not a number of microseconds; watchdog not fed", usec)
        return None
    return seconds if seconds > 0 else None


def _monotonic_line() -> str:
    return f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"
