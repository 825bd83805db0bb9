"""Helpers for the integration tests: the real server process and real sockets.

Every wait here has a deadline: nothing sleeps a fixed time to "let the
server catch up". A test waits for the event it needs (a log line, a chat
line, EOF) and fails with what it saw when the deadline passes.
"""

from __future__ import annotations

import codecs
import json
import os
import re
import selectors
import shutil
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


def end_process(proc: subprocess.Popen, timeout: float = DEFAULT_TIMEOUT) -> None:
    """SIGTERM a process we started and reap it (SIGKILL it if it hangs)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (right now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the server process ----------------------------------------------------


class ServerProcess:
    """One real ``python -m picchat`` process; stderr is collected line by line."""

    def __init__(
        self,
        args: list[str],
        env: dict[str, str],
        sock_path: Path | None,
        pass_fds: tuple[int, ...] = (),
    ) -> None:
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
            pass_fds=pass_fds,  # socket activation's listeners, as systemd passes them
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

    def wait_for_log(
        self, pattern: str, timeout: float = DEFAULT_TIMEOUT, start: int = 0, count: int = 1
    ) -> str:
        """The ``count``-th log line (from index ``start``) that matches ``pattern``.

        A log line is written at the end of the server's loop turn, so it can
        arrive after what a client saw of the same event: wait for it."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        found = 0
        with self._cond:
            i = start
            while True:
                while i < len(self.lines):
                    if rx.search(self.lines[i]):
                        found += 1
                        if found == count:
                            return self.lines[i]
                    i += 1
                left = deadline - time.monotonic()
                if self._eof or left <= 0:
                    raise AssertionError(
                        f"{found} of {count} log lines matching {pattern!r} within {timeout} s "
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

    def __init__(
        self,
        target: int | str | Path,
        name: str | None = None,
        member: bool = True,
        **hello_extra: Any,
    ):
        self.lines = Client(target, label=f"structured {name}", welcome=False)
        hello: dict[str, Any] = {"member": member, "client": "integration-test"}
        if name is not None:
            hello["name"] = name
        hello.update(hello_extra)  # e.g. session=TOKEN, resume={...}
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

    def __init__(
        self,
        args: list[str],
        label: str,
        *,
        env: dict[str, str] | None = None,
        cwd: str | Path | None = None,
        stderr: int = subprocess.PIPE,
    ) -> None:
        super().__init__(label)
        self.proc = subprocess.Popen(
            args,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=env,
            cwd=cwd,
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
        end_process(self.proc)
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass
        self._sel.close()


# ---- the interactive client, a forwarder to cut its link, a terminal ---------


def client_cmd(*args: str, python: str = sys.executable) -> list[str]:
    """picchat-client, run from the checkout (no installation needed)."""
    return [
        python,
        "-c",
        "from picchat.cli import client_main; raise SystemExit(client_main())",
        *args,
    ]


# An incoming chat line as picchat-client prints it: replayed ones carry the
# time the server accepted them ("[12:34] bob: hi"), live ones do not.
REPLAY_PREFIX = r"(?:\[[0-9: -]+\] )?"


class ClientProcess(ProcessPeer):
    """A real picchat-client with stdin a pipe: it reads lines, prints lines, no prompt.

    stderr goes into the same pipe, so a traceback shows up in a failure's
    "last lines received".
    """

    def __init__(self, port: int, *args: str, label: str = "picchat-client") -> None:
        argv = client_cmd("--port", str(port), *args)
        super().__init__(argv, label, env=base_env(), cwd=ROOT, stderr=subprocess.STDOUT)

    def wait_exit(self, timeout: float = DEFAULT_TIMEOUT) -> int:
        return self.proc.wait(timeout)

    def count(self, pattern: str) -> int:
        """How many lines received so far match ``pattern`` (re.search)."""
        rx = re.compile(pattern)
        return sum(1 for line in self.history if rx.search(line))


class Forwarder:
    """A TCP forwarder on 127.0.0.1 between a client and the server: the
    link a test can cut (every socket and the listener closed) and restore on
    the same port.

    One thread runs a selectors loop; the test talks to it through commands
    that return once the loop has carried them out, so after ``pause_down()``
    returns not one more byte goes from the server to the client.
    """

    def __init__(self, upstream_port: int, port: int = 0) -> None:
        self.upstream_port = upstream_port
        self.port = port
        self.accepted = 0  # connections accepted, over all runs
        self.orphans_closed = 0  # server-side sockets the server closed after drop_clients()
        self._thread: threading.Thread | None = None
        self._commands: list[tuple[str, threading.Event]] = []
        self._lock = threading.Lock()
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self.start()

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        """Listen (again) on ``self.port`` and forward."""
        assert self._thread is None, "the forwarder is running already"
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # The port's old connections may sit in TIME_WAIT: rebind anyway.
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self.port = listener.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread = threading.Thread(target=self._run, args=(listener,), daemon=True)
        self._thread.start()

    restart = start

    def cut(self) -> None:
        """Close every connection and the listener: the link is down."""
        if self._thread is None:
            return
        self._command("stop")
        self._thread.join(DEFAULT_TIMEOUT)
        assert not self._thread.is_alive(), "the forwarder thread did not stop"
        self._thread = None
        for s in (self._wake_r, self._wake_w):
            if s is not None:
                s.close()
        self._wake_r = self._wake_w = None

    close = cut

    def pause_down(self) -> None:
        """Stop forwarding from the server to the client (data waits in the kernel)."""
        self._command("pause")

    def resume_down(self) -> None:
        self._command("resume")

    def drop_clients(self) -> None:
        """Close the client-side sockets only: the client sees its connection
        die, the server does not (its sockets stay open, unread)."""
        self._command("drop_clients")

    def _command(self, what: str) -> None:
        done = threading.Event()
        with self._lock:
            self._commands.append((what, done))
        assert self._wake_w is not None
        self._wake_w.send(b"!")
        assert done.wait(DEFAULT_TIMEOUT), f"the forwarder did not carry out {what!r}"

    def _run(self, listener: socket.socket) -> None:
        assert self._wake_r is not None
        sel = selectors.DefaultSelector()
        sel.register(listener, selectors.EVENT_READ, "listener")
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        other: dict[socket.socket, socket.socket | None] = {}  # None: an orphan
        upstream: set[socket.socket] = set()
        paused = False

        def close(s: socket.socket) -> None:
            if s in other:
                del other[s]
                upstream.discard(s)
                try:
                    sel.unregister(s)
                except (KeyError, ValueError):
                    pass
                s.close()

        def close_pair(s: socket.socket) -> None:
            peer = other.get(s)
            close(s)
            if peer is not None:
                close(peer)

        try:
            while True:
                for key, _ in sel.select():
                    s = key.fileobj
                    assert isinstance(s, socket.socket)
                    if key.data == "listener":
                        conn, _ = listener.accept()
                        try:
                            up = socket.create_connection(
                                ("127.0.0.1", self.upstream_port), timeout=DEFAULT_TIMEOUT
                            )
                        except OSError:
                            conn.close()
                            continue
                        self.accepted += 1
                        conn.settimeout(DEFAULT_TIMEOUT)
                        other[conn], other[up] = up, conn
                        upstream.add(up)
                        sel.register(conn, selectors.EVENT_READ, "client")
                        if not paused:
                            sel.register(up, selectors.EVENT_READ, "server")
                    elif key.data == "wake":
                        s.recv(4096)
                        with self._lock:
                            commands, self._commands = self._commands, []
                        for what, done in commands:
                            if what == "stop":
                                for _, d in commands:
                                    d.set()
                                return
                            if what == "pause" and not paused:
                                paused = True
                                for up in upstream:
                                    if other.get(up) is not None:
                                        sel.unregister(up)
                            elif what == "resume" and paused:
                                paused = False
                                for up in upstream:
                                    if other.get(up) is not None:
                                        sel.register(up, selectors.EVENT_READ, "server")
                            elif what == "drop_clients":
                                for conn in [c for c in other if c not in upstream]:
                                    up = other[conn]
                                    close(conn)
                                    if up is not None:
                                        other[up] = None  # keep it open, unread
                                        try:
                                            sel.modify(up, selectors.EVENT_READ, "orphan")
                                        except KeyError:  # not registered (paused)
                                            sel.register(up, selectors.EVENT_READ, "orphan")
                            done.set()
                    else:
                        try:
                            data = s.recv(65536)
                        except OSError:
                            data = b""
                        if key.data == "orphan":
                            if not data:  # the server closed it at last
                                self.orphans_closed += 1
                                close(s)
                            continue  # its data goes nowhere
                        peer = other.get(s)
                        if not data or peer is None:
                            close_pair(s)
                            continue
                        try:
                            peer.sendall(data)
                        except OSError:
                            close_pair(s)
        finally:
            for s in list(other):
                s.close()
            listener.close()
            sel.close()
            with self._lock:
                for _, done in self._commands:
                    done.set()
                self._commands.clear()


class TmuxPane:
    """A real terminal: a detached tmux session of its own, on a private tmux
    server (socket in ``tmp``), ``width`` x ``height`` cells.

    Every wait polls capture-pane until a deadline; ``close()`` kills this
    session and this private tmux server only.
    """

    def __init__(
        self, tmp: Path, name: str, command: str, width: int = 40, height: int = 15
    ) -> None:
        self.tmp = tmp
        self.socket = tmp / "tmux.sock"
        self.name = name
        self.width = width
        env = base_env(LANG="C.UTF-8", LC_ALL="C.UTF-8", TERM="xterm-256color")
        env.pop("TMUX", None)
        self._env = env
        self.tmux("new-session", "-d", "-s", name, "-x", str(width), "-y", str(height), command)

    def tmux(self, *args: str) -> str:
        r = subprocess.run(
            ["tmux", "-S", str(self.socket), "-f", "/dev/null", *args],
            env=self._env,
            capture_output=True,
            timeout=DEFAULT_TIMEOUT,
            check=False,
        )
        if r.returncode != 0:
            raise AssertionError(f"tmux {' '.join(args)} failed: {r.stderr.decode()}")
        return r.stdout.decode("utf-8", "replace")

    def screen(self, joined: bool = False) -> list[str]:
        """The visible rows (trailing blanks removed); ``joined``: wrapped rows joined."""
        args = ["capture-pane", "-p", "-t", self.name]
        if joined:
            args.append("-J")
        rows = [row.rstrip() for row in self.tmux(*args).split("\n")]
        while rows and not rows[-1]:
            rows.pop()
        return rows

    def cursor(self) -> tuple[int, int]:
        x, y = self.tmux(
            "display-message", "-p", "-t", self.name, "#{cursor_x} #{cursor_y}"
        ).split()
        return int(x), int(y)

    def wait_for(self, check, what: str, timeout: float = DEFAULT_TIMEOUT, joined: bool = False):
        """Poll the screen until ``check(rows)`` is truthy; return its value."""
        deadline = time.monotonic() + timeout
        while True:
            rows = self.screen(joined)
            result = check(rows)
            if result:
                return result
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"tmux {self.name}: no {what} within {timeout} s; screen:\n" + "\n".join(rows)
                )
            time.sleep(0.02)

    def wait_for_row(self, pattern: str, timeout: float = DEFAULT_TIMEOUT) -> re.Match[str]:
        rx = re.compile(pattern)

        def check(rows: list[str]) -> re.Match[str] | None:
            for row in rows:
                m = rx.search(row)
                if m:
                    return m
            return None

        return self.wait_for(check, f"row matching {pattern!r}", timeout)

    def wait_for_file(self, path: Path, timeout: float = DEFAULT_TIMEOUT) -> str:
        """The content of ``path`` once it exists and ends with a newline."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                text = path.read_text()
            except FileNotFoundError:
                text = ""
            if text.endswith("\n"):
                return text
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"tmux {self.name}: {path.name} not written within {timeout} s; screen:\n"
                    + "\n".join(self.screen())
                )
            time.sleep(0.02)

    def pane_pid(self) -> int:
        """The pid of the pane's shell (tmux started it for us)."""
        return int(self.tmux("display-message", "-p", "-t", self.name, "#{pane_pid}").strip())

    def children(self) -> list[int]:
        """The pids of the pane shell's children (the program it runs)."""
        pid = self.pane_pid()
        try:
            text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
        except FileNotFoundError:
            return []
        return [int(x) for x in text.split()]

    def type(self, text: str) -> None:
        """Type ``text`` literally (UTF-8 as is)."""
        self.tmux("send-keys", "-t", self.name, "-l", text)

    def keys(self, *keys: str) -> None:
        """Press keys by tmux name: Enter, BSpace, C-c, C-d."""
        self.tmux("send-keys", "-t", self.name, *keys)

    def close(self) -> None:
        for args in (("kill-session", "-t", self.name), ("kill-server",)):
            try:
                self.tmux(*args)
            except (AssertionError, subprocess.TimeoutExpired):
                pass


# ---- serial lines: a screen, the far end of a line, a software cable ----------


class Screen:
    """A minimal terminal: enough of one to show what picchat's line editor
    draws (text wrapped at ``width``, CR, LF, BS, ESC[nA, ESC[J, ESC[H,
    ESC[2J, ESC[K), so a test can check what a person would see."""

    def __init__(self, width: int = 80) -> None:
        self.width = width
        self.rows: list[list[str]] = [[]]
        self.x = self.y = 0
        self._wrap_pending = False
        self._esc: str | None = None  # the escape sequence being read
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def feed(self, data: bytes) -> None:
        for ch in self._decoder.decode(data):
            if self._esc is not None:
                self._escape(ch)
            elif ch == "\x1b":
                self._esc = ""
            elif ch == "\r":
                self.x, self._wrap_pending = 0, False
            elif ch == "\n":
                self._down()
            elif ch == "\b":
                self.x, self._wrap_pending = max(0, self.x - 1), False
            elif ch.isprintable():
                self._put(ch)
            # BEL and other controls show nothing

    def _down(self) -> None:
        self.y += 1
        while len(self.rows) <= self.y:
            self.rows.append([])
        self._wrap_pending = False

    def _put(self, ch: str) -> None:
        if self._wrap_pending:
            self.x = 0
            self._down()
        row = self.rows[self.y]
        while len(row) <= self.x:
            row.append(" ")
        row[self.x] = ch
        if self.x == self.width - 1:
            self._wrap_pending = True
        else:
            self.x += 1

    def _escape(self, ch: str) -> None:
        seq = self._esc + ch
        if seq == "[" or (seq.startswith("[") and not ("\x40" <= ch <= "\x7e")):
            self._esc = seq  # a CSI sequence goes on
            return
        self._esc = None
        if not seq.startswith("["):
            return  # ESC + one character: nothing we draw
        params, final = seq[1:-1], seq[-1]
        n = int(params) if params.isdigit() else 0
        self._wrap_pending = False
        if final == "A":
            self.y = max(0, self.y - max(1, n))
        elif final == "H":
            self.x = self.y = 0
        elif final == "K":
            del self.rows[self.y][self.x :]
        elif final == "J":
            if n == 2:
                self.rows = [[] for _ in self.rows]
            else:
                del self.rows[self.y][self.x :]
                del self.rows[self.y + 1 :]

    def lines(self) -> list[str]:
        """Every row written so far, trailing blanks and empty last rows removed."""
        rows = ["".join(r).rstrip() for r in self.rows]
        while rows and not rows[-1]:
            rows.pop()
        return rows


class SerialEnd:
    """The far end of a serial line, played by the test: a pty master (or the
    other pty of a socat pair), written and read raw, with a ``Screen`` of
    everything that came back. Every wait has a deadline."""

    def __init__(
        self, fd: int, label: str = "serial end", width: int = 80, slave: int | None = None
    ) -> None:
        self.fd = fd
        self.label = label
        self.slave = slave  # the pty's other side, if we hold it: to see what the server read
        os.set_blocking(fd, False)
        self.raw = bytearray()
        self.screen = Screen(width)
        self.eof = False
        self._sel = selectors.DefaultSelector()
        self._sel.register(fd, selectors.EVENT_READ)

    @classmethod
    def open(cls, path: str | Path, label: str = "serial end", width: int = 80) -> SerialEnd:
        """Open a tty (a socat pty's link) in raw mode, as a terminal program would."""
        import termios
        import tty

        fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        tty.setraw(fd, termios.TCSANOW)  # TCSAFLUSH would throw away what waits
        return cls(fd, label, width)

    def pump(self, timeout: float) -> bool:
        """Read what is there (waiting up to ``timeout``); False if nothing came."""
        if self.eof or not self._sel.select(max(timeout, 0.0)):
            return False
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return False
        except OSError:  # EIO: the other side of the pty is gone
            data = b""
        if not data:
            self.eof = True
            return False
        self.raw += data
        self.screen.feed(data)
        return True

    def mark(self) -> int:
        """Offset into ``raw`` of what comes next, for ``wait_raw(start=...)``."""
        return len(self.raw)

    def _fail(self, what: str, timeout: float) -> AssertionError:
        return AssertionError(
            f"{self.label}: no {what} within {timeout} s; received (last 1500 bytes):\n"
            f"{bytes(self.raw[-1500:])!r}\nscreen:\n" + "\n".join(self.screen.lines()[-15:])
        )

    def wait_raw(
        self, pattern: bytes, timeout: float = DEFAULT_TIMEOUT, start: int = 0
    ) -> re.Match[bytes]:
        """The first match of the regex ``pattern`` in what arrived from ``start`` on."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.raw, start)
            if m:
                return m
            left = deadline - time.monotonic()
            if left <= 0 or self.eof:
                raise self._fail(f"bytes matching {pattern!r}", timeout)
            self.pump(left)

    def wait_screen(self, check, what: str, timeout: float = DEFAULT_TIMEOUT):
        """Read until ``check(screen lines)`` is truthy; return its value."""
        deadline = time.monotonic() + timeout
        while True:
            result = check(self.screen.lines())
            if result:
                return result
            left = deadline - time.monotonic()
            if left <= 0 or self.eof:
                raise self._fail(what, timeout)
            self.pump(left)

    def wait_bottom(self, *rows: str, timeout: float = DEFAULT_TIMEOUT) -> list[str]:
        """Wait until the last rows of the screen are exactly ``rows``."""
        want = list(rows)
        return self.wait_screen(
            lambda lines: lines if lines[-len(want) :] == want else None,
            f"screen ending with {want!r}",
            timeout,
        )

    def drain(self, quiet: float = 0.2, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Read until nothing more arrives for ``quiet`` s (fails after ``timeout``)."""
        deadline = time.monotonic() + timeout
        while self.pump(quiet):
            if time.monotonic() > deadline:
                raise self._fail(f"pause of {quiet} s in the output", timeout)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        deadline = time.monotonic() + DEFAULT_TIMEOUT
        while view:
            try:
                n = os.write(self.fd, view)
            except BlockingIOError:
                n = 0
            view = view[n:]
            if view:
                if time.monotonic() > deadline:
                    raise AssertionError(f"{self.label}: cannot write to the line")
                time.sleep(0.01)

    def unread(self) -> int:
        """Bytes written to the line that the server has not read yet (needs ``slave``)."""
        import fcntl
        import termios

        assert self.slave is not None
        buf = fcntl.ioctl(self.slave, termios.FIONREAD, b"\0\0\0\0")
        return int.from_bytes(buf, sys.byteorder)

    def type(self, keys: bytes, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Press keys one byte at a time (as a person types at 115200 baud: every
        byte arrives as a read of its own). After a byte that completes a
        character, wait for its echo; inside a UTF-8 sequence (no echo yet),
        wait until the server has read the byte, if we can see that."""
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        for i in range(len(keys)):
            key = keys[i : i + 1]
            mark = self.mark()
            self.write(key)
            deadline = time.monotonic() + timeout
            if not decoder.decode(key):
                while self.slave is not None and self.unread():
                    if time.monotonic() > deadline:
                        raise self._fail(f"read of {key!r} by the server", timeout)
                    time.sleep(0.005)
                continue
            while self.mark() == mark:
                if time.monotonic() > deadline or self.eof:
                    raise self._fail(f"echo of {key!r}", timeout)
                self.pump(deadline - time.monotonic())

    def close(self) -> None:
        if self.fd >= 0:
            self._sel.close()
            os.close(self.fd)
            self.fd = -1


class SocatPair:
    """Two ptys joined by socat, with links ``dev`` and ``term``: a serial cable
    in software. The server opens ``dev``; a terminal program (or the test)
    opens ``term``. ``stop()`` ends this socat (by its pid): the cable is
    unplugged and both links go away; ``start()`` plugs a new one in."""

    def __init__(self, dev: Path, term: Path, start: bool = True) -> None:
        self.dev = dev
        self.term = term
        self.proc: subprocess.Popen[bytes] | None = None
        self.lines: list[str] = []
        self._thread: threading.Thread | None = None
        if start:
            self.start()

    def start(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        assert self.proc is None, "socat is running already"
        proc = subprocess.Popen(
            [
                "socat",
                "-d",
                "-d",
                f"pty,raw,echo=0,link={self.dev}",
                f"pty,raw,echo=0,link={self.term}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.proc = proc
        ready = threading.Event()

        def drain() -> None:
            assert proc.stderr is not None
            for raw in proc.stderr:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                self.lines.append(line)
                if "starting data transfer loop" in line:
                    ready.set()
            ready.set()

        self._thread = threading.Thread(target=drain, daemon=True)
        self._thread.start()
        if not ready.wait(timeout) or proc.poll() is not None:
            raise AssertionError("socat did not start:\n" + "\n".join(self.lines))
        deadline = time.monotonic() + timeout
        while not (self.dev.exists() and self.term.exists()):
            if time.monotonic() > deadline:
                raise AssertionError(f"socat made no links {self.dev}, {self.term}")
            time.sleep(0.01)

    def stop(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """SIGTERM this socat and wait (SIGKILL this pid only if it hangs)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        end_process(proc, timeout)
        if self._thread is not None:
            self._thread.join(timeout)
        if proc.stderr is not None:
            proc.stderr.close()
        deadline = time.monotonic() + timeout
        while self.dev.is_symlink() or self.term.is_symlink():  # socat removes its links
            if time.monotonic() > deadline:
                raise AssertionError(f"socat left its links {self.dev}, {self.term} behind")
            time.sleep(0.01)


# ---- beyond localhost: a network namespace, tokens, TLS ------------------------


def unavailable(reason: str) -> None:
    """Skip with ``reason``; under CI (CI=true) fail instead, since a skipped
    test there would hide a gap (as tests/system/pi.py does)."""
    import pytest

    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (under CI this test may not be skipped)", pytrace=False)
    pytest.skip(reason)


def listen_port(server: ServerProcess, host: str, tls: bool = False) -> int:
    """The port the server says it listens on at ``host`` (plain, or TLS)."""
    line = server.wait_for_log(READY_RE.pattern, 0)
    suffix = r" \(TLS" if tls else r"(?! \(TLS)"
    m = re.search(rf"(?:^|\s){re.escape(host)}:(\d+){suffix}", READY_RE.search(line)["where"])
    assert m, f"no {'TLS ' if tls else ''}listener on {host} in: {line}"
    return int(m.group(1))


# Runs inside the namespace: connects where asked, from where asked, and
# hands the connected socket back over a Unix socket (SCM_RIGHTS). A socket
# keeps the namespace it was made in: the test then owns a real TCP
# connection from, say, 10.99.0.2, with nothing in between.
NETNS_CONNECTOR = r"""
import json, socket, sys
srv = socket.socket(socket.AF_UNIX)
srv.bind(sys.argv[1])
srv.listen(64)
print("ready", flush=True)
while True:
    conn, _ = srv.accept()
    with conn:
        req = json.loads(conn.makefile("rb").readline())
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.settimeout(5)
            if req["source"]:
                s.bind((req["source"], 0))
            s.connect((req["host"], req["port"]))
            socket.send_fds(conn, [b"ok"], [s.fileno()])
        except OSError as exc:
            conn.sendall(f"error {exc}".encode())
        finally:
            s.close()
"""


class Netns:
    """A network namespace of our own (inside a user namespace of our own, so
    no root is needed where user namespaces are allowed): its loopback device
    carries 127.0.0.1 and ``addresses``, which are not loopback addresses to
    anyone inside it. Nothing in it can reach any other network.

    A holder process keeps it alive; ``prefix`` runs a command inside it;
    ``connect`` gives the test a TCP socket made inside it. ``close`` ends
    the processes started here, by their pids."""

    HOLDER_SCRIPT = "ip link set lo up && {adds} && echo ready && exec sleep 3600"

    @staticmethod
    def why_not() -> str | None:
        for tool, package in (
            ("unshare", "util-linux"),
            ("nsenter", "util-linux"),
            ("ip", "iproute2"),
        ):
            if shutil.which(tool) is None:
                return (
                    f"{tool} is not installed: the tests of clients on other machines play "
                    f"them in a network namespace of their own (apt install {package})"
                )
        return None

    def __init__(
        self,
        tmp: Path,
        addresses: tuple[str, ...] = ("10.99.0.1", "10.99.0.2", "10.99.0.3", "10.99.0.4"),
    ) -> None:
        self.addresses = addresses
        self.procs: list[subprocess.Popen[bytes]] = []
        adds = " && ".join(f"ip addr add {a}/32 dev lo" for a in addresses)
        holder = self._start(
            ["unshare", "-rn", "sh", "-c", self.HOLDER_SCRIPT.format(adds=adds)], "holder"
        )
        self.pid = holder.pid  # unshare execs sh, which execs sleep: one pid throughout
        self.prefix = ["nsenter", "-t", str(self.pid), "-U", "-n", "--preserve-credentials"]
        self._connector_path = tmp / "netns-connect.sock"
        self._start(
            [*self.prefix, sys.executable, "-c", NETNS_CONNECTOR, str(self._connector_path)],
            "connector",
        )

    def _start(self, args: list[str], what: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        self.procs.append(proc)
        assert proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + DEFAULT_TIMEOUT
        out = b""
        try:
            while not out.endswith(b"ready\n"):
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    break
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    break
                out += chunk
        finally:
            sel.close()
        if not out.endswith(b"ready\n"):
            self.close()
            raise NetnsUnavailable(
                f"cannot make a network namespace ({what}: {' '.join(args[:3])} ...): "
                + (out.decode("utf-8", "replace").strip() or "no answer")
            )
        return proc

    def run(self, args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        """Run a command inside the namespace (with a timeout)."""
        kwargs.setdefault("timeout", 15)
        return subprocess.run([*self.prefix, *args], check=False, **kwargs)

    def connect(self, host: str, port: int, source: str | None = None) -> socket.socket:
        """A TCP socket connected, inside the namespace, to host:port from ``source``."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(DEFAULT_TIMEOUT)
            s.connect(str(self._connector_path))
            s.sendall(json.dumps({"host": host, "port": port, "source": source}).encode() + b"\n")
            msg, fds, _, _ = socket.recv_fds(s, 1024, 1)
        if not fds:
            raise AssertionError(f"netns connect to {host}:{port} from {source}: {msg!r}")
        sock = socket.socket(fileno=fds[0])
        assert sock.family == socket.AF_INET, sock
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as timed lines need
        return sock

    def client(self, host: str, port: int, source: str | None, label: str) -> SocketClient:
        """A plain-protocol client from ``source`` (not greeted yet: see ``SocketClient``)."""
        return SocketClient(self.connect(host, port, source), label)

    def close(self) -> None:
        """End the connector and the holder (the namespace goes with it), by pid."""
        for proc in reversed(self.procs):
            end_process(proc)
            if proc.stdout is not None:
                proc.stdout.close()
        self.procs.clear()


class NetnsUnavailable(Exception):
    """This machine cannot make us a network namespace (the message says why)."""


class SocketClient(Client):
    """A plain-protocol client over a socket connected elsewhere (e.g. inside
    a network namespace). Not greeted on creation: the server may want a
    token first (``auth``)."""

    def __init__(self, sock: socket.socket, label: str = "client") -> None:
        LineSource.__init__(self, label)
        self.sock = sock
        self.sock.setblocking(False)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self.sock, selectors.EVENT_READ)
        self.name = None

    def auth(self, token: str, timeout: float = DEFAULT_TIMEOUT) -> str:
        """Send ``/auth TOKEN`` and wait for the welcome; returns the guest name."""
        self.send_line(f"/auth {token}")
        m = self.expect(r"^\* Welcome to picchat! You are (\S+)\.", timeout)
        self.name = m.group(1)
        return self.name


class TlsClient(Client):
    """A plain-protocol participant over TLS (the ``ssl`` module's socket)."""

    def __init__(
        self,
        port: int,
        label: str = "tls client",
        host: str = "127.0.0.1",
        welcome: bool = True,
        context: Any = None,
    ) -> None:
        import ssl

        LineSource.__init__(self, label)
        if context is None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        raw = socket.create_connection((host, port), timeout=DEFAULT_TIMEOUT)
        self.sock = context.wrap_socket(raw, server_hostname=host)  # the handshake, blocking
        self.sock.setblocking(False)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self.sock, selectors.EVENT_READ)
        self.name = None
        if welcome:
            m = self.expect(r"^\* Welcome to picchat! You are (\S+)\.")
            self.name = m.group(1)

    def _read_chunk(self, timeout: float) -> bytes | None:
        import ssl

        if not self.sock.pending() and not self._sel.select(timeout):
            return None
        try:
            return self.sock.recv(65536)
        except (BlockingIOError, ssl.SSLWantReadError):
            return None
        except (ConnectionResetError, ssl.SSLEOFError, ssl.SSLZeroReturnError):
            return b""


def client_hello() -> bytes:
    """The first flight of a real TLS client (the ``ssl`` module's ClientHello)."""
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    obj = ctx.wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO(), server_hostname="localhost")
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return out.read()


def make_cert(directory: Path, name: str = "server") -> tuple[Path, Path]:
    """A self-signed certificate for localhost and 127.0.0.1, made by the openssl
    CLI, with its key readable by its owner only: (cert, key)."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    r = subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert r.returncode == 0, r.stderr.decode()
    key.chmod(0o600)
    return cert, key


def openssl_fingerprint(cert: Path) -> str:
    """The certificate's SHA-256 fingerprint as openssl prints it, turned into
    picchat's SHA256:<base64> form (a second opinion on --print-fingerprint)."""
    import base64

    r = subprocess.run(
        ["openssl", "x509", "-in", str(cert), "-noout", "-fingerprint", "-sha256"],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    hexdigits = r.stdout.strip().split("=", 1)[1].replace(":", "")
    return "SHA256:" + base64.b64encode(bytes.fromhex(hexdigits)).decode().rstrip("=")


def write_secret(path: Path, text: str, mode: int = 0o600) -> Path:
    """Write ``text`` to ``path`` atomically (a rename), with ``mode``."""
    tmp = path.with_name(path.name + ".new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, mode)  # whatever the umask
    os.replace(tmp, path)
    return path
