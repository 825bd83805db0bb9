"""The serial bridge on the stand-in Pi: a host pty bound in as its UART.

Like a USB-serial cable into a headless Pi: the test holds the far end (the
laptop's terminal), the installed service holds the Pi's end. Run with
`make system`.
"""

from __future__ import annotations

import os
import pty
import select
import time
import tty
from collections.abc import Iterator
from pathlib import Path

import pytest

from .pi import Pi, require

ROOT = Path(__file__).parents[2]

require()

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def cable() -> Iterator[tuple[int, str]]:
    master, slave = pty.openpty()
    tty.setraw(slave)
    path = os.ttyname(slave)
    os.chown(path, 0, 20)  # group dialout (gid 20 on Debian), as a real UART
    os.chmod(path, 0o660)
    yield master, path
    os.close(master)
    os.close(slave)


@pytest.fixture(scope="module")
def pi(cable) -> Iterator[Pi]:
    _, path = cable
    with Pi("picchat-serial-test", {str(ROOT): "/src"}, {path: "/dev/ttyUSB0"}) as booted:
        booted.run(
            "sh",
            "-c",
            "mkdir -p /etc/picchat && printf '%s\\n' "
            "'serial = [\"/dev/ttyUSB0,name=cable\"]' > /etc/picchat/picchat.toml",
        )
        booted.run("sh", "/src/deploy/install.sh", timeout=180)
        yield booted


def read_until(fd: int, text: bytes, timeout: float = 15) -> bytes:
    got = b""
    deadline = time.monotonic() + timeout
    while text not in got:
        left = deadline - time.monotonic()
        assert left > 0, f"no {text!r} on the serial line; got {got[-500:]!r}"
        if select.select([fd], [], [], left)[0]:
            got += os.read(fd, 4096)
    return got


def test_a_line_typed_on_the_cable_reaches_the_chat(pi, cable):
    master, _ = cable
    read_until(master, b"You (cable): ")
    for byte in b"hello from the cable\r":
        os.write(master, bytes([byte]))
    read_until(master, b"hello from the cable")
    deadline = time.monotonic() + 15
    while True:
        log = pi.run(
            "journalctl",
            "-u",
            "picchat-server",
            "PICCHAT_SENDER=cable",
            "-o",
            "cat",
            "--no-pager",
            check=False,
        ).stdout
        if "cable: hello from the cable" in log:
            break
        assert time.monotonic() < deadline, log
        time.sleep(0.2)


def test_chat_reaches_the_cable_with_crlf(pi, cable):
    master, _ = cable
    pi.run("picchat-send", "--name", "root@pi", "to the cable")
    got = read_until(master, b"root@pi: to the cable")
    assert b"root@pi: to the cable\r\n" in got
