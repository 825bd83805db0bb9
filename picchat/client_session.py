"""The interactive client's state, sans I/O: what to send, what to show.

It survives reconnects. It remembers the server's session token, the history
id and the last sequence number seen, and every message typed but not yet
acknowledged (sent or still queued while the link is down), so that after a
reconnect it can ask for exactly the messages it missed and resend exactly the
ones the server may not have. The server drops a resent message it already
has (same session, same message id) and answers with the original ack.

Invariants:
- a message is shown once: a chat frame whose seq is not above the last seq
  seen is a duplicate and is skipped;
- ``unacked`` holds at most ``max_pending`` messages; typing more while the
  link is down is refused with a visible note, never silently dropped;
- message ids grow by one per typed message and are never reused in a session.
"""

from __future__ import annotations

from collections import OrderedDict

from .events import Value
from .protocol import encode_hello, encode_request
from .sanitize import clean_text

TYPE_CHECKING = False  # typing is not imported at run time: start-up time
if TYPE_CHECKING:
    from typing import Any

HELP = (
    "Commands: /nick NAME (change your name), /who (who is here), /quit (leave; "
    "Ctrl-D too), /help. Any other line goes to everyone; //text sends /text."
)


class Show(Value):
    """A line for the user. ``time`` is set for replayed messages (show it)."""

    __slots__ = __match_args__ = ("text", "time", "kind")

    def __init__(self, text: str, time: float | None = None, kind: str = "chat") -> None:
        self.text = text
        self.time = time
        self.kind = kind  # chat, notice, error, status


class NameChanged(Value):
    __slots__ = __match_args__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


class Closing(Value):
    """The session is over (the user quit, or the server refused us for good)."""

    __slots__ = __match_args__ = ("reason", "failed", "denied")

    def __init__(self, reason: str, failed: bool = False, denied: bool = False) -> None:
        self.reason = reason
        self.failed = failed
        self.denied = denied  # the server wants a token we do not have (exit 77)


Output = Show | NameChanged | Closing


class ClientSession:
    def __init__(self, name: str | None = None, max_pending: int = 100, client: str = "") -> None:
        self.name = name
        self.max_pending = max_pending
        self.client = client
        self.connected = False
        self.session: str | None = None
        self.history_id: str | None = None
        self.seq = 0  # newest sequence number received (others' messages) under history_id
        self.unacked: OrderedDict[str, str] = OrderedDict()  # id -> text
        self._next_id = 1
        self._quitting = False
        # The longest line the server takes (its welcome says); a longer
        # frame would be discarded unanswered and wait for an ack forever.
        self.max_line = 4096

    # ---- connection lifecycle ---------------------------------------------

    def hello(self) -> bytes:
        extra: dict[str, Any] = {}
        if self.session:
            extra["session"] = self.session
        if self.history_id is not None:
            extra["resume"] = {"history_id": self.history_id, "seq": self.seq}
        return encode_hello(self.name, member=True, client=self.client, **extra)

    def disconnected(self) -> None:
        self.connected = False

    # ---- the user typed a line ---------------------------------------------------

    def submit(self, line: str) -> tuple[bytes, list[Output]]:
        text = line.strip()
        if not text:
            return b"", []
        if text.startswith("/") and not text.startswith("//"):
            return self._command(text)
        if text.startswith("//"):
            text = text[1:]
        if len(self.unacked) >= self.max_pending:
            return b"", [
                Show(
                    f"not sent: {self.max_pending} messages are already waiting for the "
                    "server (max-pending)",
                    kind="error",
                )
            ]
        id_ = str(self._next_id)
        frame = encode_request({"type": "msg", "id": id_, "text": text})
        if len(frame) - 1 > self.max_line:
            return b"", [
                Show(
                    f"not sent: the message is too long ({len(frame) - 1} bytes encoded; "
                    f"the server takes at most {self.max_line})",
                    kind="error",
                )
            ]
        self._next_id += 1
        self.unacked[id_] = text
        if not self.connected:
            return b"", [Show(f"(pending) {text}", kind="status")]
        return frame, []

    def _command(self, text: str) -> tuple[bytes, list[Output]]:
        cmd, _, arg = text[1:].partition(" ")
        cmd = cmd.lower()
        arg = arg.strip()
        if cmd in ("quit", "exit"):
            self._quitting = True
            if self.connected:
                return encode_request({"type": "quit"}), []
            return b"", [Closing("quit")]
        if cmd == "help":
            return b"", [Show(HELP, kind="notice")]
        if not self.connected:
            return b"", [Show(f"/{cmd} needs the server; not connected", kind="error")]
        if cmd == "nick":
            if not arg or " " in arg:
                return b"", [Show("usage: /nick NAME (one word)", kind="error")]
            return encode_request({"type": "nick", "name": arg}), []
        if cmd in ("who", "names"):
            return encode_request({"type": "who"}), []
        return b"", [Show(f"unknown command /{cmd}; /help lists them", kind="error")]

    def quit(self) -> tuple[bytes, list[Output]]:
        return self._command("/quit")

    # ---- the server sent a frame ---------------------------------------------------

    def receive(self, frame: dict[str, Any]) -> tuple[bytes, list[Output]]:
        # Whatever the server sends reaches the user's terminal: clean every
        # string in it, as the server does, in case the server is not ours.
        frame = {k: clean_text(v) if isinstance(v, str) else v for k, v in frame.items()}
        kind = frame.get("type")
        if kind == "welcome":
            return self._welcome(frame)
        if kind == "msg":
            seq = frame.get("seq")
            if not isinstance(seq, int) or seq <= self.seq:
                return b"", []  # seen already (a replay overlapping what we had)
            self.seq = seq
            when = frame.get("time") if frame.get("replay") else None
            return b"", [Show(f"{frame.get('from')}: {frame.get('text')}", when)]
        if kind == "ack":
            id_ = str(frame.get("id"))
            self.unacked.pop(id_, None)
            # self.seq follows the messages we receive, not our own: the
            # server never sends us our own, and a replay still under way
            # may hold older ones we have not seen yet.
            return b"", []
        if kind == "error":
            out: list[Output] = [Show(str(frame.get("text")), kind="error")]
            id_ = frame.get("id")
            if id_ is not None and str(id_) in self.unacked:
                self.unacked.pop(str(id_))  # refused for good: do not resend
            if not self.connected and frame.get("code") == "auth_required":
                out.append(Closing(str(frame.get("text")), failed=True, denied=True))
            elif not self.connected and frame.get("code") in ("version", "bad_hello"):
                out.append(Closing(str(frame.get("text")), failed=True))
            return b"", out
        if kind == "renamed":
            if frame.get("old") == self.name:
                self.name = str(frame.get("new"))
                return b"", [
                    Show(f"You are now known as {self.name}", kind="notice"),
                    NameChanged(self.name),
                ]
            return b"", [
                Show(f"{frame.get('old')} is now known as {frame.get('new')}", kind="notice")
            ]
        if kind in ("presence", "notice", "gap"):
            return b"", [Show(str(frame.get("text")), kind="notice")]
        if kind == "names":
            names = ", ".join(clean_text(str(n)) for n in frame.get("names", []))
            count = frame.get("count", 0)
            more = count - len(frame.get("names", []))
            if more > 0:
                names += f" and {more} more"
            return b"", [Show(f"{count} here: {names}", kind="notice")]
        if kind == "bye":
            if self._quitting:
                return b"", [Closing("quit")]
            return b"", [Show(str(frame.get("text")), kind="status")]
        return b"", []  # a frame type from a newer server: ignore it

    def _welcome(self, frame: dict[str, Any]) -> tuple[bytes, list[Output]]:
        out: list[Output] = []
        self.connected = True
        self.session = frame.get("session") or self.session
        history_id = frame.get("history_id")
        if self.history_id is None:
            # Our first welcome: we asked for no replay, so what history holds
            # now is from before we came; a reconnect resumes after it.
            seq = frame.get("seq")
            self.seq = seq if isinstance(seq, int) and not isinstance(seq, bool) else 0
        elif history_id != self.history_id:
            self.seq = 0  # a new history: its numbers start again
        self.history_id = history_id
        max_line = frame.get("max_line")
        if isinstance(max_line, int) and not isinstance(max_line, bool) and max_line > 0:
            self.max_line = max_line
        name = frame.get("name")
        if isinstance(name, str):
            if self.name is not None and name != self.name:
                # Asked for another name (taken meanwhile?): say which we got.
                out.append(Show(f"You are {name}", kind="notice"))
            self.name = name
            out.append(NameChanged(name))
        # Resend everything not acknowledged, in order: the server drops the
        # ones it already has (same session, same id).
        data = b"".join(
            encode_request({"type": "msg", "id": id_, "text": text})
            for id_, text in self.unacked.items()
        )
        if self.unacked:
            out.append(Show(f"sending {len(self.unacked)} pending message(s)", kind="status"))
        return data, out
