"""The one logging setup: journald priorities under systemd, readable lines otherwise.

- When $JOURNAL_STREAM names our stderr (device:inode), each line starts with
  ``<N>`` (the syslog priority journald files it under) and carries no
  timestamp of ours: the journal records one.
- Otherwise lines read ``2026-11-25 12:00:00 INFO message``.

Chat lines carry structured fields (PICCHAT_SENDER, PICCHAT_SEQ,
PICCHAT_ORIGIN); under systemd they go to journald's native socket so that
``journalctl PICCHAT_SENDER=alice`` finds them, falling back to stderr.

Writing never blocks the loop: output goes through a bounded buffer to a
non-blocking file description. While stderr is not writable (a stalled
journal, a paused terminal, a full pipe) lines wait in the buffer; beyond
``log_buffer`` bytes they are dropped and counted, and the count is logged
once output flows again.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import time
from collections.abc import Callable, Mapping

NOTICE = 25  # the hub's level for what clients did (journald priority 5)
logging.addLevelName(NOTICE, "NOTICE")
SYSLOG_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    NOTICE: 5,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


def journal_stream(fd: int = 2, env: Mapping[str, str] | None = None) -> bool:
    """True if ``fd`` is the stream systemd connected to the journal."""
    env = os.environ if env is None else env
    value = env.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    if not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


class StderrWriter:
    """Bounded, non-blocking output to stderr (or any fd), counting what it drops."""

    def __init__(self, fd: int = 2, limit: int = 65536) -> None:
        self.limit = limit
        self.dropped = 0
        self.on_blocked: Callable[[], None] | None = None  # ask the loop for POLLOUT
        self._buf = bytearray()
        self._sock: socket.socket | None = None
        self.fd = fd
        self._own_fd = False
        try:
            mode = os.fstat(fd).st_mode
        except OSError:
            self.fd = -1  # no stderr at all: drop everything quietly
            return
        if stat.S_ISSOCK(mode):
            # journald's stream: send with MSG_DONTWAIT, without touching the
            # O_NONBLOCK flag that other holders of this socket share.
            self._sock = socket.socket(fileno=os.dup(fd))
            self.fd = self._sock.fileno()
        elif stat.S_ISFIFO(mode) or stat.S_ISCHR(mode):
            # A new open file description of our own, so O_NONBLOCK does not
            # leak to the shell that shares the terminal or pipe with us.
            try:
                self.fd = os.open(
                    f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
                )
                self._own_fd = True
            except OSError:
                pass  # keep the blocking fd: better slow than silent
        # Regular files: writes do not wait for a reader; use the fd as it is.

    @property
    def pending(self) -> int:
        return len(self._buf)

    def write(self, data: bytes) -> None:
        if self.fd < 0:
            return
        if len(self._buf) + len(data) > self.limit:
            self.dropped += 1
            return
        self._buf += data
        self.flush()

    def flush(self) -> None:
        """Write what is buffered; returns early (and asks for POLLOUT) if stderr is full."""
        while self._buf:
            try:
                if self._sock is not None:
                    n = self._sock.send(self._buf, socket.MSG_DONTWAIT)
                else:
                    n = os.write(self.fd, self._buf)
            except BlockingIOError:
                if self.on_blocked is not None:
                    self.on_blocked()
                return
            except InterruptedError:
                continue
            except OSError:  # the reader is gone (EPIPE...): nothing to do
                self._buf.clear()
                return
            del self._buf[:n]
            if not self._buf and self.dropped:
                dropped, self.dropped = self.dropped, 0
                logging.getLogger("picchat.logs").warning(
                    "%d log lines were dropped because stderr was not writable", dropped
                )

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
        elif self._own_fd:
            os.close(self.fd)
        self.fd = -1


JOURNAL_SOCKET = "/run/systemd/journal/socket"


def journal_datagram(fields: Mapping[str, str]) -> bytes:
    """journald's native protocol: ``KEY=value`` lines; a value with a newline
    is sent as KEY, newline, its length (64-bit little-endian), the value."""
    out = bytearray()
    for key, value in fields.items():
        data = value.encode("utf-8", "replace")
        if b"\n" in data:
            out += key.encode() + b"\n" + len(data).to_bytes(8, "little") + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out)


class JournalNative:
    """Sends records with structured fields straight to journald."""

    def __init__(self, path: str = JOURNAL_SOCKET, identifier: str = "picchat-server") -> None:
        self.path = path
        self.identifier = identifier
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.setblocking(False)

    def send(self, record: logging.LogRecord, message: str, fields: Mapping[str, str]) -> bool:
        """False if the journal did not take it (the caller falls back to stderr)."""
        data = {
            "MESSAGE": message,
            "PRIORITY": str(SYSLOG_PRIORITY.get(record.levelno, 6)),
            "SYSLOG_IDENTIFIER": self.identifier,
        }
        data.update({f"PICCHAT_{k}": v for k, v in fields.items()})
        try:
            self.sock.sendto(journal_datagram(data), self.path)
        except OSError:
            return False
        return True

    def close(self) -> None:
        self.sock.close()


class _Formatter(logging.Formatter):
    def __init__(self, journal: bool) -> None:
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        if self.journal:
            prefix = f"<{SYSLOG_PRIORITY.get(record.levelno, 6)}>"
            return "\n".join(prefix + line for line in text.split("\n"))
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.created))
        return f"{stamp} {record.levelname} {text}"


class WriterHandler(logging.Handler):
    def __init__(
        self, writer: StderrWriter, journal: bool, native: JournalNative | None = None
    ) -> None:
        super().__init__()
        self.writer = writer
        self.native = native  # for records with journal_fields (chat lines)
        self.divert: Callable[[str], None] | None = None
        self.setFormatter(_Formatter(journal))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields = getattr(record, "journal_fields", None)
            if self.native is not None and fields is not None:
                if self.native.send(record, record.getMessage(), fields):
                    return
            if self.divert is not None:
                if record.name != "picchat.chat":  # the console shows chat as chat
                    self.divert(self.format(record))
                return
            line = self.format(record) + "\n"
            self.writer.write(line.encode("utf-8", "replace"))
        except Exception:  # logging must never take the daemon down
            self.handleError(record)


_handler: WriterHandler | None = None


def setup(level: str = "info", buffer: int = 65536, fd: int = 2) -> StderrWriter:
    """Route the ``picchat`` loggers to stderr; returns the writer for the loop."""
    global _handler
    root = logging.getLogger("picchat")
    if _handler is not None:
        root.removeHandler(_handler)
        _handler.writer.close()
        if _handler.native is not None:
            _handler.native.close()
    writer = StderrWriter(fd, buffer)
    journal = journal_stream(fd)
    native = JournalNative() if journal and os.path.exists(JOURNAL_SOCKET) else None
    _handler = WriterHandler(writer, journal, native)
    root.addHandler(_handler)
    root.propagate = False
    set_level(level)
    return writer


def divert(show: Callable[[str], None] | None) -> None:
    """While the server's console owns the terminal, log lines go through it
    (above the prompt) instead of straight to stderr; None ends that."""
    if _handler is not None:
        _handler.divert = show


def set_level(level: str) -> None:
    logging.getLogger("picchat").setLevel(level.upper())
