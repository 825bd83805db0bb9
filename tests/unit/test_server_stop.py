"""The Server object in its own loop, in this process: what stop() leaves behind."""

from __future__ import annotations

import socket

from picchat.cli import server_parser
from picchat.config import load
from picchat.server import Server


class FakeBridge:
    """A serial line as the server sees it: an id, and lines shown on it."""

    cid = 500
    wants_output = True

    def __init__(self) -> None:
        self.shown: list[str] = []

    def show(self, lines: list[str], dropped: int) -> None:
        self.shown.extend(lines)

    def close(self) -> None:
        pass


def test_stop_with_no_connection_still_says_goodbye_on_a_serial_line():
    # Output normally waits until input is quiet; at stop, with no connection
    # to wait for, the loop ends in the same turn: the goodbye must be out first.
    args = vars(server_parser().parse_args(["--port", "0", "--socket", "off", "--console", "off"]))
    server = Server(load(cli=args, env={}))
    server.start()
    bridge = FakeBridge()
    server.hub.open_local(bridge.cid, "tty1", "serial /dev/fake", limit=4096)
    server._serial[bridge.cid] = bridge  # a bridge without a device
    a, b = socket.socketpair()
    try:

        def ready() -> None:  # stop() comes from a ready fd (a signal, the console)
            a.recv(1)
            server.stop()

        server.loop.add_reader(a.fileno(), ready)
        b.send(b"x")
        server.loop.call_later(5, server.loop.stop)  # a bound, should it hang
        server.run()
    finally:
        server.close()
        a.close()
        b.close()
    assert bridge.shown == ["* Server is shutting down. Bye!"]
