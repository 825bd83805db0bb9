"""systemd's small protocols, spoken by hand: sd_notify, the watchdog, socket activation.

The Notifier is tested against a datagram socket the test owns (a path, and
the abstract namespace). ``listen_fds`` marks fds 3 and up non-inheritable:
those belong to pytest here, so either ``os.set_inheritable`` is replaced by a
recorder or the real thing runs in a subprocess of its own.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from picchat import systemd
from picchat.systemd import Notifier, listen_fds, watchdog_interval

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket bound to a path, as systemd's notify socket is."""
    path = tmp_path / "notify"
    if len(str(path).encode()) > 100:  # AF_UNIX paths are limited to 108 bytes
        pytest.skip("tmp_path too long for an AF_UNIX socket")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    try:
        yield sock, str(path)
    finally:
        sock.close()


@pytest.fixture
def abstract_receiver() -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket in the abstract namespace, named "@..." in $NOTIFY_SOCKET."""
    name = f"picchat-test-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.setblocking(False)
    try:
        yield sock, "@" + name
    finally:
        sock.close()


def received(sock: socket.socket) -> list[str]:
    """Every datagram waiting on ``sock`` (delivery is synchronous for AF_UNIX)."""
    out = []
    while True:
        try:
            out.append(sock.recv(65536).decode())
        except BlockingIOError:
            return out


def notifier(address: str) -> Notifier:
    n = Notifier({"NOTIFY_SOCKET": address})
    assert n.enabled
    return n


# ---- sd_notify -------------------------------------------------------------------


@pytest.mark.parametrize("which", ["path", "abstract"])
def test_ready_status_watchdog_stopping(which, receiver, abstract_receiver):
    sock, address = receiver if which == "path" else abstract_receiver
    n = notifier(address)
    try:
        n.ready("0 clients, 0 messages")
        assert received(sock) == ["READY=1\nSTATUS=0 clients, 0 messages"]
        n.watchdog()
        assert received(sock) == ["WATCHDOG=1"]
        n.stopping()
        [msg] = received(sock)
        assert msg.split("\n")[0] == "STOPPING=1"
        assert all("=" in line for line in msg.split("\n"))
    finally:
        n.close()


def test_abstract_address_is_a_nul_byte_and_the_name():
    n = Notifier({"NOTIFY_SOCKET": "@some/name"})
    try:
        assert n.address == b"\0some/name"
    finally:
        n.close()


def test_status_is_sent_only_when_it_changed(receiver):
    sock, address = receiver
    n = notifier(address)
    try:
        n.ready("0 clients, 0 messages")
        received(sock)
        n.status("0 clients, 0 messages")  # what READY said already
        assert received(sock) == []
        n.status("1 client, 0 messages")
        assert received(sock) == ["STATUS=1 client, 0 messages"]
        n.status("1 client, 0 messages")
        n.status("1 client, 0 messages")
        assert received(sock) == []
        n.status("1 client, 1 message")
        n.status("1 client, 1 message")
        assert received(sock) == ["STATUS=1 client, 1 message"]
        # READY again (after a reload) resets what "changed" means.
        n.ready("1 client, 2 messages")
        n.status("1 client, 2 messages")
        assert received(sock) == ["READY=1\nSTATUS=1 client, 2 messages"]
    finally:
        n.close()


def test_reloading_carries_the_monotonic_clock_in_microseconds(receiver):
    sock, address = receiver
    n = notifier(address)
    try:
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        n.reloading()
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        [msg] = received(sock)
        lines = msg.split("\n")
        assert lines[0] == "RELOADING=1"
        fields = dict(line.split("=", 1) for line in lines)
        assert fields["MONOTONIC_USEC"].isdigit(), msg
        assert before <= int(fields["MONOTONIC_USEC"]) <= after
    finally:
        n.close()


def test_no_notify_socket_means_disabled_and_silent():
    for env in ({}, {"NOTIFY_SOCKET": ""}):
        n = Notifier(env)
        assert not n.enabled
        assert n.notify("READY=1") is False
        n.ready("x")
        n.status("y")
        n.watchdog()
        n.reloading()
        n.stopping()
        n.close()
        n.close()


@pytest.mark.parametrize("address", ["relative/notify", "notify", "~/notify"])
def test_a_notify_socket_that_is_no_path_is_ignored(address, logged):
    with logged.at_level(logging.WARNING, logger="picchat.systemd"):
        n = Notifier({"NOTIFY_SOCKET": address})
    assert not n.enabled
    assert n.notify("READY=1") is False
    n.ready("x")  # nothing raised
    assert any("NOTIFY_SOCKET" in r.getMessage() for r in logged.records)


def test_a_vanished_socket_makes_notify_return_false(receiver):
    sock, address = receiver
    n = notifier(address)
    try:
        assert n.notify("STATUS=hello") is True
        assert received(sock) == ["STATUS=hello"]
        sock.close()
        os.unlink(address)  # systemd went away
        assert n.notify("WATCHDOG=1") is False
        n.ready("x")
        n.watchdog()
        n.stopping()
    finally:
        n.close()


def test_a_notify_socket_that_never_existed_makes_notify_return_false(tmp_path):
    n = notifier(str(tmp_path / "nobody-here"))
    try:
        assert n.notify("READY=1") is False
    finally:
        n.close()


def test_a_full_notify_socket_never_blocks(receiver):
    # systemd not reading (hung, or busy) must not stall the server's loop:
    # the datagram is dropped and notify says so.
    sock, address = receiver
    n = notifier(address)
    try:
        started = time.monotonic()
        for _ in range(100_000):
            if not n.notify("WATCHDOG=1"):
                break
        else:
            pytest.fail("100000 datagrams queued on a socket nobody reads")
        assert time.monotonic() - started < 5
        assert received(sock)  # what did fit is intact
        assert n.notify("WATCHDOG=1") is True  # room again
    finally:
        n.close()


def test_closed_notifier_sends_nothing(receiver):
    sock, address = receiver
    n = notifier(address)
    n.close()
    assert not n.enabled
    assert n.notify("READY=1") is False
    assert received(sock) == []


# ---- the watchdog interval --------------------------------------------------------


def test_watchdog_interval_is_half_of_watchdog_usec():
    assert watchdog_interval({"WATCHDOG_USEC": "2000000"}) == 1.0
    assert watchdog_interval({"WATCHDOG_USEC": "400000"}) == pytest.approx(0.2)


def test_watchdog_interval_only_for_our_pid():
    ours = str(os.getpid())
    other = str(os.getpid() + 1)
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": ours}) == 1.0
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": other}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "junk"}) is None


@pytest.mark.parametrize(
    "usec", [None, "", "0", "00", "abc", "-1", "1.5", " 100", "1e6", "²", "2000000x"]
)
def test_watchdog_interval_none_when_off_or_garbage(usec):
    env = {} if usec is None else {"WATCHDOG_USEC": usec}
    assert watchdog_interval(env) is None


def test_watchdog_interval_reads_the_environment_by_default(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "3000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert watchdog_interval() == 1.5
    monkeypatch.delenv("WATCHDOG_USEC")
    assert watchdog_interval() is None


# ---- socket activation ----------------------------------------------------------------


@pytest.fixture
def inheritable_calls(monkeypatch) -> list[tuple[int, bool]]:
    """os.set_inheritable replaced by a recorder: fds 3 and 4 are pytest's here."""
    calls: list[tuple[int, bool]] = []
    monkeypatch.setattr(systemd.os, "set_inheritable", lambda fd, flag: calls.append((fd, flag)))
    return calls


def test_listen_fds_for_another_pid_are_not_ours(inheritable_calls):
    for pid in (str(os.getpid() + 1), "1", "", "junk", "²"):
        env = {"LISTEN_PID": pid, "LISTEN_FDS": "2", "LISTEN_FDNAMES": "tcp:unix"}
        assert listen_fds(env) == []
    assert listen_fds({"LISTEN_FDS": "2"}) == []  # no LISTEN_PID at all
    assert listen_fds({}) == []
    assert inheritable_calls == []


def test_listen_fds_names_and_numbers(inheritable_calls):
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "tcp:unix"}
    assert listen_fds(env) == [(3, "tcp"), (4, "unix")]
    # Passed fds are not handed on to whatever we might run.
    assert sorted(inheritable_calls) == [(3, False), (4, False)]


def test_listen_fds_missing_names_are_unknown(inheritable_calls):
    pid = str(os.getpid())
    assert listen_fds({"LISTEN_PID": pid, "LISTEN_FDS": "2"}) == [(3, "unknown"), (4, "unknown")]
    assert listen_fds({"LISTEN_PID": pid, "LISTEN_FDS": "3", "LISTEN_FDNAMES": "tcp"}) == [
        (3, "tcp"),
        (4, "unknown"),
        (5, "unknown"),
    ]


@pytest.mark.parametrize("count", ["", "0", "junk", "-1", "²"])
def test_listen_fds_none_when_count_is_zero_or_garbage(count, inheritable_calls):
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": count, "LISTEN_FDNAMES": "tcp"}
    assert listen_fds(env) == []
    assert inheritable_calls == []


def test_listen_fds_on_real_fds_in_a_subprocess():
    # The real thing, with real sockets on fds 3 and 4 of a process of its own.
    code = """
import fcntl, os, socket, sys
from picchat.systemd import listen_fds
# Above 4 first, so that dup2() really makes 3 and 4 (inheritable) copies.
a, b = (fcntl.fcntl(s.fileno(), fcntl.F_DUPFD_CLOEXEC, 10) for s in socket.socketpair())
os.dup2(a, 3)
os.dup2(b, 4)
assert os.get_inheritable(3) and os.get_inheritable(4)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="2", LISTEN_FDNAMES="tcp:unix")
print(listen_fds(), os.get_inheritable(3), os.get_inheritable(4))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
    env["PYTHONPATH"] = str(ROOT)
    r = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=10
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[(3, 'tcp'), (4, 'unix')] False False"


def test_under_systemd():
    assert systemd.under_systemd({"INVOCATION_ID": "abc"})
    assert systemd.under_systemd({"NOTIFY_SOCKET": "/run/systemd/notify"})
    assert not systemd.under_systemd({})
