"""The real server under systemd's protocols, without systemd: the test plays it.

- sd_notify: the test owns the datagram socket named in $NOTIFY_SOCKET and
  reads what the server says (READY, STATUS, WATCHDOG, RELOADING, STOPPING).
- Socket activation: the test opens the listeners (and a FIFO) and hands them
  over as fds 3, 4... with $LISTEN_FDS, $LISTEN_FDNAMES and $LISTEN_PID, as
  systemd does for a .socket unit.
- SIGHUP: the config file is read again, live settings applied.
"""

from __future__ import annotations

import itertools
import os
import re
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .support import (
    DEFAULT_TIMEOUT,
    Client,
    ServerProcess,
    base_env,
    free_port,
    settled_client,
)

WATCHDOG_USEC = 400_000  # pings every 0.2 s
IDLE_SECONDS = 2.0


# ---- systemd's side of sd_notify -----------------------------------------------------


def fields(message: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in message.split("\n") if line)


class NotifySocket:
    """The socket $NOTIFY_SOCKET names: every datagram is kept with its arrival time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self.sock, selectors.EVENT_READ)
        self.received: list[tuple[float, str]] = []  # (time.monotonic(), message)

    def next(self, timeout: float = DEFAULT_TIMEOUT) -> str | None:
        """The next datagram, or None if none came within ``timeout``."""
        if not self._sel.select(max(timeout, 0.0)):
            return None
        data = self.sock.recv(65536)
        message = data.decode()
        self.received.append((time.monotonic(), message))
        return message

    def expect(
        self, check: Callable[[dict[str, str]], bool], what: str, timeout: float = DEFAULT_TIMEOUT
    ) -> tuple[dict[str, str], list[str]]:
        """Read until a datagram's fields pass ``check``; return them and the ones before."""
        deadline = time.monotonic() + timeout
        skipped: list[str] = []
        while True:
            message = self.next(deadline - time.monotonic())
            if message is None:
                raise AssertionError(
                    f"no sd_notify message with {what} within {timeout} s; got: {skipped}"
                )
            f = fields(message)
            if check(f):
                return f, skipped
            skipped.append(message)

    def expect_not_watchdog(self, timeout: float = DEFAULT_TIMEOUT) -> str:
        """The next datagram that is not a watchdog ping."""
        deadline = time.monotonic() + timeout
        while True:
            message = self.next(deadline - time.monotonic())
            if message is None:
                raise AssertionError(f"nothing but watchdog pings within {timeout} s")
            if message != "WATCHDOG=1":
                return message

    def window(self, seconds: float) -> list[tuple[float, str]]:
        """Everything that arrives within the next ``seconds`` (a measured window)."""
        end = time.monotonic() + seconds
        got = []
        while (left := end - time.monotonic()) > 0:
            message = self.next(left)
            if message is not None:
                got.append(self.received[-1])
        return got

    def close(self) -> None:
        self._sel.close()
        self.sock.close()


@pytest.fixture
def notify(short_tmp: Path) -> Iterator[NotifySocket]:
    n = NotifySocket(short_tmp / "notify")
    yield n
    n.close()


def notify_env(notify: NotifySocket, **extra: str) -> dict[str, str]:
    return base_env(NOTIFY_SOCKET=str(notify.path), **extra)


def connects(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(DEFAULT_TIMEOUT)
        return s.connect_ex(("127.0.0.1", port)) == 0


# ---- sd_notify -------------------------------------------------------------------------


def test_ready_comes_after_the_listeners_are_open(start_server, notify, short_tmp):
    port = free_port()
    server = start_server(
        port=str(port), env=notify_env(notify, WATCHDOG_USEC=str(WATCHDOG_USEC)), wait=False
    )
    ready, before = notify.expect(lambda f: "READY" in f, "READY=1", timeout=10)
    # At the moment READY arrives, both ways in must already take connections.
    assert connects(port), "READY=1 was sent before the TCP port accepted connections"
    with socket.socket(socket.AF_UNIX) as u:
        u.settimeout(DEFAULT_TIMEOUT)
        u.connect(str(short_tmp / "s.sock"))
    assert before == [], f"sent before READY=1: {before}"
    assert ready == {"READY": "1", "STATUS": "0 clients, 0 messages"}
    server.wait_ready()
    assert server.port == port
    # READY once: the next messages are watchdog pings and status changes only.
    server.stop()
    rest = [m for _, m in notify.received[1:]]
    assert all("READY" not in fields(m) for m in rest), rest


def test_status_changes_are_sent_and_nothing_else(start_server, notify, clients):
    server = start_server(env=notify_env(notify))  # no watchdog: every datagram is news
    notify.expect(lambda f: "READY" in f, "READY=1")

    a = settled_client(server, server.port, "a")
    clients.append(a)
    assert notify.next() == "STATUS=1 client, 0 messages"
    a.send_line("hello")
    server.wait_for_log(r": hello$")
    assert notify.next() == "STATUS=1 client, 1 message"

    b = settled_client(server, server.port, "b")
    clients.append(b)
    assert notify.next() == "STATUS=2 clients, 1 message"
    b.send_line("hi a")
    a.expect(r": hi a$")
    assert notify.next() == "STATUS=2 clients, 2 messages"

    # A nick change, presence summaries, a half-typed line: no new counts, no STATUS.
    mark = server.mark()
    a.nick("alice")
    server.wait_for_log(r"alice", start=mark)
    a.send_raw(b"half a li")
    assert notify.next(timeout=0.5) is None, notify.received[-1]

    b.close()
    clients.remove(b)
    assert notify.next() == "STATUS=1 client, 2 messages"
    assert notify.next(timeout=0.5) is None, notify.received[-1]


def test_watchdog_pings_at_half_the_interval_and_nothing_else_while_idle(
    start_server, notify, clients
):
    server = start_server(env=notify_env(notify, WATCHDOG_USEC=str(WATCHDOG_USEC)))
    notify.expect(lambda f: "READY" in f, "READY=1")
    c = settled_client(server, server.port, "idle")  # someone is connected, saying nothing
    clients.append(c)
    notify.expect(lambda f: "STATUS" in f, "STATUS=")

    got = notify.window(IDLE_SECONDS)
    messages = [m for _, m in got]
    assert set(messages) == {"WATCHDOG=1"}, messages
    times = [t for t, _ in got]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(got) >= IDLE_SECONDS / 0.4, f"only {len(got)} pings in {IDLE_SECONDS} s: {gaps}"
    assert 0.1 <= statistics.median(gaps) <= 0.4, gaps
    # Well within WatchdogSec= every time: systemd would never have killed us.
    assert max(gaps) < WATCHDOG_USEC / 1e6, gaps


def test_no_watchdog_pings_for_another_pid(start_server, notify):
    # $WATCHDOG_PID names another process (the service's main pid, say):
    # the pings are not ours to send.
    env = notify_env(notify, WATCHDOG_USEC=str(WATCHDOG_USEC), WATCHDOG_PID="1")
    start_server(env=env)
    notify.expect(lambda f: "READY" in f, "READY=1")
    assert notify.window(0.7) == []


def test_sigterm_sends_stopping(start_server, notify, clients):
    server = start_server(env=notify_env(notify, WATCHDOG_USEC=str(WATCHDOG_USEC)))
    notify.expect(lambda f: "READY" in f, "READY=1")
    c = Client(server.port, "c")
    clients.append(c)
    server.proc.send_signal(signal.SIGTERM)
    stopping, _ = notify.expect(lambda f: "STOPPING" in f, "STOPPING=1")
    assert stopping["STOPPING"] == "1"
    c.read_until_eof(timeout=3)
    assert server.wait_exit(timeout=3) == 0, server.log
    assert not any("READY" in fields(m) for _, m in notify.received[1:])


def test_a_vanished_notify_socket_does_not_hurt(start_server, notify, clients):
    server = start_server(env=notify_env(notify, WATCHDOG_USEC=str(WATCHDOG_USEC)))
    notify.expect(lambda f: "READY" in f, "READY=1")
    notify.close()
    notify.path.unlink()  # systemd went away: every notify fails from now on
    a = Client(server.port, "a")
    b = Client(server.port, "b")
    clients.extend([a, b])
    a.send_line("still here")
    b.expect(r": still here$")
    server.proc.send_signal(signal.SIGTERM)
    assert server.wait_exit(timeout=3) == 0, server.log


# ---- socket activation ---------------------------------------------------------------

# Runs where systemd would: moves the fds it was given to 3, 4... and sets
# $LISTEN_PID to its pid, which exec() keeps for the server.
ACTIVATE = """
import fcntl, os, sys
sep = sys.argv.index("--")
fds = [int(x) for x in sys.argv[1:sep]]
# Copies above them all and above the targets, so no dup2() clobbers one.
above = max(fds) + len(fds) + 3
high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, above) for fd in fds]
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i)
for fd in set(fds + high) - set(range(3, 3 + len(fds))):
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.executable, [sys.executable, "-m", "picchat", *sys.argv[sep + 1:]])
"""


@pytest.fixture
def activate(short_tmp: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Factory: a server given ``files`` as fds 3, 4... named ``names``."""
    started: list[ServerProcess] = []

    def start(files: list, names: str, *extra: str, env: dict[str, str] | None = None):
        fds = tuple(f if isinstance(f, int) else f.fileno() for f in files)
        env = dict(env if env is not None else base_env())
        # Where the server's own socket would be if it opened one.
        env["RUNTIME_DIRECTORY"] = str(short_tmp / "rt")
        env.update(LISTEN_FDS=str(len(fds)), LISTEN_FDNAMES=names)
        args = [sys.executable, "-c", ACTIVATE, *map(str, fds), "--", "--presence-interval"]
        args += ["0.2", *extra]
        server = ServerProcess(args, env, None, pass_fds=fds)
        started.append(server)
        server.wait_ready()
        return server

    yield start
    for server in started:
        server.stop()
    for server in started:
        assert "Internal error" not in server.log and "Traceback" not in server.log, server.log


def listening(pid: int) -> set[tuple[str, object]]:
    """What process ``pid`` listens on: ("tcp", port) and ("unix", path) pairs."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except FileNotFoundError:
            continue
        m = re.fullmatch(r"socket:\[(\d+)\]", target)
        if m:
            inodes.add(m.group(1))
    found: set[tuple[str, object]] = set()
    for table in ("tcp", "tcp6"):
        for row in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            cols = row.split()
            if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                found.add(("tcp", int(cols[1].rsplit(":", 1)[1], 16)))
    for row in Path("/proc/net/unix").read_text().splitlines()[1:]:
        cols = row.split()
        if int(cols[3], 16) & 0x10000 and cols[6] in inodes:  # __SO_ACCEPTCON
            found.add(("unix", cols[7] if len(cols) > 7 else None))
    return found


def tcp_listener() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    return s


def unix_listener(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(16)
    return s


def test_socket_activation_serves_on_the_passed_sockets_only(activate, short_tmp, notify, clients):
    tcp = tcp_listener()
    port = tcp.getsockname()[1]
    path = short_tmp / "activated.sock"
    unix = unix_listener(path)
    try:
        server = activate([tcp, unix], "tcp:unix", env=notify_env(notify))
    finally:
        tcp.close()  # the server has its own copies now
        unix.close()
    line = server.wait_for_log(r"Server is running")
    assert line.count("(from systemd)") == 2, line
    assert server.port == port
    assert str(path) in line
    notify.expect(lambda f: "READY" in f, "READY=1")

    # Chat on both: a client on each exchanges a line.
    over_tcp = Client(port, "tcp")
    over_unix = Client(path, "unix")
    clients.extend([over_tcp, over_unix])
    over_tcp.send_line("hello from tcp")
    over_unix.expect(r": hello from tcp$")
    over_unix.send_line("hello from unix")
    over_tcp.expect(r": hello from unix$")

    # Nothing of its own: not 127.0.0.1:1234, not its default socket.
    assert listening(server.pid) == {("tcp", port), ("unix", str(path))}
    assert not (short_tmp / "rt" / "picchat.sock").exists()
    assert "1234" not in line

    # The socket file is systemd's: a stopping server leaves it in place.
    assert server.stop() == 0, server.log
    assert path.exists()


def test_socket_activation_by_kind_when_names_are_missing(activate, short_tmp, clients):
    tcp = tcp_listener()
    path = short_tmp / "nameless.sock"
    unix = unix_listener(path)
    try:
        server = activate([unix, tcp], "")  # in another order, and no names
    finally:
        tcp.close()
        unix.close()
    line = server.wait_for_log(r"Server is running")
    assert line.count("(from systemd)") == 2, line
    a = Client(server.port, "tcp")
    b = Client(path, "unix")
    clients.extend([a, b])
    a.send_line("by kind")
    b.expect(r": by kind$")


def write_fifo(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def test_socket_activation_of_a_fifo(activate, short_tmp, clients):
    tcp = tcp_listener()
    fifo = short_tmp / "in.fifo"
    os.mkfifo(fifo, 0o620)
    rfd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # as systemd opens ListenFIFO=
    try:
        server = activate([tcp, rfd], "tcp:fifo")
    finally:
        tcp.close()
        os.close(rfd)
    line = server.wait_for_log(r"Server is running")
    assert f"FIFO {fifo} (from systemd)" in line, line

    c = settled_client(server, server.port, "reader")
    clients.append(c)
    subprocess.run(["sh", "-c", f'echo "temp high" > "{fifo}"'], check=True, timeout=5)
    c.expect(r"^fifo: temp high$")
    # Writers one after the other: the read end is reopened at each EOF.
    for i in range(3):
        write_fifo(fifo, f"reading {i}\n".encode())
        c.expect(rf"^fifo: reading {i}$")

    # The FIFO's sender name is reserved, as with --fifo: nobody can pose as it.
    c.send_line("/nick fifo")
    c.expect(r"^! the name fifo is reserved")
    # And it stays reserved across a reload.
    mark = server.mark()
    server.proc.send_signal(signal.SIGHUP)
    server.wait_for_log(r"Reloaded: ", start=mark)
    c.send_line("/nick FIFO")
    c.expect(r"^! the name FIFO is reserved")
    write_fifo(fifo, b"after the reload\n")
    c.expect(r"^fifo: after the reload$")


# ---- SIGHUP: reload -------------------------------------------------------------------


def write_config(path: Path, text: str) -> None:
    tmp = path.with_suffix(".new")
    tmp.write_text(text)
    tmp.replace(path)  # as an editor or a config manager does


def reloaded(server: ServerProcess, notify: NotifySocket, mark: int) -> None:
    """SIGHUP, then RELOADING=1 and READY=1 (the reload is over)."""
    server.proc.send_signal(signal.SIGHUP)
    reloading, _ = notify.expect(lambda f: "RELOADING" in f, "RELOADING=1")
    assert reloading["MONOTONIC_USEC"].isdigit(), reloading
    usec = int(reloading["MONOTONIC_USEC"])
    now = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert 0 <= now - usec < 5_000_000, (now, usec)
    ready, between = notify.expect(lambda f: "READY" in f, "READY=1")
    assert all("READY" not in fields(m) for m in between)
    assert ready["STATUS"], ready


def test_sighup_applies_live_settings_and_names_the_rest(start_server, short_tmp, notify, clients):
    config = short_tmp / "picchat.toml"
    port, other_port = free_port(), free_port()
    write_config(config, f"port = {port}\nlog-chat = true\n")
    # No --port on the command line: it would win over the file.
    server = start_server("--config", str(config), port=None, env=notify_env(notify))
    assert server.port == port
    notify.expect(lambda f: "READY" in f, "READY=1")
    a = settled_client(server, port, "a")
    b = settled_client(server, port, "b")
    clients.extend([a, b])
    a.send_line("logged before")
    b.expect(r": logged before$")
    server.wait_for_log(rf"{a.name}: logged before$")

    write_config(config, f"port = {other_port}\nlog-chat = false\nmax-clients = 5\n")
    mark = server.mark()
    reloaded(server, notify, mark)
    line = server.wait_for_log(r"Reloaded: ", start=mark)
    assert re.search(r"Reloaded: max-clients, log-chat changed$", line), line
    warning = server.wait_for_log(r"need a restart", start=mark)
    assert "WARNING" in warning and re.search(r"restart: port$", warning), warning

    # Connected clients stay and chat on; the chat is no longer logged.
    a.send_line("not logged after")
    b.expect(r": not logged after$")
    b.send_line("nor this")
    a.expect(r": nor this$")
    c = settled_client(server, port, "c")  # a later log line: the chat would be before it
    clients.append(c)
    after = "\n".join(server.lines[mark:])
    assert "not logged after" not in after and "nor this" not in after, after

    # max-clients = 5 is in force: a, b, c and two more; the sixth is refused.
    more = [Client(port, f"more{i}") for i in range(2)]
    clients.extend(more)
    sixth = Client(port, "sixth", welcome=False)
    clients.append(sixth)
    sixth.expect(r"^! server full \(5 connections\)")
    assert sixth.read_until_eof(timeout=3) == []

    # The port is not changed by a reload: still the old one, not the new.
    assert listening(server.pid) >= {("tcp", port)}
    assert ("tcp", other_port) not in listening(server.pid)


def test_sighup_with_nothing_changed(start_server, short_tmp, notify):
    config = short_tmp / "picchat.toml"
    write_config(config, "log-chat = true\n")
    server = start_server("--config", str(config), env=notify_env(notify))
    notify.expect(lambda f: "READY" in f, "READY=1")
    mark = server.mark()
    reloaded(server, notify, mark)
    server.wait_for_log(r"Reloaded: no setting .* has changed", start=mark)
    assert "need a restart" not in "\n".join(server.lines[mark:])


def test_sighup_with_a_broken_config_keeps_the_running_settings(
    start_server, short_tmp, notify, clients
):
    config = short_tmp / "picchat.toml"
    write_config(config, "log-chat = true\nmax-clients = 50\n")
    server = start_server("--config", str(config), env=notify_env(notify))
    notify.expect(lambda f: "READY" in f, "READY=1")
    a = settled_client(server, server.port, "a")
    b = settled_client(server, server.port, "b")
    clients.extend([a, b])

    broken = [
        ("log-chat = false\nmax-clients = [", r"not valid TOML"),  # half-written
        ("log-chat = false\nmax-clients = 0\n", r"max-clients .* below 1"),
        ("log-chat = false\nno-such-setting = 1\n", r"unknown setting 'no-such-setting'"),
    ]
    for i, (text, why) in enumerate(broken):
        write_config(config, text)
        mark = server.mark()
        reloaded(server, notify, mark)
        error = server.wait_for_log(r"Reload failed", start=mark)
        assert "ERROR" in error and re.search(why, error), error
        # Still serving, with the old settings: log-chat is still on.
        a.send_line(f"still logged {i}")
        b.expect(rf": still logged {i}$")
        server.wait_for_log(rf"{a.name}: still logged {i}$", start=mark)
        assert "Reloaded:" not in "\n".join(server.lines[mark:])

    config.unlink()  # gone altogether
    mark = server.mark()
    reloaded(server, notify, mark)
    server.wait_for_log(r"Reload failed.*does not exist", start=mark)
    c = Client(server.port, "c")
    clients.append(c)
    c.send_line("after all that")
    a.expect(r": after all that$")
