"""Helpers for the integration tests: the real server process and real sockets.

Every wait here has a deadline: nothing sleeps a fixed time to "let the
server catch up". A test waits for the event it needs (a log line, a chat
line, EOF) and fails with what it saw when the deadline passes.
"""

from __future__ import annotations

import json
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
READY_RE = re.compile(r"Server is running and waiting for connections on (?P<where>.*)$")
PORT_RE = re.compile(r"(?:127\.0\.0\.1|\[::1\]):(\d+)")
DEFAULT_TIMEOUT = 5.0


def base_env(**extra: str) -> dict[str, str]:
    """The environment of a child process: ours minus PICCHAT_* and runtime dirs."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PICCHAT_")
        and k not in ("RUNTIME_DIRECTORY", "XDG_RUNTIME_DIR", "JOURNAL_STREAM", "NOTIFY_SOCKET")
    }
    env["PYTHONPATH"] = str(ROOT)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def send_cmd(python: str = sys.executable) -> list[str]:
    """picchat-send, run from the checkout (no installation needed)."""
    return [python, "-c", "from picchat.cli import send_main; raise SystemExit(send_main())"]


def voluntary_ctxt_switches(pid: int) -> int:
    """How often ``pid`` has gone to sleep voluntarily (waiting in epoll and the like)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():  # every thread, though there is one
        for line in (task / "status").read_text().splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                total += int(line.split()[1])
    return total


def cpu_ticks(pid: int) -> int:
    """User plus system CPU time of ``pid``, in clock ticks (/proc/PID/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)


def tcp_wmem_max() -> int:
    """The most a TCP socket's send buffer grows to (bytes the kernel holds for a peer)."""
    try:
        return int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    except (OSError, IndexError, ValueError):
        return 4 << 20


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (right now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the server process ----------------------------------------------------


class ServerProcess:
    """One real ``python -m picchat`` process; stderr is collected line by line."""

    def __init__(self, args: list[str], env: dict[str, str], sock_path: Path | None) -> None:
        self.args = args
        self.sock_path = sock_path
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._eof = False
        self.proc = subprocess.Popen(
            args,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.pid = self.proc.pid
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()
        self.port: int | None = None

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            with self._cond:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    @property
    def log(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def wait_for_log(self, pattern: str, timeout: float = DEFAULT_TIMEOUT, start: int = 0) -> str:
        """The first log line (from index ``start``) that matches ``pattern``."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            i = start
            while True:
                while i < len(self.lines):
                    if rx.search(self.lines[i]):
                        return self.lines[i]
                    i += 1
                left = deadline - time.monotonic()
                if self._eof or left <= 0:
                    raise AssertionError(
                        f"no log line matching {pattern!r} within {timeout} s "
                        f"(server {'exited' if self._eof else 'running'}); log:\n"
                        + "\n".join(self.lines)
                    )
                self._cond.wait(left)

    def mark(self) -> int:
        """Index of the next log line, for ``wait_for_log(start=...)``."""
        with self._cond:
            return len(self.lines)

    def wait_ready(self, timeout: float = 10.0) -> None:
        line = self.wait_for_log(READY_RE.pattern, timeout)
        m = PORT_RE.search(line)
        self.port = int(m.group(1)) if m else None

    def wait_exit(self, timeout: float = DEFAULT_TIMEOUT) -> int:
        rc = self.proc.wait(timeout)
        self._join()
        return rc

    def _join(self) -> None:
        self._thread.join(DEFAULT_TIMEOUT)
        if not self._thread.is_alive() and self.proc.stderr is not None:
            self.proc.stderr.close()

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM this pid and wait; SIGKILL this pid only if it hangs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        self._join()
        return self.proc.returncode


# ---- clients -----------------------------------------------------------------


class LineSource:
    """Lines read from something with a deadline on every wait.

    ``history`` keeps every line received, ``raw`` every byte, so a test can
    check what was received in between two expectations.
    """

    def __init__(self, label: str) -> None:
        self.label = label
        self.history: list[str] = []
        self.raw = bytearray()
        self._buf = bytearray()
        self._pending: list[str] = []
        self.eof = False

    def _read_chunk(self, timeout: float) -> bytes | None:
        """Up to some bytes within ``timeout``; b"" at EOF; None if nothing came."""
        raise NotImplementedError

    def _fill(self, timeout: float) -> bool:
        if self.eof:
            return False
        data = self._read_chunk(timeout)
        if data is None:
            return False
        if not data:
            self.eof = True
            if self._buf:  # an unterminated last line
                self._pending.append(self._buf.decode("utf-8", "replace"))
                self._buf.clear()
            return True
        self.raw += data
        self._buf += data
        *lines, rest = self._buf.split(b"\n")
        self._buf = bytearray(rest)
        for line in lines:
            text = line.decode("utf-8", "replace")
            self._pending.append(text[:-1] if text.endswith("\r") else text)
        return True

    def _next_line(self, deadline: float) -> str | None:
        """The next line; None at EOF; raises TimeoutError at ``deadline``."""
        while not self._pending:
            if self.eof:
                return None
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            self._fill(left)
        line = self._pending.pop(0)
        self.history.append(line)
        return line

    def _fail(self, what: str) -> AssertionError:
        return AssertionError(
            f"{self.label}: {what}; last lines received:\n" + "\n".join(self.history[-30:])
        )

    def read_line(self, timeout: float = DEFAULT_TIMEOUT) -> str | None:
        """The next line, or None at EOF; fails if nothing arrives in time."""
        try:
            return self._next_line(time.monotonic() + timeout)
        except TimeoutError:
            raise self._fail(f"no line within {timeout} s") from None

    def expect(self, pattern: str, timeout: float = DEFAULT_TIMEOUT) -> re.Match[str]:
        """Read lines until one matches ``pattern`` (re.search); return the match.

        The lines read before it are in ``skipped`` (and in ``history``).
        """
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        self.skipped: list[str] = []
        while True:
            try:
                line = self._next_line(deadline)
            except TimeoutError:
                raise self._fail(f"no line matching {pattern!r} within {timeout} s") from None
            if line is None:
                raise self._fail(f"EOF before a line matching {pattern!r}")
            m = rx.search(line)
            if m:
                return m
            self.skipped.append(line)

    def read_until_eof(self, timeout: float = DEFAULT_TIMEOUT) -> list[str]:
        """Every remaining line up to EOF (fails if EOF does not come in time)."""
        deadline = time.monotonic() + timeout
        lines = []
        while True:
            line = self.read_line(max(deadline - time.monotonic(), 0.0))
            if line is None:
                return lines
            lines.append(line)


class Client(LineSource):
    """A plain-protocol participant over a real TCP or Unix socket."""

    def __init__(
        self,
        target: int | str | Path,
        label: str = "client",
        rcvbuf: int | None = None,
        welcome: bool = True,
    ) -> None:
        super().__init__(label)
        if isinstance(target, int):
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            address: Any = ("127.0.0.1", target)
        else:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            address = str(target)
        if rcvbuf is not None:  # before connect, so the TCP window is small from the start
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(DEFAULT_TIMEOUT)
        self.sock.connect(address)
        self.sock.setblocking(False)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self.sock, selectors.EVENT_READ)
        self.name: str | None = None
        if welcome:
            m = self.expect(r"^\* Welcome to picchat! You are (\S+)\.")
            self.name = m.group(1)

    def _read_chunk(self, timeout: float) -> bytes | None:
        if not self._sel.select(timeout):
            return None
        try:
            return self.sock.recv(65536)
        except BlockingIOError:
            return None
        except ConnectionResetError:
            return b""

    def send_raw(self, data: bytes, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.sock.settimeout(timeout)
        try:
            self.sock.sendall(data)
        finally:
            self.sock.setblocking(False)

    def send_line(self, text: str | bytes) -> None:
        data = text if isinstance(text, bytes) else text.encode()
        self.send_raw(data + b"\n")

    def nick(self, name: str) -> None:
        self.send_line(f"/nick {name}")
        self.expect(rf"^\* \S+ is now known as {re.escape(name)}$")
        self.name = name

    def close(self) -> None:
        self._sel.close()
        self.sock.close()


def settled_client(server: ServerProcess, target: int | str | Path, label: str) -> Client:
    """A client whose arrival has been announced (so its leave will be, too).

    The server logs "NAME connected from ..." when it announces a silent
    newcomer's join: waiting for that line orders the test after it, whatever
    the presence interval.
    """
    mark = server.mark()
    c = Client(target, label)
    server.wait_for_log(rf"\b{c.name} connected from", start=mark)
    return c


class StructuredClient:
    """A JSON Lines (``PICCHAT/1``) participant."""

    def __init__(self, target: int | str | Path, name: str | None = None, member: bool = True):
        self.lines = Client(target, label=f"structured {name}", welcome=False)
        hello: dict[str, Any] = {"member": member, "client": "integration-test"}
        if name is not None:
            hello["name"] = name
        self.lines.send_line("PICCHAT/1 " + json.dumps(hello))
        m = self.lines.expect(r"^PICCHAT/1 (\{.*\})$")
        self.welcome = json.loads(m.group(1))
        self.frames: list[dict[str, Any]] = []

    def send(self, obj: dict[str, Any]) -> None:
        self.lines.send_line(json.dumps(obj))

    def read_frame(self, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any] | None:
        line = self.lines.read_line(timeout)
        if line is None:
            return None
        frame = json.loads(line)
        self.frames.append(frame)
        return frame

    def expect(self, timeout: float = DEFAULT_TIMEOUT, **fields: Any) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            frame = self.read_frame(max(deadline - time.monotonic(), 0.0))
            if frame is None:
                raise AssertionError(f"EOF before a frame with {fields}; got {self.frames}")
            if all(frame.get(k) == v for k, v in fields.items()):
                return frame

    def close(self) -> None:
        self.lines.close()


class ProcessPeer(LineSource):
    """A participant that is a real program (nc, socat, telnet): stdin in, stdout out."""

    def __init__(self, args: list[str], label: str) -> None:
        super().__init__(label)
        self.proc = subprocess.Popen(
            args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert self.proc.stdout is not None
        self._fd = self.proc.stdout.fileno()
        os.set_blocking(self._fd, False)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._fd, selectors.EVENT_READ)

    def _read_chunk(self, timeout: float) -> bytes | None:
        if not self._sel.select(timeout):
            return None
        try:
            return os.read(self._fd, 65536)
        except BlockingIOError:
            return None

    def send_line(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode() + b"\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        """End the program we started (by its pid) and reap it."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass
        self._sel.close()
