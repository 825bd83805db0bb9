"""pause()/resume() of the local inputs, the rate limit's back-pressure: the FIFO
and a serial line, on a real FIFO and a real pty, in the real loop.

While paused an input is not read at all (the loop has no reader for its fd:
the bytes wait in the kernel); lines of a read that came after the pause are
held and handed on at ``resume``, in order; nothing is lost or handed on twice.
The server pauses from inside the line callback (its token bucket ran dry) and
resumes from a timer, and ``resume`` itself may hand on a line that pauses
again: both are played here.
"""

from __future__ import annotations

import os
import pty
import selectors
import tty
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from picchat.config import SerialSpec
from picchat.endpoints.fifo import FifoReader
from picchat.loop import Loop

TURNS = 50  # turns to wait for something that is under way
WAIT = 0.05  # seconds one turn waits for it
# Turns that must pass with nothing read while paused. The bytes are in the
# kernel already, so a watched fd would be reported at once: a short wait shows it.
IDLE_TURNS = 3
IDLE_WAIT = 0.01


@pytest.fixture
def selector() -> Iterator[selectors.BaseSelector]:
    sel = selectors.DefaultSelector()
    yield sel


@pytest.fixture
def loop(selector) -> Iterator[Loop]:
    lp = Loop(selector)
    yield lp
    lp.close()


def run_until(loop: Loop, done: Callable[[], bool]) -> None:
    for _ in range(TURNS):
        if done():
            return
        loop.run_once(WAIT)
    assert done(), "the loop did not get there"


def idle(loop: Loop) -> None:
    for _ in range(IDLE_TURNS):
        loop.run_once(IDLE_WAIT)


def watched(selector: selectors.BaseSelector, fd: int) -> bool:
    """Does the loop wait for ``fd`` to be readable?"""
    key = selector.get_map().get(fd)
    return key is not None and bool(key.events & selectors.EVENT_READ)


# ---- the FIFO -------------------------------------------------------------------------


class Fifo:
    """A FifoReader in ``tmp_path`` and a writer; ``got`` has the lines handed on."""

    def __init__(self, tmp_path: Path, loop: Loop, pause_on: Callable[[bytes], bool]) -> None:
        self.path = tmp_path / "in.fifo"
        self.loop = loop
        self.got: list[bytes] = []
        self.pause_on = pause_on
        self.paused = False
        self.reader = FifoReader(self.path, loop, self._line, max_line=100)
        self.writer = -1

    def _line(self, line: bytes) -> None:
        self.got.append(line)
        if self.pause_on(line):
            self.reader.pause()  # what the server's throttle does when the bucket is dry
            self.paused = True

    def resume(self) -> None:
        self.paused = False
        self.reader.resume()

    @property
    def fd(self) -> int:
        return self.reader._rfd

    def write(self, data: bytes) -> None:
        if self.writer < 0:
            self.writer = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
        assert os.write(self.writer, data) == len(data)

    def hang_up(self) -> None:
        os.close(self.writer)
        self.writer = -1

    def close(self) -> None:
        if self.writer >= 0:
            os.close(self.writer)
        self.reader.close()


@pytest.fixture
def make_fifo(tmp_path, loop) -> Iterator[Callable[..., Fifo]]:
    made: list[Fifo] = []

    def make(pause_on: Callable[[bytes], bool] = lambda line: False) -> Fifo:
        fifo = Fifo(tmp_path, loop, pause_on)
        made.append(fifo)
        return fifo

    yield make
    for fifo in made:
        fifo.close()


def test_fifo_lines_after_a_pause_are_held_in_order_and_handed_on_at_resume(
    make_fifo, loop, selector
):
    fifo = make_fifo(pause_on=lambda line: line == b"one")
    fifo.write(b"one\ntwo\nthree\n")  # one read: three lines
    run_until(loop, lambda: fifo.got)
    assert fifo.got == [b"one"]  # two and three are held
    assert not watched(selector, fifo.fd)
    fifo.resume()
    assert fifo.got == [b"one", b"two", b"three"]  # handed on at once, in order
    assert watched(selector, fifo.fd)
    fifo.write(b"four\n")
    run_until(loop, lambda: len(fifo.got) == 4)
    assert fifo.got == [b"one", b"two", b"three", b"four"]


def test_fifo_is_not_read_while_paused_and_what_waits_in_the_pipe_comes_after_resume(
    make_fifo, loop, selector
):
    fifo = make_fifo()
    fifo.write(b"a\n")
    run_until(loop, lambda: fifo.got)
    fifo.reader.pause()
    assert not watched(selector, fifo.fd)
    fifo.write(b"b\nc\n")
    idle(loop)
    assert fifo.got == [b"a"]  # not read: the bytes wait in the pipe
    fifo.reader.pause()  # twice is once
    fifo.resume()
    assert watched(selector, fifo.fd)
    run_until(loop, lambda: len(fifo.got) == 3)
    idle(loop)
    assert fifo.got == [b"a", b"b", b"c"]


def test_fifo_a_line_handed_on_at_resume_may_pause_again(make_fifo, loop, selector):
    """As the throttle does when every line empties the bucket: each resume
    hands on exactly one held line, the rest stay held, none is lost."""
    fifo = make_fifo(pause_on=lambda line: True)
    lines = [b"line %d" % i for i in range(8)]
    fifo.write(b"".join(line + b"\n" for line in lines))
    run_until(loop, lambda: fifo.got)
    for n in range(1, len(lines)):
        assert fifo.got == lines[:n]
        assert not watched(selector, fifo.fd)
        idle(loop)
        assert fifo.got == lines[:n]
        fifo.resume()
    assert fifo.got == lines
    fifo.resume()  # a resume with nothing held: reading goes on
    assert watched(selector, fifo.fd)
    fifo.write(b"more\n")
    run_until(loop, lambda: len(fifo.got) == len(lines) + 1)
    assert fifo.got == [*lines, b"more"]


def test_fifo_paused_at_the_end_of_a_writer_keeps_its_last_line_and_reopens(
    make_fifo, loop, selector
):
    """The writer's unterminated last line, taken at end of file while pausing,
    comes once; the reopened read end is watched only after the resume."""
    fifo = make_fifo(pause_on=lambda line: True)
    fifo.write(b"p\nq")  # echo -n: no final newline
    fifo.hang_up()
    run_until(loop, lambda: fifo.got)
    assert fifo.got == [b"p"]
    old = fifo.fd
    fifo.resume()  # reads on: the end of file, so q, which pauses again
    run_until(loop, lambda: len(fifo.got) == 2)
    assert fifo.got == [b"p", b"q"]
    assert fifo.fd >= 0 and not watched(selector, fifo.fd)
    assert not watched(selector, old) or fifo.fd == old
    idle(loop)
    fifo.resume()
    assert watched(selector, fifo.fd)
    fifo.pause_on = lambda line: False
    fifo.write(b"r\n")  # a new writer, on the reopened read end
    run_until(loop, lambda: len(fifo.got) == 3)
    idle(loop)
    assert fifo.got == [b"p", b"q", b"r"]


def test_fifo_many_lines_with_pauses_anywhere_lose_nothing_and_repeat_nothing(
    make_fifo, loop, selector
):
    """Over 64 KiB written while the reader pauses every few lines: the writer
    finds the pipe full (EAGAIN) and waits, as the module says; every line
    arrives once, in order."""
    fifo = make_fifo(pause_on=lambda line: line.endswith((b"3", b"7")))
    lines = [b"x" * 40 + b"%05d" % i for i in range(2000)]  # about 92 KiB
    data = b"".join(line + b"\n" for line in lines)
    sent = full = 0
    fifo.write(b"")  # opens the write end
    for _ in range(10_000):
        if len(fifo.got) == len(lines):
            break
        try:
            sent += os.write(fifo.writer, data[sent : sent + 16384])
        except BlockingIOError:
            full += 1  # the pipe is full: the reader is paused
        if fifo.paused:
            assert not watched(selector, fifo.fd)
            if sent == len(data) or full:
                fifo.resume()  # the server's timer
        loop.run_once(0.001)
    assert full  # the writer did wait
    assert fifo.got == lines


# ---- a serial line ------------------------------------------------------------------------


class Line:
    """A SerialBridge on the slave side of a pty; the test types on the master."""

    def __init__(self, loop: Loop, mode: str, pause_on: Callable[[bytes], bool]) -> None:
        self.master, self.slave = pty.openpty()
        tty.setraw(self.slave)
        os.set_blocking(self.master, False)
        self.got: list[bytes] = []
        self.pause_on = pause_on
        from picchat.endpoints.serial import SerialBridge

        self.bridge = SerialBridge(
            SerialSpec(os.ttyname(self.slave), 115200, "line", mode),
            loop,
            retry=60.0,
            force=True,  # this is no Pi: no console or getty to look for
            max_line=200,
            on_open=lambda bridge: None,
            on_line=self._line,
            on_close=lambda bridge, reason: None,
            on_drained=lambda bridge: None,
        )
        self.bridge.start()
        assert self.bridge.is_open

    def _line(self, bridge, line: bytes) -> None:
        self.got.append(line)
        if self.pause_on(line):
            bridge.pause()

    @property
    def fd(self) -> int:
        return self.bridge._fd

    def type(self, data: bytes) -> None:
        assert os.write(self.master, data) == len(data)

    def echo(self) -> bytes:
        out = b""
        while True:
            try:
                chunk = os.read(self.master, 65536)
            except (BlockingIOError, OSError):
                return out
            if not chunk:
                return out
            out += chunk

    def close(self) -> None:
        self.bridge.close()
        if self.master >= 0:
            os.close(self.master)
        os.close(self.slave)


@pytest.fixture
def make_line(loop) -> Iterator[Callable[..., Line]]:
    pytest.importorskip("serial", reason="the serial bridge needs pyserial")
    made: list[Line] = []

    def make(mode: str, pause_on: Callable[[bytes], bool] = lambda line: False) -> Line:
        line = Line(loop, mode, pause_on)
        made.append(line)
        return line

    yield make
    for line in made:
        line.close()


@pytest.mark.parametrize("mode, enter", [("lines", b"\n"), ("lines", b"\r"), ("terminal", b"\r")])
def test_serial_lines_after_a_pause_are_held_in_order_and_handed_on_at_resume(
    make_line, loop, selector, mode, enter
):
    line = make_line(mode, pause_on=lambda text: text == b"one")
    line.type(enter.join([b"one", b"two", b"three", b""]))  # one read: three lines
    run_until(loop, lambda: line.got)
    assert line.got == [b"one"]
    assert not watched(selector, line.fd)
    line.bridge.resume()
    assert line.got == [b"one", b"two", b"three"]
    assert watched(selector, line.fd)
    line.type(b"four" + enter)
    run_until(loop, lambda: len(line.got) == 4)
    assert line.got == [b"one", b"two", b"three", b"four"]


@pytest.mark.parametrize("mode", ["lines", "terminal"])
def test_serial_is_not_read_while_paused(make_line, loop, selector, mode):
    line = make_line(mode)
    line.type(b"a\r")
    run_until(loop, lambda: line.got)
    line.echo()
    line.bridge.pause()
    assert not watched(selector, line.fd)
    line.type(b"bee\rc\r")
    idle(loop)
    assert line.got == [b"a"]
    if mode == "terminal":
        assert b"bee" not in line.echo()  # not even echoed: nobody read it
    line.bridge.resume()
    run_until(loop, lambda: len(line.got) == 3)
    idle(loop)
    assert line.got == [b"a", b"bee", b"c"]
    if mode == "terminal":
        assert b"bee" in line.echo()


@pytest.mark.parametrize("mode", ["lines", "terminal"])
def test_serial_a_line_handed_on_at_resume_may_pause_again(make_line, loop, selector, mode):
    line = make_line(mode, pause_on=lambda text: True)
    lines = [b"line%d" % i for i in range(6)]
    line.type(b"".join(text + b"\r" for text in lines))
    run_until(loop, lambda: line.got)
    for n in range(1, len(lines)):
        assert line.got == lines[:n]
        assert not watched(selector, line.fd)
        idle(loop)
        line.bridge.resume()
    assert line.got == lines
    line.bridge.resume()
    assert watched(selector, line.fd)


def test_serial_lines_held_when_the_device_went_away_are_still_handed_on(make_line, loop):
    """Lines read before the device was unplugged were typed: they are handed
    on at the resume that follows, device or not."""
    closed: list[str] = []
    line = make_line("lines", pause_on=lambda text: text == b"old1")
    line.bridge._on_close = lambda bridge, reason: closed.append(reason)
    line.type(b"old1\nold2\n")
    run_until(loop, lambda: line.got)
    os.close(line.master)  # unplugged: the next write fails
    line.master = -1
    line.bridge.show(["bob: hello"])
    assert closed and not line.bridge.is_open
    line.bridge.resume()
    assert line.got == [b"old1", b"old2"]
