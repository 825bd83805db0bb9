"""Logging: journald priorities under systemd, readable lines otherwise, never blocking."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import signal
import socket
import sys

import pytest

from picchat import logs
from picchat.logs import StderrWriter, WriterHandler, journal_stream

LIMIT = 4096


@pytest.fixture
def pipe():
    r, w = os.pipe()
    yield r, w
    for fd in (r, w):
        with contextlib.suppress(OSError):
            os.close(fd)


def read_all(fd: int) -> bytes:
    """Everything the pipe holds now (the read end is non-blocking)."""
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


# ---- journal detection ------------------------------------------------------------------


def dev_ino(fd: int) -> str:
    st = os.fstat(fd)
    return f"{st.st_dev}:{st.st_ino}"


def test_journal_stream_true_only_for_the_named_stream(tmp_path, pipe):
    _r, w = pipe
    with open(tmp_path / "f", "wb") as f:
        fd = f.fileno()
        assert journal_stream(fd, {"JOURNAL_STREAM": dev_ino(fd)}) is True
        assert journal_stream(fd, {"JOURNAL_STREAM": dev_ino(w)}) is False
        st = os.fstat(fd)
        assert journal_stream(fd, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"}) is False
        assert journal_stream(fd, {"JOURNAL_STREAM": f"{st.st_dev + 1}:{st.st_ino}"}) is False
        assert journal_stream(fd, {}) is False
        for junk in ("", ":", "abc", f"{st.st_dev}", f"{st.st_dev}:", f"x:{st.st_ino}"):
            assert journal_stream(fd, {"JOURNAL_STREAM": junk}) is False, junk


def test_journal_stream_of_a_closed_fd_is_false(pipe):
    _r, w = pipe
    value = dev_ino(w)
    os.close(w)
    assert journal_stream(w, {"JOURNAL_STREAM": value}) is False


# ---- formatting ----------------------------------------------------------------------------


@contextlib.contextmanager
def handler_on(monkeypatch, fd: int, journal: bool):
    """picchat's log written through a WriterHandler to ``fd``."""
    writer = StderrWriter(fd=fd, limit=65536)
    monkeypatch.setattr(logs, "_handler", WriterHandler(writer, journal))
    monkeypatch.setattr(logs, "_level", logs.DEBUG)
    try:
        yield
    finally:
        writer.close()


def log_to_file(tmp_path, monkeypatch, journal: bool, level: int, msg: str, *args, **kw) -> str:
    path = tmp_path / "out.log"
    with open(path, "wb") as f, handler_on(monkeypatch, f.fileno(), journal):
        logs.get("picchat.tests.logs").log(level, msg, *args, **kw)
    return path.read_text()


@pytest.mark.parametrize(
    ("level", "prefix"),
    [
        (logs.DEBUG, "<7>"),
        (logs.INFO, "<6>"),
        (logs.NOTICE, "<5>"),
        (logs.WARNING, "<4>"),
        (logs.ERROR, "<3>"),
        (logs.CRITICAL, "<2>"),
    ],
)
def test_journal_lines_carry_the_syslog_priority(tmp_path, monkeypatch, level, prefix):
    out = log_to_file(tmp_path, monkeypatch, True, level, "hello %s", "there")
    assert out == f"{prefix}hello there\n"


def test_journal_mode_prefixes_every_line_of_a_multiline_message(tmp_path, monkeypatch):
    out = log_to_file(tmp_path, monkeypatch, True, logs.WARNING, "one\ntwo\nthree")
    assert out == "<4>one\n<4>two\n<4>three\n"


def test_journal_mode_prefixes_every_line_of_a_traceback(tmp_path, monkeypatch):
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        out = log_to_file(tmp_path, monkeypatch, True, logs.ERROR, "failed", exc_info=True)
    lines = out.splitlines()
    assert lines[0] == "<3>failed"
    assert len(lines) > 3
    assert all(line.startswith("<3>") for line in lines)
    assert lines[-1] == "<3>RuntimeError: boom"


def test_journal_mode_has_no_timestamp(tmp_path, monkeypatch):
    out = log_to_file(tmp_path, monkeypatch, True, logs.INFO, "plain")
    assert not re.search(r"\d\d:\d\d:\d\d", out)


@pytest.mark.parametrize(
    ("level", "name"),
    [(logs.DEBUG, "DEBUG"), (logs.INFO, "INFO"), (logs.WARNING, "WARNING"), (logs.ERROR, "ERROR")],
)
def test_readable_mode_has_timestamp_and_level(tmp_path, monkeypatch, level, name):
    out = log_to_file(tmp_path, monkeypatch, False, level, "hello %d", 42)
    assert re.fullmatch(rf"\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d {name} hello 42\n", out), out
    assert not out.startswith("<")


def test_setup_routes_picchat_loggers_to_the_fd(tmp_path, monkeypatch):
    monkeypatch.setattr(logs, "_handler", None)
    monkeypatch.setattr(logs, "_level", logs.INFO)
    path = tmp_path / "stderr"
    with open(path, "wb") as f:
        monkeypatch.setenv("JOURNAL_STREAM", dev_ino(f.fileno()))
        try:
            writer = logs.setup("warning", 8192, fd=f.fileno())
            assert writer.limit == 8192
            logs.get("picchat.something").info("not shown")
            logs.get("picchat.something").warning("shown")
            logs.set_level("debug")
            logs.get("picchat.other").debug("now shown")
            writer = logs.setup("info", 8192, fd=f.fileno())  # again: replaces the handler
            logs.get("picchat").debug("not shown either")
            logs.get("picchat").info("once")
            logs.chat("alice", "hi", {"SENDER": "alice"})  # no journal socket: a line
        finally:
            logs._handler.writer.close()
    assert path.read_text() == "<4>shown\n<7>now shown\n<6>once\n<6>alice: hi\n"


def test_before_setup_warnings_and_worse_go_to_stderr(monkeypatch, capsys):
    monkeypatch.setattr(logs, "_handler", None)
    monkeypatch.setattr(logs, "_level", logs.INFO)
    logs.get("picchat").info("quiet")
    logs.get("picchat").error("Configuration error: %s", "port: not a number")
    assert capsys.readouterr().err == "Configuration error: port: not a number\n"


def test_a_message_is_formatted_only_when_its_level_is_shown(monkeypatch):
    class Loud:
        def __str__(self) -> str:
            raise AssertionError("formatted")

    monkeypatch.setattr(logs, "_level", logs.INFO)
    logs.get("picchat").debug("%s", Loud())  # not formatted, so not raised


# ---- the non-blocking writer ------------------------------------------------------------------


def test_writer_on_a_pipe_that_is_never_read_never_blocks(pipe):
    r, w = pipe
    os.set_blocking(r, False)
    with contextlib.suppress(OSError):  # a small pipe, if we may: fewer bytes to fill it
        fcntl.fcntl(w, getattr(fcntl, "F_SETPIPE_SZ", 1031), 4096)
    writer = StderrWriter(fd=w, limit=LIMIT)
    blocked = []
    writer.on_blocked = lambda: blocked.append(True)
    accepted = []
    total = 0
    i = 0
    while total <= (1 << 20) + 100_000:  # well over 1 MB, in a bounded loop
        line = f"line {i:06d} ".encode() + b"x" * 88 + b"\n"
        before = writer.dropped
        writer.write(line)  # a blocking write would hang here (pytest-timeout)
        if writer.dropped == before:
            accepted.append(line)
        assert writer.pending <= LIMIT
        total += len(line)
        i += 1
    assert writer.dropped > 0
    assert blocked
    assert writer.pending > 0
    dropped = writer.dropped
    # Our own description is non-blocking; the caller's fd is left as it was.
    assert os.get_blocking(w)

    first = read_all(r)  # the reader wakes up and drains the pipe
    with logs.capture() as records:
        writer.flush()
    assert writer.pending == 0
    assert writer.dropped == 0
    rest = read_all(r)
    assert rest  # what waited in the buffer came out
    assert first + rest == b"".join(accepted)
    warnings = [rec for rec in records if rec.levelno == logs.WARNING]
    assert len(warnings) == 1
    assert str(dropped) in warnings[0].getMessage()
    assert "dropped" in warnings[0].getMessage()
    writer.close()


def test_writer_passes_lines_through_while_the_reader_keeps_up(pipe):
    r, w = pipe
    os.set_blocking(r, False)
    writer = StderrWriter(fd=w, limit=LIMIT)
    got = []
    for i in range(100):
        writer.write(b"%d\n" % i)
        got.append(read_all(r))
    assert b"".join(got) == b"".join(b"%d\n" % i for i in range(100))
    assert writer.pending == 0
    assert writer.dropped == 0
    writer.close()


def test_a_line_longer_than_the_buffer_is_dropped_when_stderr_is_full(pipe):
    r, w = pipe
    os.set_blocking(r, False)
    writer = StderrWriter(fd=w, limit=LIMIT)
    while writer.pending == 0:  # fill the pipe
        writer.write(b"y" * 1000)
    writer.write(b"z" * (LIMIT + 1))
    assert writer.dropped == 1
    assert writer.pending <= LIMIT
    writer.close()


def test_writer_on_a_socket_never_blocks():
    a, b = socket.socketpair()
    try:
        writer = StderrWriter(fd=a.fileno(), limit=LIMIT)
        for _ in range(20_000):
            writer.write(b"q" * 99 + b"\n")
            assert writer.pending <= LIMIT
        assert writer.dropped > 0
        assert a.getblocking()  # the shared socket's flags are untouched
        writer.close()
    finally:
        a.close()
        b.close()


def test_writer_with_a_reader_gone_discards_quietly(pipe):
    r, w = pipe
    writer = StderrWriter(fd=w, limit=LIMIT)
    os.close(r)
    old = signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # Python's default, made sure
    try:
        writer.write(b"into the void\n")  # EPIPE: nothing to do, nothing raised
    finally:
        signal.signal(signal.SIGPIPE, old)
    assert writer.pending == 0
    writer.close()


def test_writer_without_stderr_drops_everything(pipe):
    _r, w = pipe
    os.close(w)
    writer = StderrWriter(fd=w, limit=LIMIT)
    assert writer.fd == -1
    writer.write(b"nobody listens\n")
    assert writer.pending == 0


def test_writer_close_leaves_the_callers_fd_open(pipe):
    _r, w = pipe
    writer = StderrWriter(fd=w, limit=LIMIT)
    writer.close()
    assert writer.fd == -1
    os.fstat(w)  # still open
    writer.write(b"after close\n")  # ignored, not an error


@pytest.mark.skipif(sys.platform != "linux", reason="/proc/self/fd")
def test_writer_reopens_a_pipe_as_its_own_description(pipe):
    _r, w = pipe
    writer = StderrWriter(fd=w, limit=LIMIT)
    assert writer.fd != w
    assert not os.get_blocking(writer.fd)
    assert os.get_blocking(w)
    writer.close()


def test_a_chat_line_without_the_journal_has_a_timestamp(tmp_path, monkeypatch):
    path = tmp_path / "out.log"
    with open(path, "wb") as f, handler_on(monkeypatch, f.fileno(), journal=False):
        logs.chat("alice", "hi 100%", {"SENDER": "alice"})
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d INFO alice: hi 100%\n", path.read_text())


def test_with_on_pending_lines_wait_for_one_flush(pipe):
    r, w = pipe
    os.set_blocking(r, False)
    writer = StderrWriter(fd=w, limit=LIMIT)
    asked = []
    writer.on_pending = lambda: asked.append(True)  # the loop: flush at the end of the turn
    writer.write(b"one\n")
    writer.write(b"two\n")
    assert asked == [True]  # asked once, when the buffer stopped being empty
    assert read_all(r) == b""
    writer.flush()
    assert read_all(r) == b"one\ntwo\n"
    writer.write(b"three\n")
    assert asked == [True, True]
    writer.close()


# ---- chat held until it was delivered --------------------------------------------------------


def no_flush() -> None:
    """A holder that asks for nothing: the test releases the chat itself."""


def test_held_chat_waits_for_release_and_asks_for_it_once(tmp_path, monkeypatch):
    path = tmp_path / "out.log"
    asked = []

    def on_held() -> None:
        asked.append(True)

    with open(path, "wb") as f, handler_on(monkeypatch, f.fileno(), journal=True):
        logs.hold_chat(on_held)
        logs.chat("alice", "one", {"SENDER": "alice"})
        logs.chat("bob", "two", {"SENDER": "bob"})
        assert path.read_text() == ""  # not before the turn's output went out
        assert asked == [True]  # asked once, when the first line began to wait
        logs.release_chat()
        assert path.read_text() == "<6>alice: one\n<6>bob: two\n"
        logs.chat("carol", "three", {"SENDER": "carol"})
        assert asked == [True, True]
        logs.stop_holding_chat(on_held)  # no more holding: the waiting line goes out
        assert path.read_text().endswith("<6>carol: three\n")
        logs.chat("dave", "four", {"SENDER": "dave"})
        assert path.read_text().endswith("<6>dave: four\n")
        assert asked == [True, True]


def test_only_the_holder_stops_holding(tmp_path, monkeypatch):
    path = tmp_path / "out.log"

    def first() -> None:
        pass

    def second() -> None:
        pass

    with open(path, "wb") as f, handler_on(monkeypatch, f.fileno(), journal=True):
        logs.hold_chat(first)
        logs.hold_chat(second)  # a second server in the same process
        logs.stop_holding_chat(first)  # the first one closes
        logs.chat("alice", "hi", {"SENDER": "alice"})
        assert path.read_text() == ""  # still held for the second
        logs.stop_holding_chat(second)
        assert path.read_text() == "<6>alice: hi\n"


def test_another_record_releases_held_chat_first_so_the_log_keeps_its_order(tmp_path, monkeypatch):
    path = tmp_path / "out.log"
    with open(path, "wb") as f, handler_on(monkeypatch, f.fileno(), journal=True):
        logs.hold_chat(no_flush)
        logs.chat("alice", "bye all", {"SENDER": "alice"})
        logs.get("picchat.tests.logs").info("alice left")
        logs.stop_holding_chat(no_flush)
    assert path.read_text() == "<6>alice: bye all\n<6>alice left\n"


def test_held_chat_is_bounded(tmp_path, monkeypatch):
    path = tmp_path / "out.log"
    with open(path, "wb") as f, handler_on(monkeypatch, f.fileno(), journal=True):
        logs.hold_chat(no_flush)
        for i in range(logs.HELD_CHAT_LINES + 10):
            logs.chat("alice", str(i), {"SENDER": "alice"})
        assert len(logs._handler.held) == 10  # the first HELD_CHAT_LINES went out at once
        assert path.read_text().count("\n") == logs.HELD_CHAT_LINES
        logs.stop_holding_chat(no_flush)
    lines = path.read_text().splitlines()
    assert lines == [f"<6>alice: {i}" for i in range(logs.HELD_CHAT_LINES + 10)]
