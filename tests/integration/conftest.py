"""Fixtures for the integration tests: the real server process and real sockets.

The helpers (server process, clients) are in ``support``; every wait there
has a deadline.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .support import (
    Forwarder,
    Netns,
    NetnsUnavailable,
    ServerProcess,
    TmuxPane,
    base_env,
    make_cert,
    unavailable,
)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A private directory with a short path (AF_UNIX paths are limited to 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="pc", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def start_server(short_tmp: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Factory: start a real server; every one started is stopped at teardown."""
    started: list[ServerProcess] = []

    def start(
        *extra: str,
        env: dict[str, str] | None = None,
        port: str | None = "0",
        sock: str | Path | None = "default",
        presence: str = "0.2",
        wait: bool = True,
        prefix: tuple[str, ...] | list[str] = (),
    ) -> ServerProcess:
        # prefix: e.g. Netns.prefix, to run the server in a network namespace.
        args = [*prefix, sys.executable, "-m", "picchat", "--presence-interval", presence]
        if port is not None:
            args += ["--port", port]
        sock_path: Path | None = None
        if sock == "default":
            sock_path = short_tmp / "s.sock"
        elif sock is not None:
            sock_path = Path(sock)
        if sock_path is not None:
            args += ["--socket", str(sock_path)]
        args += list(extra)
        server = ServerProcess(args, env if env is not None else base_env(), sock_path)
        started.append(server)
        if wait:
            server.wait_ready()
        return server

    yield start
    for server in started:
        server.stop()
    # Whatever a test did to it, the server must never have hit a bug of its
    # own (it logs those with "Internal error" and a traceback).
    for server in started:
        log = server.log
        assert "Internal error" not in log and "Traceback" not in log, log[-3000:]


@pytest.fixture
def server(start_server: Callable[..., ServerProcess]) -> ServerProcess:
    """A server with the default test settings, on a free port and a private socket."""
    return start_server()


@pytest.fixture
def clients() -> Iterator[list[Any]]:
    """A list the test appends its clients to; all are closed at teardown."""
    made: list[Any] = []
    yield made
    for c in made:
        try:
            c.close()
        except OSError:
            pass


@pytest.fixture
def forwarder() -> Iterator[Callable[..., Forwarder]]:
    """Factory: a TCP forwarder to a server port; every one is cut at teardown."""
    made: list[Forwarder] = []

    def make(upstream_port: int, port: int = 0) -> Forwarder:
        f = Forwarder(upstream_port, port)
        made.append(f)
        return f

    yield make
    for f in made:
        f.cut()


@pytest.fixture
def tmux_pane(short_tmp: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., TmuxPane]]:
    """Factory: a detached tmux session (a real terminal) on a private tmux
    server; skipped when tmux is missing; killed at teardown."""
    if shutil.which("tmux") is None:
        pytest.skip(
            "tmux is not installed: the terminal tests need it as a terminal (apt install tmux)"
        )
    made: list[TmuxPane] = []

    def make(command: str, width: int = 40, height: int = 15) -> TmuxPane:
        name = f"pc{os.getpid()}-{len(made)}-{request.node.name[:30]}"
        name = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
        pane = TmuxPane(short_tmp, name, command, width, height)
        made.append(pane)
        return pane

    yield make
    for pane in made:
        pane.close()


@pytest.fixture
def netns(short_tmp: Path) -> Iterator[Netns]:
    """A network namespace of our own where 10.99.0.1 to 10.99.0.4 are this
    machine's addresses but not loopback: a client from 10.99.0.2 is, to a
    server on 10.99.0.1, on another machine. Skipped (failed under CI) where
    no namespace can be made; its processes are ended by pid at teardown."""
    reason = Netns.why_not()
    if reason is not None:
        unavailable(reason)
    try:
        ns = Netns(short_tmp)
    except NetnsUnavailable as exc:
        unavailable(f"{exc} (user namespaces may be disabled here)")
        raise
    try:
        yield ns
    finally:
        ns.close()


@pytest.fixture
def cert(short_tmp: Path) -> Callable[..., tuple[Path, Path]]:
    """Factory: a self-signed certificate and key (``openssl req``) named NAME:
    (cert, key) in a private directory. Skipped (failed under CI) without openssl."""
    if shutil.which("openssl") is None:
        unavailable("openssl is not installed: the TLS tests make certificates with it")

    def make(name: str = "server") -> tuple[Path, Path]:
        return make_cert(short_tmp / "certs", name)

    return make
