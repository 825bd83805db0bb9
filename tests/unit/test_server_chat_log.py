"""The Server object in its own loop, in this process: a chat line is logged
after it was sent to the room, not between reading and sending it."""

from __future__ import annotations

import socket
import time
from collections.abc import Mapping

from picchat import logs
from picchat.cli import server_parser
from picchat.config import load
from picchat.logs import StderrWriter, WriterHandler
from picchat.server import Server


def test_the_recipient_has_a_chat_line_before_it_is_logged(monkeypatch, tmp_path):
    path = tmp_path / "log"
    log_file = open(path, "wb")  # noqa: SIM115 (closed below, after the server)
    handler = WriterHandler(StderrWriter(fd=log_file.fileno()), journal=True)
    monkeypatch.setattr(logs, "_handler", handler)
    monkeypatch.setattr(logs, "_level", logs.INFO)
    seen_at_log: list[bytes] = []  # what the recipient could read when the line was logged
    chat = handler._chat

    def logging_chat(message: str, fields: Mapping[str, str]) -> None:
        if message.endswith("hello room"):
            seen_at_log.append(available())
        chat(message, fields)

    monkeypatch.setattr(handler, "_chat", logging_chat)
    args = ["--port", "0", "--host", "127.0.0.1", "--socket", "off", "--console", "off"]
    server = Server(load(cli=vars(server_parser().parse_args(args)), env={}))
    server.start()
    port = server._listeners[0][0].getsockname()[1]
    alice = socket.create_connection(("127.0.0.1", port))
    bob = socket.create_connection(("127.0.0.1", port))
    bob.setblocking(False)
    deadline = time.monotonic() + 5

    def pump(until) -> None:
        while not until() and time.monotonic() < deadline:
            server.loop.run_once(0.05)

    def available() -> bytes:
        try:
            return bob.recv(4096, socket.MSG_PEEK)
        except BlockingIOError:
            return b""

    try:
        bob.sendall(b"/who\n")  # bob is in the room once the server answered
        pump(available)
        bob.recv(4096)
        alice.sendall(b"hello room\n")
        pump(lambda: seen_at_log)
    finally:
        server.close()
        server.loop.close()
        alice.close()
        bob.close()
        log_file.close()
    assert seen_at_log, "the chat line was never logged"
    assert b"hello room" in seen_at_log[0]
    assert "hello room" in path.read_text()
