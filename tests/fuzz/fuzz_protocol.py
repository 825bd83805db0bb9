#!/usr/bin/env python3
"""An atheris (libFuzzer, coverage-guided) target for picchat's sans-IO input side.

It feeds arbitrary bytes, in chunks and slices the input chooses, to
``ServerConnection`` (with and without a required token, judged at any moment),
to ``ClientConnection`` and to the line ``Editor`` (any width, resizes, messages
and prompts in between). A finding is any exception but ``ProtocolError`` from
the client side, or a broken invariant (an AssertionError).

    pip install atheris
    python tests/fuzz/fuzz_protocol.py -runs=100000          # or -max_total_time=600
    python tests/fuzz/fuzz_protocol.py crash-<hash>           # replay a finding

tests/unit/test_fuzz.py runs it briefly when atheris is installed.
"""

from __future__ import annotations

import re
import sys
import unicodedata
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from picchat.editor import Editor, Line, QuitRequest
    from picchat.events import Auth, Closed, Fatal, Hello, Help, Invalid, Nick, Quit, Say, Who
    from picchat.protocol import ClientConnection, ProtocolError, ServerConnection, State

REQUESTS = (Auth, Closed, Fatal, Hello, Help, Invalid, Nick, Quit, Say, Who)
UNSAFE_TEXT = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\ud800-\udfff]")
EDITOR_ESCAPES = re.compile(r"\x1b\[\d*A|\x1b\[J|\x1b\[H|\x1b\[2J")
MAX_LINES = (1, 2, 16, 64, 4096)


def _check_requests(requests: list, seen: list) -> None:
    for request in requests:
        assert isinstance(request, REQUESTS), request
        assert not (seen and isinstance(seen[-1], Closed)), "a request after Closed"
        if isinstance(request, Say):
            assert request.text and not UNSAFE_TEXT.search(request.text), request
        seen.append(request)


def fuzz_server(fdp: atheris.FuzzedDataProvider) -> None:
    auth = fdp.ConsumeBool()
    conn = ServerConnection(MAX_LINES[fdp.ConsumeIntInRange(0, len(MAX_LINES) - 1)], auth=auth)
    seen: list = []

    def slice_() -> tuple[int | None, int | None]:
        limit = fdp.ConsumeIntInRange(0, 4) or None
        budget = fdp.ConsumeIntInRange(0, 200) or None
        return limit, budget

    def drain() -> None:
        for _ in range(100_000):
            if conn.state is State.JUDGING and fdp.ConsumeBool():
                conn.authenticated()
            if not conn.backlog:
                return
            _check_requests(conn.next_requests(*slice_()), seen)
        raise AssertionError("the backlog never drains")

    while fdp.remaining_bytes():
        chunk = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 128))
        if not chunk:
            break
        _check_requests(conn.receive_data(chunk, *slice_()), seen)
        drain()
    _check_requests(conn.receive_data(b""), seen)
    conn.authenticated()
    drain()
    assert conn.state is State.CLOSED, conn.state
    assert seen and isinstance(seen[-1], (Closed, Fatal)), seen[-1:]


def fuzz_client(fdp: atheris.FuzzedDataProvider) -> None:
    client = ClientConnection(fdp.ConsumeIntInRange(1, 1 << 20))
    try:
        while fdp.remaining_bytes():
            chunk = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 256))
            for frame in client.receive_data(chunk):
                assert isinstance(frame, dict)
    except ProtocolError:  # AuthRefused too: the only errors a client may raise
        pass


def _check_screen_bytes(out: bytes, allowed: str) -> None:
    text = EDITOR_ESCAPES.sub("", out.decode("utf-8"))
    text = text.replace("\r\n", "").replace("\r", "").replace("\a", "")
    assert "\x1b" not in text and "\n" not in text, repr(text)
    assert all(ch.isprintable() or ch in allowed for ch in text), repr(text)


def _text(fdp: atheris.FuzzedDataProvider, size: int) -> str:
    """A message or prompt: any text but controls (callers clean what they show)."""
    text = fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, size))
    return "".join(ch for ch in text if unicodedata.category(ch) != "Cc")


def fuzz_editor(fdp: atheris.FuzzedDataProvider) -> None:
    max_bytes = fdp.ConsumeIntInRange(1, 200)
    ed = Editor("> ", fdp.ConsumeIntInRange(1, 200), max_bytes=max_bytes)
    _check_screen_bytes(ed.start(), ed.prompt)
    while fdp.remaining_bytes():
        op = fdp.ConsumeIntInRange(0, 9)
        extra = ""
        if op <= 5:
            out, events = ed.feed(fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 32)))
            for event in events:
                assert isinstance(event, (Line, QuitRequest))
                if isinstance(event, Line):
                    assert all(ch.isprintable() for ch in event.text), event
        elif op == 6:
            out = ed.resize(fdp.ConsumeIntInRange(-2, 300))
        elif op == 7:
            extra = _text(fdp, 40)
            out = ed.show(extra)
        elif op == 8:
            out = ed.set_prompt(_text(fdp, 20))
        else:
            out = ed.hide()
        _check_screen_bytes(out, ed.prompt + extra)
        assert all(ch.isprintable() for ch in ed.buffer)
        assert len(ed.buffer.encode()) <= max_bytes


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    (fuzz_server, fuzz_client, fuzz_editor)[fdp.ConsumeIntInRange(0, 2)](fdp)


def main() -> None:
    argv = list(sys.argv)
    here = Path(__file__).resolve().parent
    # Defaults (given options win): inputs long enough for several lines, and
    # a dictionary of the protocol's words.
    if not any(a.startswith("-max_len=") for a in argv):
        argv.append("-max_len=4096")
    if not any(a.startswith("-dict=") for a in argv):
        argv.append(f"-dict={here / 'protocol.dict'}")
    atheris.Setup(argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
