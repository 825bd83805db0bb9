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

A chat line is normally logged after it is delivered: while the server holds
chat (``hold_chat``), each waits, at most ``HELD_CHAT_LINES`` of them, until
the turn's output has gone out (``release_chat``). Writing it first would put
a write to stderr, or a datagram to journald that wakes journald, between
reading a line and sending it on. Any other record releases the waiting chat
lines first (then they are logged before they are sent), so the log keeps its
order.
"""

from __future__ import annotations

import os
import socket
import stat
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

# Levels, as numbers (higher: more important) and as journald priorities.
DEBUG, INFO, NOTICE, WARNING, ERROR, CRITICAL = 10, 20, 25, 30, 40, 50
LEVELS = {
    "debug": DEBUG,
    "info": INFO,
    "notice": NOTICE,
    "warning": WARNING,
    "error": ERROR,
    "critical": CRITICAL,
}
LEVEL_NAMES = {number: name.upper() for name, number in LEVELS.items()}
SYSLOG_PRIORITY = {CRITICAL: 2, ERROR: 3, WARNING: 4, NOTICE: 5, INFO: 6, DEBUG: 7}
HELD_CHAT_LINES = 256  # chat lines that may wait for release_chat(); more: logged at once


class Record:
    """One logged line: what a handler (or a test's capture) gets."""

    __slots__ = ("name", "levelno", "message", "fields", "created", "exc_text")

    def __init__(
        self,
        name: str,
        levelno: int,
        message: str,
        fields: Mapping[str, str] | None = None,
        exc_text: str = "",
    ) -> None:
        self.name = name
        self.levelno = levelno
        self.message = message
        self.fields = fields  # journal fields (chat lines): PICCHAT_<KEY>=value
        self.created = time.time()
        self.exc_text = exc_text

    @property
    def levelname(self) -> str:
        return LEVEL_NAMES.get(self.levelno, str(self.levelno))

    def getMessage(self) -> str:
        return self.message


class Logger:
    """``log.info("joined: %s", name)``: formatted only if the level is shown.

    picchat's own small logger instead of the standard library's ``logging``:
    importing that costs the daemon about 1 MB and 14 ms at start, and each
    record walks the stack to find its caller, which the hot path (a log line
    per chat message) cannot afford.
    """

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def isEnabledFor(self, level: int) -> bool:
        return level >= _level

    def log(self, level: int, msg: str, *args: object, exc_info: bool = False) -> None:
        if level >= _level:
            _emit(self.name, level, msg % args if args else msg, None, exc_info)

    def debug(self, msg: str, *args: object) -> None:
        if _level <= DEBUG:
            _emit(self.name, DEBUG, msg % args if args else msg)

    def info(self, msg: str, *args: object) -> None:
        if _level <= INFO:
            _emit(self.name, INFO, msg % args if args else msg)

    def notice(self, msg: str, *args: object) -> None:
        if _level <= NOTICE:
            _emit(self.name, NOTICE, msg % args if args else msg)

    def warning(self, msg: str, *args: object, exc_info: bool = False) -> None:
        if _level <= WARNING:
            _emit(self.name, WARNING, msg % args if args else msg, None, exc_info)

    def error(self, msg: str, *args: object, exc_info: bool = False) -> None:
        _emit(self.name, ERROR, msg % args if args else msg, None, exc_info)

    def exception(self, msg: str, *args: object) -> None:
        _emit(self.name, ERROR, msg % args if args else msg, None, True)

    def critical(self, msg: str, *args: object, exc_info: bool = False) -> None:
        _emit(self.name, CRITICAL, msg % args if args else msg, None, exc_info)


_level = INFO
_loggers: dict[str, Logger] = {}
_captures: list[list[Record]] = []


def get(name: str) -> Logger:
    """The logger for a module: ``log = logs.get(__name__)``."""
    logger = _loggers.get(name)
    if logger is None:
        logger = _loggers[name] = Logger(name)
    return logger


def chat(sender: str, text: str, fields: Mapping[str, str]) -> None:
    """A chat line, at info level, with its journal fields (a line per
    message: the short way when nothing captures records)."""
    if _level > INFO:
        return
    if _handler is None or _captures:
        _emit("picchat.chat", INFO, f"{sender}: {text}", fields)
    else:
        _handler.chat(f"{sender}: {text}", fields)


def _emit(
    name: str, level: int, message: str, fields: Mapping[str, str] | None = None, exc=False
) -> None:
    exc_text = _exception_text() if exc else ""
    record = Record(name, level, message, fields, exc_text)
    for captured in _captures:
        captured.append(record)
    if _handler is not None:
        _handler.emit(record)
    elif level >= WARNING and not _captures:  # before setup(): like a plain program
        print(message + ("\n" + exc_text if exc_text else ""), file=sys.stderr)


def _exception_text() -> str:
    exc = sys.exception()
    if exc is None:
        return ""
    try:
        import traceback  # only when there is a traceback to show

        return "".join(traceback.format_exception(exc)).rstrip("\n")
    except Exception:  # out of fds or memory: the gist, at least
        return f"{type(exc).__name__}: {exc}"


@contextmanager
def capture(level: str | int = DEBUG) -> Iterator[list[Record]]:
    """Every record logged meanwhile (for tests), with the level lowered to
    ``level`` if it was higher."""
    global _level
    records: list[Record] = []
    saved = _level
    _level = min(_level, LEVELS[level] if isinstance(level, str) else level)
    _captures.append(records)
    try:
        yield records
    finally:
        _captures.remove(records)
        _level = saved


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
        # Set by the loop's owner: lines are then written once per loop turn,
        # not each at once (one write for a turn's chat lines).
        self.on_pending: Callable[[], None] | None = None
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
        was_empty = not self._buf
        self._buf += data
        if self.on_pending is None:
            self.flush()
        elif was_empty:
            self.on_pending()

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
                get("picchat.logs").warning(
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

    def send(self, level: int, message: str, fields: Mapping[str, str]) -> bool:
        """False if the journal did not take it (the caller falls back to stderr)."""
        data = {
            "MESSAGE": message,
            "PRIORITY": str(SYSLOG_PRIORITY.get(level, 6)),
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


class WriterHandler:
    """Formats records for journald (``<N>`` priority prefixes) or a reader
    (timestamp and level) and hands them to the writer; chat lines with
    fields go to journald's native socket when there is one."""

    def __init__(
        self, writer: StderrWriter, journal: bool, native: JournalNative | None = None
    ) -> None:
        self.writer = writer
        self.journal = journal
        self.native = native  # for records with fields (chat lines)
        self.divert: Callable[[str], None] | None = None
        self._second = -1  # the timestamp of the current second, made once
        self._stamp = ""
        self.on_held: Callable[[], None] | None = None  # set while chat is held
        self.held: list[tuple[str, Mapping[str, str]]] = []

    def format(self, record: Record) -> str:
        text = record.message
        if record.exc_text:
            text += "\n" + record.exc_text
        if self.journal:
            prefix = f"<{SYSLOG_PRIORITY.get(record.levelno, 6)}>"
            if "\n" not in text:
                return prefix + text
            return "\n".join(prefix + line for line in text.split("\n"))
        return f"{self._stamp_of(record.created)} {record.levelname} {text}"

    def _stamp_of(self, created: float) -> str:
        second = int(created)
        if second != self._second:  # made once a second
            self._second = second
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        return self._stamp

    def emit(self, record: Record) -> None:
        if self.held:
            self.release()  # the chat before it comes first
        try:
            if self.native is not None and record.fields is not None:
                if self.native.send(record.levelno, record.message, record.fields):
                    return
            if self.divert is not None:
                if record.name != "picchat.chat":  # the console shows chat as chat
                    self.divert(self.format(record))
                return
            self.writer.write((self.format(record) + "\n").encode("utf-8", "replace"))
        except Exception:  # logging must never take the daemon down
            pass

    def chat(self, message: str, fields: Mapping[str, str]) -> None:
        """``emit`` for a chat line, without making a Record; held while ``on_held`` is set."""
        if self.on_held is None:
            self._chat(message, fields)
            return
        if not self.held:
            self.on_held()
        self.held.append((message, fields))
        if len(self.held) >= HELD_CHAT_LINES:
            self.release()

    def release(self) -> None:
        """Log the held chat lines."""
        held, self.held = self.held, []
        for message, fields in held:
            self._chat(message, fields)

    def _chat(self, message: str, fields: Mapping[str, str]) -> None:
        try:
            if self.native is not None and self.native.send(INFO, message, fields):
                return
            if self.divert is not None:
                return  # the console shows chat as chat
            if self.journal:
                line = "<6>" + message
            else:
                line = f"{self._stamp_of(time.time())} INFO {message}"
            self.writer.write((line + "\n").encode("utf-8", "replace"))
        except Exception:  # logging must never take the daemon down
            pass


_handler: WriterHandler | None = None


def setup(level: str = "info", buffer: int = 65536, fd: int = 2) -> StderrWriter:
    """Route picchat's log to stderr (or ``fd``); returns the writer for the loop."""
    global _handler
    if _handler is not None:
        _handler.writer.close()
        if _handler.native is not None:
            _handler.native.close()
    writer = StderrWriter(fd, buffer)
    journal = journal_stream(fd)
    native = JournalNative() if journal and os.path.exists(JOURNAL_SOCKET) else None
    _handler = WriterHandler(writer, journal, native)
    set_level(level)
    return writer


def hold_chat(on_held: Callable[[], None]) -> None:
    """Hold chat lines until ``release_chat``. ``on_held`` is called when the
    first one begins to wait: the holder makes sure a release follows."""
    if _handler is not None:
        _handler.on_held = on_held


def stop_holding_chat(on_held: Callable[[], None]) -> None:
    """Log the held chat lines and hold no more, if ``on_held`` is the holder's
    (another holder, a server started later in this process, keeps holding)."""
    if _handler is not None and _handler.on_held == on_held:
        _handler.on_held = None
        _handler.release()


def release_chat() -> None:
    """Log the chat lines held since the last call (after they were delivered)."""
    if _handler is not None and _handler.held:
        _handler.release()


def divert(show: Callable[[str], None] | None) -> None:
    """While the server's console owns the terminal, log lines go through it
    (above the prompt) instead of straight to stderr; None ends that."""
    if _handler is not None:
        _handler.divert = show


def set_level(level: str) -> None:
    global _level
    _level = LEVELS[level.lower()]
