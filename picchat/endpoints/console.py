"""The server's own terminal as a chat participant named ``Server``.

When picchat-server runs in the foreground on a terminal (``make run``), the
person at that terminal chats like everyone else, through the same line
editor as picchat-client: ``You (Server): `` prompt, messages and log lines
printed above the half-typed line. Under systemd (no terminal) it is off.

The terminal is in raw mode while the console runs and is restored on every
way out (``close``, atexit). Ctrl-C or Ctrl-D on an empty line stops the
server, as Ctrl-C does without a console.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

from ..editor import Editor, Line, QuitRequest
from ..loop import Loop
from ..terminal import RawTerminal, width, write_all


def wanted(setting: str, fd: int = 0, env: dict[str, str] | None = None) -> bool:
    """Should the console run? 'auto': stdin is a terminal and systemd is not our parent."""
    if setting == "off":
        return False
    if setting == "on":
        return True
    env = dict(os.environ) if env is None else env
    under_systemd = "INVOCATION_ID" in env or "JOURNAL_STREAM" in env
    return os.isatty(fd) and not under_systemd


class Console:
    def __init__(
        self,
        loop: Loop,
        name: str,
        on_line: Callable[[str], None],
        on_quit: Callable[[], None],
        fd_in: int = 0,
        fd_out: int = 1,
    ) -> None:
        self._loop = loop
        self._on_line = on_line
        self._on_quit = on_quit
        self._in = fd_in
        self._out = fd_out
        self._raw = RawTerminal(fd_in)
        self._raw.__enter__()
        self.editor = Editor(f"You ({name}): ", width(fd_out))
        loop.add_reader(fd_in, self._readable)
        loop.add_signal_handler(signal.SIGWINCH, self._resized)
        self._write(self.editor.start())

    def _write(self, data: bytes) -> None:
        write_all(self._out, data)  # if the terminal went away, keep serving the others

    def show(self, text: str) -> None:
        """Print a line above the prompt (chat, notices, log lines)."""
        self._write(self.editor.show(text))

    def deliver(self, data: bytes) -> None:
        """Plain-format output of the hub for the console: one line each."""
        # Split at LF only: splitlines() would also split at U+2028 inside a
        # message and let its second half pass for a line of its own.
        for line in data.decode("utf-8", "replace").split("\n")[:-1]:
            self.show(line)

    def set_name(self, name: str) -> None:
        self._write(self.editor.set_prompt(f"You ({name}): "))

    def _readable(self) -> None:
        try:
            data = os.read(self._in, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # the terminal hung up: stop listening, keep serving
            self._loop.forget(self._in)
            return
        echo, events = self.editor.feed(data)
        self._write(echo)
        for ev in events:
            if isinstance(ev, Line):
                self._on_line(ev.text)
            elif isinstance(ev, QuitRequest):
                self._on_quit()

    def _resized(self) -> None:
        self._write(self.editor.resize(width(self._out)))

    def close(self) -> None:
        self._loop.forget(self._in)
        self._write(self.editor.hide())
        self._raw.restore()
