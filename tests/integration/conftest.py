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

from .support import Forwarder, ServerProcess, TmuxPane, base_env


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
    ) -> ServerProcess:
        args = [sys.executable, "-m", "picchat", "--presence-interval", presence]
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
