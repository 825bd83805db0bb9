"""picchat-client: the interactive client. One thread, one loop, the terminal
and the socket; it reconnects and resumes without losing messages.

With a terminal on stdin it puts it in raw mode and edits lines itself (the
``Editor``), so incoming messages never tear a half-typed line. With a pipe
or a file on stdin it reads lines, prints messages, and ends once every line
it read has been acknowledged. Lines read before the first connection wait
for it (so that commands such as /nick find the server), and while
max-pending lines wait for their ack it reads no more (a long file is sent
whole).

The I/O lives here; what to send and what to show is ``ClientSession``'s.
"""

from __future__ import annotations

import errno
import os
import random
import signal
import socket
import ssl
import time

from . import __version__
from .client_session import ClientSession, Closing, NameChanged, Output, Show
from .config import client_socket_paths
from .credentials import DEFAULT_TLS_PORT, Credentials, tls_failure
from .editor import Editor, Line, QuitRequest
from .endpoints.listeners import set_keepalive
from .events import Value
from .exits import EX_NOPERM, EX_OK, EX_PROTOCOL
from .framing import TOO_LONG, LineReader
from .loop import Loop, Timer
from .protocol import AuthRefused, ClientConnection, ProtocolError
from .terminal import RawTerminal, width, write_all
from .tls import CertificateMismatch, TlsStream

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 1234
RECV_SIZE = 65536
JITTER = 0.1  # +-10 % on the retry interval, so many clients do not return in step
CONNECT_TIMEOUT = 10.0
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 60, 10, 3  # as the server's defaults


class Target(Value):
    """Where to connect: a Unix socket path, or a TCP host and port."""

    __slots__ = __match_args__ = ("path", "host", "port")

    def __init__(
        self, path: str | None = None, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT
    ) -> None:
        self.path = path
        self.host = host
        self.port = port

    @property
    def label(self) -> str:
        if self.path:
            return self.path
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def choose_target(
    socket_path: str | None, host: str | None, port: int | None, tls: bool = False
) -> Target:
    """--host/--port/--tls force TCP; else the local socket if it exists; else TCP."""
    if host is not None or port is not None or tls:
        return Target(
            None, host or DEFAULT_HOST, port or (DEFAULT_TLS_PORT if tls else DEFAULT_PORT)
        )
    if socket_path:
        return Target(socket_path)
    for path in client_socket_paths():
        try:
            os.stat(path)
        except PermissionError:  # ours to report when connecting (exit 77)
            return Target(str(path))
        except OSError:
            continue
        return Target(str(path))
    return Target()


class ClientError(Exception):
    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def format_time(when: float, now: float | None = None) -> str:
    now = time.time() if now is None else now
    t = time.localtime(when)
    if time.strftime("%Y-%m-%d", t) == time.strftime("%Y-%m-%d", time.localtime(now)):
        return time.strftime("%H:%M", t)
    return time.strftime("%Y-%m-%d %H:%M", t)


class InteractiveClient:
    def __init__(
        self,
        target: Target,
        name: str | None,
        *,
        retry: float = 5.0,
        max_pending: int = 100,
        stdin: int = 0,
        stdout: int = 1,
        loop: Loop | None = None,
        creds: Credentials | None = None,
    ) -> None:
        self.target = target
        self.creds = creds or Credentials()
        self.retry = retry
        self.loop = loop or Loop()
        self.session = ClientSession(name, max_pending, f"picchat-client/{__version__}")
        self.stdin = stdin
        self.stdout = stdout
        self.tty = os.isatty(stdin)
        self.editor: Editor | None = None
        self._stdin_lines = LineReader(1 << 16)
        self._stdin_eof = False
        self._stdin_reading = False
        # A regular file (or /dev/null) cannot be watched by epoll: it is
        # always ready, and read a chunk per loop turn instead.
        self._stdin_watchable = True
        self._sock: socket.socket | None = None
        self._conn: ClientConnection | None = None
        self._out = bytearray()
        self._tls: TlsStream | None = None
        self._connecting = False
        self._ever_connected = False
        self._retry_timer: Timer | None = None
        self._announced_down = False
        self.exit_code = EX_OK

    # ---- running ---------------------------------------------------------

    def run(self) -> int:
        if self.tty:
            with RawTerminal(self.stdin):
                self.editor = Editor(self._prompt(), width(self.stdout))
                self.loop.add_signal_handler(signal.SIGWINCH, self._resized)
                return self._run()
        return self._run()

    def _run(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            self.loop.add_signal_handler(signum, lambda: self._stop(EX_OK))
        self._update_stdin()
        self._connect()
        try:
            self.loop.run()
        finally:
            if self.editor is not None:
                self._write(self.editor.hide())
            self._close_socket()
            self.loop.close()
        return self.exit_code

    def _stop(self, code: int) -> None:
        self.exit_code = code
        self.loop.stop()

    # ---- output to the user ------------------------------------------------

    def _write(self, data: bytes) -> None:
        if not write_all(self.stdout, data):  # our terminal is gone: nothing more to show
            self._stop(EX_OK)

    def _show(self, text: str) -> None:
        if self.editor is not None:
            self._write(self.editor.show(text))
        else:
            self._write((text + "\n").encode())

    def _prompt(self) -> str:
        return f"You ({self.session.name or '...'}): "

    def _handle(self, outputs: list[Output]) -> None:
        for o in outputs:
            if isinstance(o, Show):
                if o.time is not None:
                    self._show(f"[{format_time(o.time)}] {o.text}")
                elif o.kind in ("notice", "status"):
                    self._show(f"* {o.text}")
                elif o.kind == "error":
                    self._show(f"! {o.text}")
                else:
                    self._show(o.text)
            elif isinstance(o, NameChanged):
                if self.editor is not None:
                    # Leave room for the JSON around the text (and escapes),
                    # so a line the editor takes is one the server takes.
                    self.editor.max_bytes = max(64, self.session.max_line // 2 - 64)
                    self._write(self.editor.set_prompt(self._prompt()))
            elif isinstance(o, Closing):
                if o.denied:
                    self._show("! give the token with --token-file FILE (or PICCHAT_TOKEN)")
                    self._stop(EX_NOPERM)
                else:
                    self._stop(EX_PROTOCOL if o.failed else EX_OK)

    def _resized(self) -> None:
        if self.editor is not None:
            self._write(self.editor.resize(width(self.stdout)))

    # ---- input from the user -------------------------------------------------

    def _stdin_room(self) -> int:
        """Piped lines that may be taken now: none before the first connection
        (a script's first lines may be commands that need the server), then as
        many as max-pending leaves; the others wait (back-pressure)."""
        s = self.session
        if not self._ever_connected:
            return 0
        return max(0, s.max_pending - len(s.unacked))

    def _stdin_wanted(self) -> bool:
        if self.editor is not None:
            return not self._stdin_eof  # a person typing: always (pending lines are shown)
        if self._stdin_eof or self._stdin_lines.backlog:
            return False
        # Before the first connection: read on, holding the lines, to see an end
        # of input with nothing in it (then there is nothing to wait for).
        return not self._ever_connected or self._stdin_room() > 0

    def _update_stdin(self) -> None:
        want = self._stdin_wanted()
        if want == self._stdin_reading:
            return
        self._stdin_reading = want
        if not want:
            if self._stdin_watchable:
                self.loop.remove_reader(self.stdin)
            return
        if self._stdin_watchable:
            try:
                self.loop.add_reader(self.stdin, self._stdin_readable)
                return
            except PermissionError:  # EPERM: a regular file or /dev/null
                self._stdin_watchable = False
        self.loop.call_soon(self._stdin_file_turn)

    def _stdin_file_turn(self) -> None:
        if self._stdin_reading:
            self._stdin_readable()
            if self._stdin_reading:
                self.loop.call_soon(self._stdin_file_turn)

    def _take_piped(self, data: bytes) -> None:
        """Submit piped lines, from data or those waiting, as far as there is
        room; at the end of input, the last line without a line ending too."""
        lines = self._stdin_lines
        while True:
            # Blank lines and /help take no room: look again after each batch.
            items = lines.feed(data, self._stdin_room())
            data = b""
            for item in items:
                if item is TOO_LONG:
                    self._show("! an input line longer than 64 KiB was skipped")
                else:
                    self._submit(item.decode("utf-8", "replace"))
            if not items or not lines.backlog:
                break
        if self._stdin_eof and not lines.backlog and lines.pending and self._stdin_room():
            tail = lines.take_partial()
            if isinstance(tail, bytes) and tail:
                self._submit(tail.decode("utf-8", "replace"))
        self._update_stdin()

    def _piped_progress(self) -> None:
        """Connected, or acks came: go on with piped input."""
        if self.editor is None and (self._stdin_lines.backlog or self._stdin_eof):
            self._take_piped(b"")
        self._update_stdin()

    def _stdin_readable(self) -> None:
        try:
            data = os.read(self.stdin, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if self.editor is not None:
            echo, events = self.editor.feed(data)
            self._write(echo)
            for ev in events:
                if isinstance(ev, Line):
                    self._submit(ev.text)
                elif isinstance(ev, QuitRequest):
                    self._quit()
            if not data:  # the terminal hung up
                self._stop(EX_OK)
            return
        if not data:
            self._stdin_eof = True
            self._take_piped(b"")
            self._maybe_done()
            return
        self._take_piped(data)

    def _submit(self, text: str) -> None:
        data, outputs = self.session.submit(text)
        self._send(data)
        self._handle(outputs)

    def _quit(self) -> None:
        data, outputs = self.session.quit()
        if data:
            self._send(data)
            # The server answers with bye; do not wait for it for long.
            self.loop.call_later(2.0, lambda: self._stop(EX_OK))
        self._handle(outputs)

    def _maybe_done(self) -> None:
        """Pipe mode: stop once stdin ended and every line was taken and acknowledged."""
        lines = self._stdin_lines
        if (
            self._stdin_eof
            and self.editor is None
            and not lines.backlog
            and not lines.pending
            and not self.session.unacked
        ):
            if self.session.connected:
                self._quit()
            else:
                self._stop(EX_OK)

    # ---- the connection ----------------------------------------------------------

    def _connect(self) -> None:
        self._retry_timer = None
        t = self.target
        family = socket.AF_UNIX if t.path else socket.AF_INET
        address: str | tuple[str, int] = t.path or (t.host, t.port)
        if not t.path:
            try:
                infos = socket.getaddrinfo(t.host, t.port, type=socket.SOCK_STREAM)
                family, _, _, _, address = infos[0]
            except socket.gaierror as exc:
                self._connect_failed(exc.strerror or str(exc))
                return
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        err = sock.connect_ex(address)
        if err == 0 or err in (errno.EINPROGRESS, errno.EAGAIN):
            self._sock = sock
            self._connecting = True
            self.loop.add_writer(sock.fileno(), self._connect_done)
            self._retry_timer = self.loop.call_later(CONNECT_TIMEOUT, self._connect_timeout)
            return
        sock.close()
        if err == errno.EACCES and t.path:
            self._show(
                f"! permission denied on the server's socket {t.path}: join the group that "
                "owns it (see `ls -l`), or use --host/--port"
            )
            self._stop(EX_NOPERM)
            return
        self._connect_failed(os.strerror(err))

    def _connect_timeout(self) -> None:
        self._retry_timer = None
        self._close_socket()
        self._connect_failed("timed out")

    def _connect_done(self) -> None:
        sock = self._sock
        assert sock is not None
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        self.loop.remove_writer(sock.fileno())
        if self._retry_timer is not None:
            self._retry_timer.cancel()
            self._retry_timer = None
        if err:
            self._close_socket()
            self._connect_failed(os.strerror(err))
            return
        self._connecting = False
        if sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # Notice a server that vanished without a FIN (Wi-Fi gone, Pi unplugged).
            set_keepalive(sock, KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT)
        self._conn = ClientConnection()
        self.loop.add_reader(sock.fileno(), self._readable)
        if self.creds.tls:
            self._tls = TlsStream(
                self.creds.context(), server_side=False, server_hostname=self.target.host
            )
            self._tls.start()
            self._flush()
            return
        self._greet()

    def _greet(self) -> None:
        auth = self.creds.auth_line() if self.target.path is None else b""
        self._send(auth + self.session.hello())

    def _connect_failed(self, reason: str) -> None:
        if not self._announced_down:
            self._announced_down = True
            what = "Cannot connect to" if not self._ever_connected else "Still cannot reach"
            self._show(
                f"* {what} the server at {self.target.label} ({reason}); "
                f"retrying every {self.retry:g} s"
            )
        self._schedule_retry()

    def _schedule_retry(self) -> None:
        delay = self.retry * random.uniform(1 - JITTER, 1 + JITTER)
        self._retry_timer = self.loop.call_later(delay, self._connect)

    def _readable(self) -> None:
        sock = self._sock
        assert sock is not None and self._conn is not None
        try:
            data = sock.recv(RECV_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            self._lost(exc.strerror or "connection error")
            return
        if self._tls is not None:
            data = self._tls_input(data)
            if data is None:
                return
        if not data:
            self._lost("the server closed the connection")
            return
        try:
            frames = self._conn.receive_data(data)
        except AuthRefused as exc:
            self._show(f"! {exc}; check --token-file (or PICCHAT_TOKEN)")
            self._stop(EX_NOPERM)
            return
        except ProtocolError as exc:
            self._show(f"! {exc}")
            self._stop(EX_PROTOCOL)
            return
        for frame in frames:
            was_connected = self.session.connected
            reply, outputs = self.session.receive(frame)
            if not was_connected and self.session.connected:
                self._announced_down = False
                self._show(
                    "Connected to the server!"
                    if not self._ever_connected
                    else "* Reconnected to the server."
                )
                self._ever_connected = True
            self._send(reply)
            self._handle(outputs)
        if self._tls is not None and self._tls.eof and self._sock is not None:
            self._lost("the server closed the connection")
            return
        self._piped_progress()  # connected, or acks came
        self._maybe_done()

    def _tls_input(self, raw: bytes) -> bytes | None:
        """Raw bytes through TLS: plaintext (b"": the end), or None if there
        is nothing to hand on (mid-handshake, or we stopped)."""
        tls = self._tls
        assert tls is not None
        was_handshaken = tls.handshaken
        try:
            plain = tls.receive(raw)
        except ssl.SSLError as exc:
            self._show(f"! {tls_failure(exc, self.target.label)}")
            self._stop(EX_PROTOCOL)
            return None
        except ConnectionError:
            self._lost("the server closed the connection during the TLS handshake")
            return None
        if tls.handshaken and not was_handshaken:
            try:
                notice = self.creds.check(tls.peer_certificate(), self.target.label)
            except CertificateMismatch as exc:
                self._show(f"! {exc}")
                self._stop(EX_PROTOCOL)
                return None
            if notice:
                self._show(f"* {notice}")
            self._greet()
        self._flush()
        if tls.eof:
            return plain  # b"": the end; else the end comes after these lines
        return plain or None

    def _lost(self, reason: str) -> None:
        was = self.session.connected
        self._close_socket()
        self.session.disconnected()
        if was:
            self._announced_down = True
            self._show(f"* Connection lost ({reason}); retrying every {self.retry:g} s")
        self._schedule_retry()

    def _send(self, data: bytes) -> None:
        if not data or self._sock is None:
            return
        self._out += data
        if self._connecting:
            return
        self._flush()

    def _flush(self) -> None:
        sock = self._sock
        if sock is None:
            return
        tls = self._tls
        try:
            if tls is not None:
                tls.send(sock.send, self._out)
            else:
                while self._out:
                    del self._out[: sock.send(self._out)]
        except BlockingIOError:
            pass
        except OSError as exc:
            self._lost(exc.strerror or "send failed")
            return
        if (self._out and (tls is None or tls.handshaken)) or (tls is not None and tls.unsent):
            self.loop.add_writer(sock.fileno(), self._flush)
        else:
            self.loop.remove_writer(sock.fileno())

    def _close_socket(self) -> None:
        if self._sock is not None:
            self.loop.forget(self._sock.fileno())
            self._sock.close()
            self._sock = None
        self._conn = None
        self._out.clear()
        self._tls = None
        self._connecting = False
        if self._retry_timer is not None:
            self._retry_timer.cancel()
            self._retry_timer = None


def run_client(
    socket_path: str | None,
    host: str | None,
    port: int | None,
    name: str | None,
    retry: float,
    max_pending: int,
    creds: Credentials | None = None,
) -> int:
    creds = creds or Credentials()
    target = choose_target(socket_path, host, port, creds.tls)
    return InteractiveClient(target, name, retry=retry, max_pending=max_pending, creds=creds).run()


if __name__ == "__main__":  # python3 -m picchat.client, from a checkout
    from .cli import client_main

    raise SystemExit(client_main())
