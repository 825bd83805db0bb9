"""picchat-send: post messages from a shell and wait until the server has them.

A short-lived, blocking program: one connection, the structured protocol,
every message acknowledged before it exits 0. Messages are pipelined (at most
WINDOW unacknowledged) so ``picchat-send - < big-file`` is not one round trip
per line, yet the server's output queue for our acks stays small.
"""

from __future__ import annotations

import getpass
import os
import socket
import ssl
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from . import __version__
from .config import client_socket_paths
from .credentials import DEFAULT_TLS_PORT, Credentials, tls_failure
from .exits import EX_DATAERR, EX_NOPERM, EX_PROTOCOL, EX_TEMPFAIL, EX_UNAVAILABLE
from .protocol import (
    AuthRefused,
    ClientConnection,
    ProtocolError,
    encode_hello,
    encode_request,
)
from .room import NAME_MAX
from .tls import CertificateMismatch

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 1234
RETRY_INTERVAL = 5.0  # seconds between attempts with --wait, as the original client
WINDOW = 64  # messages sent ahead of their acks


class SendError(Exception):
    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def default_name() -> str:
    """user@host, cut to the longest name the server takes."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "user"
    return f"{user}@{socket.gethostname().split('.')[0]}"[:NAME_MAX]


def _path_exists(path: Path) -> bool:
    """Does the socket file exist? A directory we may not search is our
    permission problem, not a missing server: say so (exit 77)."""
    try:
        os.stat(path)
    except PermissionError:
        raise SendError(
            f"permission denied on the directory of the server's socket {path}: join the "
            "group that owns it, or use --host/--port",
            EX_NOPERM,
        ) from None
    except OSError:
        return False
    return True


def _connect_once(
    socket_path: str | None,
    host: str | None,
    port: int | None,
    timeout: float,
    creds: Credentials,
) -> tuple[socket.socket, str]:
    tcp_only = host is not None or port is not None or creds.tls
    tried = []
    if not tcp_only:
        if socket_path:
            path: Path | None = Path(socket_path)
        else:
            path = next((p for p in client_socket_paths() if _path_exists(p)), None)
        if path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(str(path))
                return sock, str(path)
            except PermissionError:
                sock.close()
                raise SendError(
                    f"permission denied on the server's socket {path}: join the group "
                    "that owns it (see `ls -l`), or use --host/--port",
                    EX_NOPERM,
                ) from None
            except OSError as exc:
                sock.close()
                if socket_path:  # asked for this socket and nothing else
                    raise SendError(
                        f"no picchat server at {path}: {exc.strerror}", EX_UNAVAILABLE
                    ) from None
                tried.append(f"{path} ({exc.strerror})")  # stale: try TCP
    target = (host or DEFAULT_HOST, port or (DEFAULT_TLS_PORT if creds.tls else DEFAULT_PORT))
    try:
        sock = socket.create_connection(target, timeout=timeout)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        tried.append(f"{target[0]}:{target[1]} ({reason})")
        raise SendError(
            f"no picchat server reachable at {' or '.join(tried)}; is picchat-server "
            "running? (--wait SECONDS waits for it)",
            EX_UNAVAILABLE,
        ) from None
    where = f"[{target[0]}]:{target[1]}" if ":" in target[0] else f"{target[0]}:{target[1]}"
    if creds.tls:
        sock = _start_tls(sock, target[0], where, creds)
    return sock, where


def _start_tls(sock: socket.socket, host: str, where: str, creds: Credentials) -> socket.socket:
    """The handshake (blocking, within the timeout), then the certificate check."""
    try:
        tls = creds.context().wrap_socket(sock, server_hostname=host)
    except TimeoutError:
        sock.close()
        raise SendError(f"the TLS handshake with {where} timed out", EX_TEMPFAIL) from None
    except OSError as exc:  # ssl.SSLError among them
        sock.close()
        raise SendError(tls_failure(exc, where), EX_PROTOCOL) from None
    try:
        notice = creds.check(tls.getpeercert(binary_form=True), where)
    except CertificateMismatch as exc:
        tls.close()
        raise SendError(str(exc), EX_PROTOCOL) from None
    if notice:
        print(f"picchat-send: {notice}", file=sys.stderr)
    return tls


def connect(
    socket_path: str | None,
    host: str | None,
    port: int | None,
    wait: float,
    timeout: float,
    creds: Credentials | None = None,
) -> tuple[socket.socket, str]:
    creds = creds or Credentials()
    deadline = time.monotonic() + wait
    while True:
        try:
            return _connect_once(socket_path, host, port, timeout, creds)
        except SendError as exc:
            left = deadline - time.monotonic()
            if exc.exit_code != EX_UNAVAILABLE or left <= 0:
                raise
            time.sleep(min(RETRY_INTERVAL, left))


def _text(arg: str) -> str:
    """A command-line argument as text: bytes that are not UTF-8 become U+FFFD."""
    return os.fsencode(arg).decode("utf-8", "replace")


def _lines(message: str) -> Iterator[str]:
    source: Iterable[str]
    if message == "-":  # bytes, so that input that is not UTF-8 cannot crash us
        source = (raw.decode("utf-8", "replace") for raw in sys.stdin.buffer)
    else:
        source = _text(message).splitlines()
    for line in source:
        line = line.rstrip("\r\n")
        if line.strip():
            yield line


class _Session:
    def __init__(self, sock: socket.socket, where: str, timeout: float) -> None:
        self.sock = sock
        self.where = where
        self.timeout = timeout
        self.client = ClientConnection()
        self.frames: list[dict] = []

    def next_frame(self) -> dict:
        while not self.frames:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                self._not_picchat()
                raise SendError(
                    f"the server at {self.where} did not answer within {self.timeout:g} s",
                    EX_TEMPFAIL,
                ) from None
            except OSError as exc:
                raise SendError(
                    f"lost the connection to {self.where}: {exc.strerror}", EX_UNAVAILABLE
                ) from None
            if not data:
                self._not_picchat()
                said = self.client.last_plain if self.client.welcome is None else ""
                why = f": {said[2:]}" if said.startswith("! ") else ""
                raise SendError(
                    f"the server at {self.where} closed the connection{why}", EX_UNAVAILABLE
                )
            try:
                self.frames.extend(self.client.receive_data(data))
            except AuthRefused:
                raise SendError(
                    f"the server at {self.where} refused our token (authentication failed)",
                    EX_NOPERM,
                ) from None
            except ProtocolError as exc:
                raise SendError(str(exc), EX_PROTOCOL) from None
        return self.frames.pop(0)

    def _not_picchat(self) -> None:
        """Before the hello reply, a first line that is not picchat's greeting
        means we reached some other service (exit 76, not "no server")."""
        said = self.client.last_plain
        if self.client.welcome is None and said and not said.startswith(("* ", "! ")):
            raise SendError(
                f"{self.where} does not speak picchat (it said {said[:60]!r})", EX_PROTOCOL
            )

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise SendError(
                f"lost the connection to {self.where}: {exc.strerror}", EX_UNAVAILABLE
            ) from None


def send(
    message: str,
    *,
    socket_path: str | None = None,
    host: str | None = None,
    port: int | None = None,
    name: str | None = None,
    wait: float = 0.0,
    timeout: float = 10.0,
    creds: Credentials | None = None,
) -> int:
    """Send every line of ``message``; returns how many the server refused."""
    creds = creds or Credentials()
    sock, where = connect(socket_path, host, port, wait, timeout, creds)
    with sock:
        s = _Session(sock, where, timeout)
        s.send(
            (creds.auth_line() if sock.family != socket.AF_UNIX else b"")
            + encode_hello(
                _text(name) if name else default_name(),
                member=False,
                client=f"picchat-send/{__version__}",
            )
        )
        welcome = s.next_frame()
        if welcome.get("code") == "auth_required":
            raise SendError(
                f"the server at {where} needs a token: give --token-file FILE (or PICCHAT_TOKEN)",
                EX_NOPERM,
            )
        if welcome.get("type") != "welcome":
            code = EX_DATAERR if welcome.get("code") == "bad_name" else EX_PROTOCOL
            raise SendError(f"the server refused us: {welcome.get('text', welcome)}", code)
        max_line = int(welcome.get("max_line", 4096))
        refused = 0
        pending: dict[str, str] = {}
        number = 0

        def settle_one() -> None:
            nonlocal refused
            frame = s.next_frame()
            kind = frame.get("type")
            if kind == "ack" and frame.get("id") in pending:
                del pending[frame["id"]]
            elif kind == "error" and frame.get("id") in pending:
                text = pending.pop(frame["id"])
                refused += 1
                print(f"picchat-send: refused {text[:40]!r}: {frame.get('text')}", file=sys.stderr)
            elif kind == "bye":
                raise SendError(
                    f"the server is going away ({frame.get('text')}); "
                    f"{len(pending)} message(s) not confirmed",
                    EX_UNAVAILABLE,
                )

        for text in _lines(message):
            number += 1
            id_ = str(number)
            data = encode_request({"type": "msg", "id": id_, "text": text})
            if len(data) - 1 > max_line:
                refused += 1
                print(
                    f"picchat-send: line {number} is too long ({len(data) - 1} bytes encoded; "
                    f"the server takes at most {max_line}); not sent",
                    file=sys.stderr,
                )
                continue
            pending[id_] = text
            s.send(data)
            while len(pending) >= WINDOW:
                settle_one()
        while pending:
            settle_one()
        if not isinstance(sock, ssl.SSLSocket):  # shutdown() would end TLS unannounced
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        return refused


if __name__ == "__main__":  # python3 -m picchat.send "message", from a checkout
    from .cli import send_main

    raise SystemExit(send_main())
