"""A named pipe as a way in: every line written to it is broadcast.

``echo "temp high" > /run/picchat/in.fifo`` from any script or cron job.

- The FIFO is created if missing, mode 0620 (owner and group may write, never
  the world); an existing file that is not a FIFO is refused.
- We hold a write end open ourselves, so the read end never sees EOF when the
  last writer goes: without it, epoll would report the FIFO readable (EOF)
  on every turn and the loop would spin.
- Lines are framed by the same LineReader as sockets: a writer that never
  sends a newline fills at most ``max_line`` bytes and blocks nothing.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path

from ..framing import TOO_LONG, LineReader
from ..loop import Loop
from .listeners import StartupError

log = logging.getLogger(__name__)

FIFO_MODE = 0o620


class FifoReader:
    def __init__(
        self, path: Path, loop: Loop, on_line: Callable[[bytes], None], max_line: int
    ) -> None:
        self.path = path
        self._loop = loop
        self._on_line = on_line
        self._reader = LineReader(max_line)
        self._rfd = self._wfd = -1
        self._open()

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
        try:
            self._rfd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            self._wfd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            self.close()
            raise StartupError(f"cannot open the FIFO {path}: {exc.strerror}") from None
        self._loop.add_reader(self._rfd, self._readable)

    def _readable(self) -> None:
        try:
            data = os.read(self._rfd, 65536)
        except BlockingIOError:
            return
        if not data:  # cannot happen while we hold a write end; never spin on it
            log.error("FIFO %s reported end of file; no longer reading it", self.path)
            self._loop.forget(self._rfd)
            return
        for item in self._reader.feed(data):
            if item is TOO_LONG:
                log.warning(
                    "A line written to %s was longer than %d bytes (max-line) and was discarded",
                    self.path,
                    self._reader.max_line,
                )
            else:
                self._on_line(item)

    def close(self) -> None:
        for fd in (self._rfd, self._wfd):
            if fd >= 0:
                self._loop.forget(fd)
                os.close(fd)
        self._rfd = self._wfd = -1
