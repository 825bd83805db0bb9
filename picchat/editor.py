"""A line editor for raw terminals, sans I/O: keystroke bytes in, screen bytes out.

Used wherever picchat owns a terminal in raw mode: the interactive client's
TTY, the server's own console, a person on a serial line. Nothing echoes in
raw mode and Enter sends CR, so the editor echoes, edits, and, when a message
arrives while a line is half typed, prints the message above and redraws the
prompt and the half-typed line intact.

Screen model (the invariant every method keeps): the input area starts at
column 0 of some row and holds ``prompt + buffer``, wrapped at ``width``
columns as the terminal wraps it; the cursor sits right after the last
character. When the text ends exactly at the right margin we move the cursor
to the start of the next row ourselves, so we always know the cursor's row
and a redraw knows how many rows to go up, whatever the terminal's
pending-wrap rules are.

Keys: printable UTF-8 (wide characters take two columns), Backspace (DEL or
BS, removes a whole character), Ctrl-U (clear the line), Ctrl-W (delete a
word), Ctrl-L (redraw), Ctrl-C (drop the line; on an empty line: quit),
Ctrl-D (quit on an empty line), Enter (CR, LF or CRLF), Tab (a space).
Escape sequences from the terminal (arrow keys, function keys) are ignored.
"""

from __future__ import annotations

import codecs
import unicodedata

from .events import Value

CRLF = "\r\n"
_CLEAR_TO_END = "\x1b[J"


class Line(Value):
    """The user pressed Enter on this text."""

    __slots__ = __match_args__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


class QuitRequest(Value):
    """Ctrl-D (or Ctrl-C) on an empty line."""

    __slots__ = __match_args__ = ("key",)

    def __init__(self, key: str) -> None:
        self.key = key  # "ctrl-d" or "ctrl-c"


EditorEvent = Line | QuitRequest


def char_width(ch: str) -> int:
    if unicodedata.combining(ch) or ch in "\u200b\u200c\u200d\ufeff":
        return 0
    if unicodedata.east_asian_width(ch) in ("W", "F"):
        return 2
    return 1


def text_width(text: str) -> int:
    return sum(char_width(c) for c in text)


class Editor:
    """One prompt and its half-typed line on a terminal ``width`` columns wide."""

    # States of the escape-sequence skipper.
    _TEXT, _ESC, _CSI, _SS3 = range(4)

    def __init__(self, prompt: str = "", width: int = 80, max_bytes: int = 4096) -> None:
        self.prompt = prompt
        self.width = max(1, width)
        self.max_bytes = max_bytes
        self.buffer = ""
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._after_cr = False
        self._esc = self._TEXT
        self._shown = False  # the input area is on screen

    # ---- queries --------------------------------------------------------

    def _layout(self) -> tuple[int, int]:
        """Row and column after writing prompt + buffer from column 0, as the
        terminal wraps it (a wide character that does not fit goes whole to
        the next row)."""
        row = col = 0
        width = self.width
        for ch in self.prompt + self.buffer:
            w = char_width(ch)
            if col + w > width:
                row += 1
                col = 0
            col += w
        return row, col

    def _cursor_row(self) -> int:
        row, col = self._layout()
        return row + 1 if col == self.width else row  # see _wrap_fix

    def _wrap_fix(self) -> str:
        # Text that ends exactly at the right margin leaves the cursor in the
        # terminal's pending-wrap state; move to the next row explicitly.
        return CRLF if self._layout()[1] == self.width else ""

    def _erase(self) -> str:
        """Go to the start of the input area and clear it and below."""
        if not self._shown:
            return ""
        row = self._cursor_row()
        up = f"\x1b[{row}A" if row else ""
        return "\r" + up + _CLEAR_TO_END

    def _draw(self) -> str:
        self._shown = True
        return self.prompt + self.buffer + self._wrap_fix()

    def start(self) -> bytes:
        """Show the prompt (at the start of a fresh row)."""
        return (self._erase() + self._draw()).encode()

    def redraw(self) -> bytes:
        return self.start()

    def show(self, text: str) -> bytes:
        """Print ``text`` (one or more lines) above the input area, then redraw it."""
        out = self._erase()
        out += text.replace("\r\n", "\n").replace("\n", CRLF) + CRLF
        self._shown = False
        return (out + self._draw()).encode()

    def hide(self) -> bytes:
        """Remove the input area from the screen (before printing elsewhere or exiting)."""
        out = self._erase()
        self._shown = False
        return out.encode()

    def set_prompt(self, prompt: str) -> bytes:
        out = self._erase()
        self.prompt = prompt
        return (out + self._draw()).encode()

    def resize(self, width: int) -> bytes:
        # The terminal has re-wrapped the old rows its own way: our row count
        # is wrong now, so start a fresh input area below instead of erasing.
        self.width = max(1, width)
        self._shown = False
        return (CRLF + self._draw()).encode()

    # ---- keystrokes ------------------------------------------------------------

    def feed(self, data: bytes) -> tuple[bytes, list[EditorEvent]]:
        """Process keystrokes; return what to write to the terminal and what happened."""
        out: list[str] = []
        events: list[EditorEvent] = []
        for ch in self._decoder.decode(data):
            if self._esc != self._TEXT:
                self._skip_escape(ch)
                continue
            if self._after_cr:
                self._after_cr = False
                if ch == "\n":  # the LF of a CRLF: Enter was handled at the CR
                    continue
            self._key(ch, out, events)
        return "".join(out).encode(), events

    def _skip_escape(self, ch: str) -> None:
        if self._esc == self._ESC:
            self._esc = {"[": self._CSI, "O": self._SS3}.get(ch, self._TEXT)
        elif self._esc == self._CSI:
            if "\x40" <= ch <= "\x7e":  # the final byte of a CSI sequence
                self._esc = self._TEXT
        else:  # SS3: one more character
            self._esc = self._TEXT

    def _key(self, ch: str, out: list[str], events: list[EditorEvent]) -> None:
        if ch in "\r\n":
            self._after_cr = ch == "\r"
            text = self.buffer
            # At the margin the wrap fix has put the cursor on a fresh row already.
            out.append("" if self._wrap_fix() else CRLF)
            self.buffer = ""
            self._shown = False
            events.append(Line(text))
            out.append(self._draw())
        elif ch in "\x7f\x08":  # Backspace: DEL from most terminals, BS from some
            if self.buffer:
                out.append(self._erase())
                # A combining mark goes together with its base character.
                end = len(self.buffer) - 1
                while end > 0 and unicodedata.combining(self.buffer[end]):
                    end -= 1
                self.buffer = self.buffer[:end]
                out.append(self._draw())
        elif ch == "\x15":  # Ctrl-U
            out.append(self._erase())
            self.buffer = ""
            out.append(self._draw())
        elif ch == "\x17":  # Ctrl-W: the word before the cursor, and blanks after it
            out.append(self._erase())
            self.buffer = self.buffer.rstrip(" ")
            cut = self.buffer.rfind(" ")
            self.buffer = self.buffer[: cut + 1]
            out.append(self._draw())
        elif ch == "\x0c":  # Ctrl-L: clear the screen, redraw
            out.append("\x1b[H\x1b[2J")
            self._shown = False
            out.append(self._draw())
        elif ch == "\x03":  # Ctrl-C
            if not self.buffer:
                events.append(QuitRequest("ctrl-c"))
                return
            self.buffer = ""
            out.append("^C" + CRLF)
            self._shown = False
            out.append(self._draw())
        elif ch == "\x04":  # Ctrl-D
            if not self.buffer:
                events.append(QuitRequest("ctrl-d"))
        elif ch == "\x1b":
            self._esc = self._ESC
        elif ch == "\t":
            self._insert(" ", out)
        elif ch.isprintable():
            self._insert(ch, out)
        # Any other control character is ignored.

    def _insert(self, ch: str, out: list[str]) -> None:
        if len((self.buffer + ch).encode()) > self.max_bytes:
            out.append("\a")  # the line is as long as the server accepts
            return
        if not self._shown:
            out.append(self._draw())
        self.buffer += ch
        out.append(ch)
        # A zero-width character (a combining mark) does not move the cursor:
        # after a base character at the margin the wrap fix was written already.
        if char_width(ch):
            out.append(self._wrap_fix())
