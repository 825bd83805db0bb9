"""Raw mode for a terminal, restored on every way out.

In raw mode nothing echoes, keys arrive one by one, Ctrl-C and Ctrl-D are
plain bytes (the editor decides what they mean) and output is not post-
processed (the editor writes CRLF itself). The saved settings are put back
by ``restore()``, which the context manager, an atexit hook and the callers'
signal handlers all call; calling it twice is harmless.
"""

from __future__ import annotations

import atexit
import os
import termios
import tty
from types import TracebackType


class RawTerminal:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._saved: list | None = None

    def __enter__(self) -> RawTerminal:
        self._saved = termios.tcgetattr(self.fd)
        atexit.register(self.restore)
        tty.setraw(self.fd, termios.TCSANOW)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.restore()

    def restore(self) -> None:
        if self._saved is not None:
            saved, self._saved = self._saved, None
            try:
                termios.tcsetattr(self.fd, termios.TCSADRAIN, saved)
            except termios.error:
                pass  # the terminal is gone (hung up): nothing to restore
            atexit.unregister(self.restore)


def width(fd: int, default: int = 80) -> int:
    try:
        return os.get_terminal_size(fd).columns or default
    except OSError:
        return default


def write_all(fd: int, data: bytes) -> bool:
    """Write all of ``data`` to a terminal; False if the terminal is gone."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            continue
        except OSError:
            return False
    return True
