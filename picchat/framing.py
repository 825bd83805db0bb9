"""Line framing: a byte stream in, complete lines out, with a hard maximum.

Invariants:
- A line ends at LF; one CR right before the LF is part of the line ending
  (CRLF from telnet and serial terminals, LF from nc and scripts).
- The buffer never holds more than ``max_line`` bytes: a line that grows past
  the bound is reported once as ``TOO_LONG`` and its bytes are thrown away up
  to the next LF. Without this bound a peer that never sends LF could make us
  hold any amount of memory (a trivial DoS).
- The search for LF starts where the previous search stopped, so a long line
  arriving one byte at a time costs O(n), not O(n^2).
- Feeding the same bytes in any chunking gives the same items.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing is not imported at run time: start-up time
if TYPE_CHECKING:
    from typing import Final


class _TooLong:
    """Marker item: a line exceeded the maximum and was discarded."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "TOO_LONG"


TOO_LONG: Final = _TooLong()

Item = bytes | _TooLong


class LineReader:
    """Splits a byte stream into lines of at most ``max_line`` bytes."""

    __slots__ = ("_buf", "_discarding", "_scanned", "backlog", "max_line")

    def __init__(self, max_line: int) -> None:
        if max_line < 1:
            raise ValueError("max_line must be at least 1")
        self.max_line = max_line
        self._buf = bytearray()
        self._scanned = 0  # bytes of _buf already known to hold no LF
        self._discarding = False  # inside an overlong line, waiting for its LF
        self.backlog = False  # the last feed() stopped early: complete lines wait

    @property
    def pending(self) -> int:
        """Bytes held for a line that has not ended yet."""
        return len(self._buf)

    def feed(self, data: bytes, limit: int | None = None, budget: int | None = None) -> list[Item]:
        """Add received bytes; return the complete lines (without line ending).

        With ``limit`` (lines) or ``budget`` (bytes of lines), stop early and
        keep the rest: ``backlog`` is then True, and ``feed(b"", ...)`` goes on
        where this call stopped. The server uses it so that one peer's burst
        is handled a slice per loop turn, between which output is flushed.
        """
        items: list[Item] = []
        self.backlog = False
        if self._discarding:
            nl = data.find(b"\n")
            if nl < 0:
                return items
            self._discarding = False
            data = data[nl + 1 :]
        buf = self._buf
        buf += data
        start = 0
        scan = self._scanned
        while True:
            if (limit is not None and len(items) >= limit) or (
                budget is not None and start >= budget
            ):
                self.backlog = buf.find(b"\n", scan) >= 0
                break
            nl = buf.find(b"\n", scan)
            if nl < 0:
                break
            end = nl
            if end > start and buf[end - 1] == 0x0D:
                end -= 1
            # The bound counts the line without its ending: a line of exactly
            # max_line bytes plus CRLF is accepted.
            if end - start > self.max_line:
                items.append(TOO_LONG)
            else:
                items.append(bytes(buf[start:end]))
            start = scan = nl + 1
        if start:
            del buf[:start]
            scan -= start
        if self.backlog:
            self._scanned = 0  # the rest starts with a complete line: scan it next time
        # Allow one extra byte for a CR that may turn out to be part of CRLF.
        elif len(buf) > self.max_line + 1:
            items.append(TOO_LONG)
            buf.clear()
            self._discarding = True
            self._scanned = 0
        else:
            self._scanned = len(buf)
        return items

    def take_partial(self) -> Item:
        """At end of stream: return (and forget) an unterminated last line.

        ``TOO_LONG`` if it is longer than ``max_line``: the buffer may hold
        ``max_line + 1`` bytes while the last one could still be a CR of CRLF.
        """
        if self._discarding:
            self._discarding = False
            return b""
        rest = bytes(self._buf)
        if rest.endswith(b"\r"):
            rest = rest[:-1]
        self._buf.clear()
        self._scanned = 0
        if len(rest) > self.max_line:
            return TOO_LONG
        return rest
