"""A named pipe as a way in: every line written to it is broadcast.

``echo "temp high" > /run/picchat/in.fifo`` from any script or cron job.

- The FIFO is created if missing, mode 0620 (owner and group may write, never
  the world); an existing file that is not a FIFO, or a world-writable one, is
  refused.
- When the last writer closes, the read end reports end of file, and would
  keep reporting it on every loop turn (a busy loop). So at end of file we
  take the unterminated last line, if any, as a line (``echo -n`` works), and
  open the read end anew: Linux does not report a fresh read end readable
  until a writer has come (and gone) again.
- ``pause``/``resume`` are the rate limit's back-pressure: while paused the
  FIFO is not read, so once its pipe buffer (64 KiB) is full, writers wait
  (or get EAGAIN if they write non-blocking). Lines of a read that came
  after the pause are held, in order, and handed on at ``resume``.
- Lines are framed by the same LineReader as sockets: a writer that never
  sends a newline fills at most ``max_line`` bytes and blocks nothing. Lines
  of several writers writing at once can interleave: a FIFO cannot tell them
  apart (writes up to PIPE_BUF, 4096 bytes, are atomic).
"""

from __future__ import annotations

import os
import stat
from collections import deque
from collections.abc import Callable
from pathlib import Path

from .. import logs
from ..framing import TOO_LONG, LineReader
from ..loop import Loop
from .listeners import StartupError

log = logs.get(__name__)

FIFO_MODE = 0o620


class FifoReader:
    def __init__(
        self,
        path: Path,
        loop: Loop,
        on_line: Callable[[bytes], None],
        max_line: int,
        fd: int | None = None,
    ) -> None:
        """Open (or create) the FIFO at ``path``; or read ``fd``, a FIFO that
        systemd opened for us (ListenFIFO=)."""
        self.path = path
        self._loop = loop
        self._on_line = on_line
        self._reader = LineReader(max_line)
        self._rfd = -1
        self._paused = False
        self._held: deque[bytes] = deque()  # lines read before a pause (one read's worth)
        if fd is None:
            self._open()
        else:
            os.set_blocking(fd, False)
            self._rfd = fd
            self._loop.add_reader(fd, self._readable)

    def _open(self) -> None:
        path = self.path
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            try:
                os.mkfifo(path, FIFO_MODE)
                os.chmod(path, FIFO_MODE)  # mkfifo applies the umask
            except OSError as exc:
                raise StartupError(f"cannot create the FIFO {path}: {exc.strerror}") from None
        else:
            if not stat.S_ISFIFO(st.st_mode):
                raise StartupError(f"{path} exists and is not a FIFO; remove it or choose --fifo")
            if st.st_mode & 0o002:
                raise StartupError(
                    f"{path} is world-writable: anyone could post; chmod o-w it or remove it"
                )
        self._open_read_end()

    def _open_read_end(self, again: int = -1) -> None:
        # Reopening: through /proc/self/fd of the old read end, which works
        # for a FIFO systemd opened too (its path may not be ours to know).
        path = f"/proc/self/fd/{again}" if again >= 0 else self.path
        try:
            self._rfd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            try:
                self._rfd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as exc:
                raise StartupError(f"cannot open the FIFO {self.path}: {exc.strerror}") from None
        if not self._paused:
            self._loop.add_reader(self._rfd, self._readable)

    def _readable(self) -> None:
        try:
            data = os.read(self._rfd, 65536)
        except BlockingIOError:
            return
        if not data:  # the last writer closed: finish its line, start afresh
            last = self._reader.take_partial()
            self._lines([last] if last else [])
            # Open the new read end before closing the old one: with no reader
            # at all, a writer would get ENXIO (O_NONBLOCK) or block.
            old = self._rfd
            self._loop.forget(old)
            try:
                self._open_read_end(again=old)
            except StartupError as exc:
                self._rfd = -1
                log.error("%s; no longer reading the FIFO", exc)
            os.close(old)
            return
        self._lines(self._reader.feed(data))

    def pause(self) -> None:
        """Read nothing until ``resume`` (the rate limit)."""
        if not self._paused:
            self._paused = True
            if self._rfd >= 0:
                self._loop.remove_reader(self._rfd)

    def resume(self) -> None:
        self._paused = False
        while self._held and not self._paused:
            self._on_line(self._held.popleft())
        if not self._paused and self._rfd >= 0:
            self._loop.add_reader(self._rfd, self._readable)

    def _lines(self, items: list) -> None:
        for item in items:
            if self._paused and item is not TOO_LONG:
                self._held.append(item)
            elif item is TOO_LONG:
                log.warning(
                    "A line written to %s was longer than %d bytes (max-line) and was discarded",
                    self.path,
                    self._reader.max_line,
                )
            else:
                self._on_line(item)

    def close(self) -> None:
        if self._rfd >= 0:
            self._loop.forget(self._rfd)
            os.close(self._rfd)
        self._rfd = -1
