"""The small parts of systemd's protocols picchat speaks, written by hand.

- sd_notify: one datagram of ``KEY=value`` lines to the AF_UNIX socket named
  in $NOTIFY_SOCKET (a leading "@" is the abstract namespace). READY=1,
  STATUS=..., WATCHDOG=1, STOPPING=1, RELOADING=1 with MONOTONIC_USEC=.
- The watchdog: $WATCHDOG_USEC (if $WATCHDOG_PID is unset or ours); we ping
  at half of it.
- Socket activation: fds from 3, $LISTEN_FDS of them, if $LISTEN_PID is ours,
  named by $LISTEN_FDNAMES (FileDescriptorName= in the .socket unit).

Nothing here runs without systemd having set those variables: outside
systemd every call is a cheap no-op.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

from . import logs

log = logs.get(__name__)

LISTEN_FDS_START = 3


class Notifier:
    """Sends sd_notify datagrams; does nothing if $NOTIFY_SOCKET is unset."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET", "")
        self.address: str | bytes | None = None
        self._sock: socket.socket | None = None
        self._status = ""
        if not address:
            return
        if address.startswith("@"):  # abstract namespace
            self.address = b"\0" + address[1:].encode()
        elif address.startswith("/"):
            self.address = address
        else:
            log.warning("Ignoring NOTIFY_SOCKET=%r: not a path or an abstract name", address)
            return
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.setblocking(False)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, *lines: str) -> bool:
        """Send one datagram; False if it could not be sent (systemd gone?)."""
        if self._sock is None or self.address is None:
            return False
        try:
            self._sock.sendto("\n".join(lines).encode(), self.address)
        except OSError as exc:
            log.debug("sd_notify %s failed: %s", lines, exc)
            return False
        return True

    def ready(self, status: str) -> None:
        self._status = status
        self.notify("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        """STATUS=, only when it changed."""
        if status != self._status:
            self._status = status
            self.notify(f"STATUS={status}")

    def watchdog(self) -> None:
        self.notify("WATCHDOG=1")

    def reloading(self) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        self.notify("STOPPING=1", "STATUS=Stopping")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _number(text: str) -> int | None:
    """A non-negative decimal number in ASCII digits, else None. (str.isdigit()
    alone also accepts "²", on which int() raises.)"""
    return int(text) if text.isascii() and text.isdigit() else None


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of $WATCHDOG_USEC), or None."""
    env = os.environ if env is None else env
    usec = _number(env.get("WATCHDOG_USEC", ""))
    pid = env.get("WATCHDOG_PID", "")
    if not usec:
        return None
    if pid and _number(pid) != os.getpid():
        return None
    return usec / 1e6 / 2


def listen_fds(env: Mapping[str, str] | None = None) -> list[tuple[int, str]]:
    """The sockets systemd passed us: (fd, name) pairs, or [] if none are ours."""
    env = os.environ if env is None else env
    n = _number(env.get("LISTEN_FDS", ""))
    if _number(env.get("LISTEN_PID", "")) != os.getpid() or n is None:
        return []
    names = env.get("LISTEN_FDNAMES", "").split(":") if env.get("LISTEN_FDNAMES") else []
    names += ["unknown"] * (n - len(names))
    fds = []
    for i in range(n):
        fd = LISTEN_FDS_START + i
        os.set_inheritable(fd, False)
        fds.append((fd, names[i]))
    return fds


def under_systemd(env: Mapping[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return "INVOCATION_ID" in env or "NOTIFY_SOCKET" in env
