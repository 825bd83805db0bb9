"""A serial line as a chat participant: a person at a serial terminal, or a
microcontroller printing lines.

mode=terminal: someone runs picocom/screen/minicom/PuTTY on the other end.
The line is raw (nothing echoes, Enter sends CR, Backspace sends DEL), so the
bridge runs the same line editor as picchat-client: it echoes, edits, writes
CRLF, shows a ``You (NAME): `` prompt and redraws a half-typed line when a
message arrives. Commands (/nick, /who, ...) work as for everyone.

mode=lines: an Arduino or the like. No echo, no prompt, no editing: every
line it prints (LF or CRLF) is a message from NAME (a line starting with "/"
is a message too, never a command), and every chat line is written to it as
``name: text`` + CRLF. Presence lines and notices are not sent to it.

The device is opened once with pyserial (raw mode, the baud rate, an
exclusive lock) and then read and written through its fd in the server's
selectors loop. If it is missing or unplugged, the bridge says so, keeps the
server running, and tries again every ``serial-retry`` seconds; opening is
never retried faster than that (an Arduino resets each time its port opens).

Before opening, it refuses a device that the kernel console or a getty also
uses (two readers on one tty split the input at random), unless forced.
"""

from __future__ import annotations

import errno
import os
import re
from collections import deque
from collections.abc import Callable
from pathlib import Path

from .. import logs
from ..config import ConfigError, SerialSpec
from ..editor import Editor, Line, QuitRequest
from ..framing import TOO_LONG, LineReader
from ..loop import Loop, Timer
from .listeners import StartupError

log = logs.get(__name__)

CRLF = b"\r\n"
PYSERIAL_HINT = (
    "the serial bridge needs pyserial: pip install 'picchat[serial]' "
    "(or on Raspberry Pi OS / Debian: sudo apt install python3-serial)"
)
FIX_HINT = (
    "free the port for picchat: sudo raspi-config -> Interface Options -> Serial Port -> "
    "login shell over serial: No, serial port hardware: Yes (then reboot), or stop the "
    "getty (sudo systemctl disable --now serial-getty@{tty}.service); or pass --serial-force"
)


def import_pyserial():
    """The pyserial module, or StartupError with the line saying what to install."""
    try:
        import serial
    except ImportError:
        raise StartupError(PYSERIAL_HINT) from None
    return serial


# ---- who else uses this tty? ------------------------------------------------


def console_conflict(
    device: str, cmdline: str | None = None, proc: Path = Path("/proc")
) -> str | None:
    """Why ``device`` must not be opened (the kernel console or a getty is on
    it), or None. If the check cannot read what it needs, that is a reason too:
    never a silent 'no conflict'."""
    try:
        real = os.path.realpath(device)  # /dev/serial0 -> /dev/ttyS0 or ttyAMA0
    except OSError as exc:
        return f"cannot resolve {device}: {exc.strerror}"
    tty = os.path.basename(real)
    if cmdline is None:
        try:
            cmdline = (proc / "cmdline").read_text()
        except OSError as exc:
            return (
                f"cannot read {proc}/cmdline to check for a kernel console ({exc.strerror}); "
                "if you know the port is free, pass --serial-force"
            )
    for m in re.finditer(r"(?:^|\s)console=([^,\s]+)", cmdline):
        console = m.group(1)
        path = console if console.startswith("/") else f"/dev/{console}"
        if os.path.basename(os.path.realpath(path)) == tty:
            return (
                f"the kernel console is on {tty} (console={console} in /proc/cmdline); "
                + FIX_HINT.format(tty=tty)
            )
    getty = _getty_on(tty, proc)
    if getty is not None:
        return getty
    return None


def _getty_on(tty: str, proc: Path) -> str | None:
    try:
        pids = [p for p in os.listdir(proc) if p.isdigit()]
    except OSError as exc:
        return (
            f"cannot list the processes in {proc} to look for a getty ({exc.strerror}); "
            "if you know the port is free, pass --serial-force"
        )
    seen_others = False
    for pid in pids:
        if pid == str(os.getpid()):
            continue
        try:
            args = (proc / pid / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # gone meanwhile, or not ours to read
        seen_others = True
        if args and b"getty" in os.path.basename(args[0]) and tty.encode() in args[1:]:
            return f"a login prompt (getty, pid {pid}) runs on {tty}; " + FIX_HINT.format(tty=tty)
    if not seen_others:
        return (
            f"cannot see other processes in {proc} (hidden by hardening?) to check for a "
            f"getty on {tty}; if you know the port is free, pass --serial-force"
        )
    return None


def _is_quit(text: str) -> bool:
    """/quit or /exit, as the plain protocol reads it."""
    text = text.strip()
    if not text.startswith("/") or text.startswith("//"):
        return False
    return text[1:].partition(" ")[0].lower() in ("quit", "exit")


# ---- the bridge ----------------------------------------------------------------


class SerialBridge:
    """One serial device as one participant. The server owns the hub; the
    bridge calls back with typed lines and takes the lines to show."""

    def __init__(
        self,
        spec: SerialSpec,
        loop: Loop,
        *,
        retry: float,
        force: bool,
        max_line: int,
        on_open: Callable[[SerialBridge], None],
        on_line: Callable[[SerialBridge, bytes], None],
        on_close: Callable[[SerialBridge, str], None],
        on_drained: Callable[[SerialBridge], None],
    ) -> None:
        self.spec = spec
        self.name = spec.name
        self._serial = import_pyserial()
        self._loop = loop
        self._retry = retry
        self._force = force
        self._max_line = max_line
        self._on_open = on_open
        self._on_line = on_line
        self._on_close = on_close
        self._on_drained = on_drained
        self._port = None  # the pyserial Serial while open
        self._fd = -1
        self._out = bytearray()  # bytes for the device, bounded by what we pull
        self._timer: Timer | None = None
        self._missing_logged = False
        self._reader = LineReader(max_line)
        self._paused = False
        self._held: deque[bytes] = deque()  # lines read before a pause (one read's worth)
        self.cid = -1  # the hub's id for this participant, set by the server
        self.editor = Editor(
            f"You ({self.name}): ", spec.cols, max_bytes=max(64, max_line // 2 - 64)
        )

    @property
    def is_open(self) -> bool:
        return self._fd >= 0

    @property
    def terminal(self) -> bool:
        return self.spec.mode == "terminal"

    def check(self) -> None:
        """At start-up: refuse a device the console or a getty uses (StartupError)."""
        if self._force or not os.path.exists(self.spec.device):
            return
        problem = console_conflict(self.spec.device)
        if problem is not None:
            raise ConfigError(f"refusing serial device {self.spec.device}: {problem}")

    def start(self) -> None:
        self._try_open()

    # ---- opening and losing the device --------------------------------------

    def _try_open(self) -> None:
        self._timer = None
        device = self.spec.device
        if not self._force and os.path.exists(device):
            problem = console_conflict(device)
            if problem is not None:
                log.error("Not opening serial device %s: %s", device, problem)
                return  # a configuration problem: retrying would not help
        try:
            port = self._serial.Serial(
                device,
                self.spec.baud,
                timeout=0,
                write_timeout=0,
                exclusive=True,
            )
        except (self._serial.SerialException, OSError, ValueError) as exc:
            self._not_opened(exc)
            return
        self._port = port
        self._fd = port.fileno()
        os.set_blocking(self._fd, False)
        self._reader = LineReader(self._max_line)
        self._out.clear()
        if self._missing_logged:
            log.info("Serial device %s is back", device)
        self._missing_logged = False
        log.info(
            "Serial line %s open at %d baud (%s mode) as %s",
            device,
            self.spec.baud,
            self.spec.mode,
            self.name,
        )
        self._held.clear()  # a new connection of the device: old lines are stale
        if not self._paused:
            self._loop.add_reader(self._fd, self._readable)
        self._on_open(self)
        if self.terminal:
            self.editor.buffer = ""
            self.editor.prompt = f"You ({self.name}): "  # it rejoins under its own name
            self._write(
                b"\r\n"
                + self.editor.show(f"* picchat: you are {self.name}. Type /help for commands.")
            )

    def _not_opened(self, exc: BaseException) -> None:
        text = str(exc)
        locked = isinstance(exc, OSError) and exc.errno in (errno.EBUSY, errno.EAGAIN)
        if locked or "Could not exclusively lock" in text:
            text = "another program, perhaps another picchat, holds its lock"
        if not self._missing_logged:
            log.warning(
                "Cannot open serial device %s (%s); trying again every %g s, "
                "everything else keeps running",
                self.spec.device,
                text,
                self._retry,
            )
            self._missing_logged = True
        self._timer = self._loop.call_later(self._retry, self._try_open)

    def _lost(self, reason: str) -> None:
        log.warning(
            "Serial device %s went away (%s); trying again every %g s",
            self.spec.device,
            reason,
            self._retry,
        )
        self._missing_logged = True
        self._close_port()
        self._on_close(self, reason)
        self._timer = self._loop.call_later(self._retry, self._try_open)

    def _close_port(self) -> None:
        if self._fd >= 0:
            self._loop.forget(self._fd)
        if self._port is not None:
            try:
                self._port.close()
            except (OSError, self._serial.SerialException):
                pass
        self._port = None
        self._fd = -1
        self._out.clear()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._fd >= 0 and self.terminal:
            self._write(self.editor.hide())
        self._close_port()

    # ---- input -----------------------------------------------------------------

    def pause(self) -> None:
        """Read nothing until ``resume`` (the rate limit). The device's lines
        then wait in the kernel's tty buffer (4 KiB); without flow control
        (rtscts) what overflows it is lost at the UART, as on any terminal."""
        if not self._paused:
            self._paused = True
            if self._fd >= 0:
                self._loop.remove_reader(self._fd)

    def resume(self) -> None:
        self._paused = False
        while self._held and not self._paused:
            self._on_line(self, self._held.popleft())
        if not self._paused and self._fd >= 0:
            self._loop.add_reader(self._fd, self._readable)

    def _line(self, line: bytes) -> None:
        if self._paused:
            self._held.append(line)
        else:
            self._on_line(self, line)

    def _readable(self) -> None:
        try:
            data = os.read(self._fd, 4096)
        except BlockingIOError:
            return
        except OSError as exc:  # EIO: the USB adapter was pulled
            self._lost(exc.strerror or "read error")
            return
        if not data:  # readable but empty: the device is gone (or hung up)
            self._lost("end of file")
            return
        if self.terminal:
            echo, events = self.editor.feed(data)
            self._write(echo)
            for ev in events:
                if isinstance(ev, Line):
                    if _is_quit(ev.text):
                        # /quit would leave the room while the line stays open,
                        # its input ignored until the device is reopened.
                        self._write(self.editor.show("* (a serial line stays connected)"))
                    elif ev.text.strip():
                        self._line(ev.text.encode())
                elif isinstance(ev, QuitRequest):
                    # A serial line cannot hang up: say how to leave instead.
                    self._write(self.editor.show("* (a serial line stays connected)"))
            return
        # Some devices end lines with CR alone: take CR as a line end too (a
        # CRLF cut between two reads then gives an empty line, which is skipped).
        for item in self._reader.feed(data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")):
            if item is TOO_LONG:
                log.warning(
                    "%s sent a line longer than %d bytes; discarded", self.name, self._max_line
                )
            elif item.strip():
                # A device's line is always a message, never a command.
                self._line(b"/" + item if item.startswith(b"/") else item)

    def set_name(self, name: str) -> None:
        """Its name in the room (after /nick): the prompt says it."""
        prompt = f"You ({name}): "
        if self.terminal and self._fd >= 0 and self.editor.prompt != prompt:
            self._write(self.editor.set_prompt(prompt))

    # ---- output ----------------------------------------------------------------

    @property
    def wants_output(self) -> bool:
        """Ready for more chat lines (what it has is written)."""
        return self._fd >= 0 and not self._out

    def show(self, lines: list[str], dropped: int = 0) -> None:
        """Write chat lines (plain format, one per item) to the device."""
        if self._fd < 0:
            return
        if dropped:
            plural = "s" if dropped != 1 else ""
            note = (
                f"* ({dropped} message{plural} dropped: this serial line is slower than the chat)"
            )
            lines = [note, *lines]
        data = bytearray()
        for line in lines:
            if self.terminal:
                data += self.editor.show(line)
            elif not line.startswith(("* ", "! ")):
                data += line.encode() + CRLF
        if data:
            self._write(bytes(data))

    def _write(self, data: bytes) -> None:
        if self._fd < 0 or not data:
            return
        self._out += data
        self._flush()

    def _flush(self) -> None:
        while self._out:
            try:
                n = os.write(self._fd, self._out)
            except BlockingIOError:
                break
            except OSError as exc:
                self._lost(exc.strerror or "write error")
                return
            del self._out[:n]
        if self._out:
            self._loop.add_writer(self._fd, self._flush)
        else:
            self._loop.remove_writer(self._fd)
            self._on_drained(self)
