"""The wire protocol, sans I/O: bytes in, requests out; frames in, bytes out.

Two wire formats share one port (docs/protocol.md is the specification):

- PLAIN, for people and raw tools (nc, telnet, socat): a line is a chat
  message, ``/command`` lines are commands, the server sends ``name: text``.
- JSON, for programs: the first line is a versioned hello,
  ``PICCHAT/1 {json}``; after it, one JSON object per line both ways.

A server connection's states and transitions:

    AWAIT_AUTH  --/auth line--> JUDGING (an Auth request; nothing more is
                                         parsed until the hub decides)
    JUDGING     --authenticated()--> AWAIT_FIRST
    AWAIT_FIRST --hello line--> JSON
    AWAIT_FIRST --other line--> PLAIN   (the line itself is plain chat)
    any         --EOF---------> CLOSED
    AWAIT_FIRST --bad hello---> CLOSED  (after a Fatal request)

A connection starts in AWAIT_AUTH only where the server wants a token (a TCP
peer on another machine): there, other lines are refused with an error and
a hello ends the connection. Elsewhere a ``/auth`` line before the first
line is ignored, so a client may always send its token first.

Until its first line a connection is treated as plain (a listener that never
types still gets the chat). Frames are encoded by ``encode`` once per format
and the same bytes are queued for every recipient of that format.
"""

from __future__ import annotations

import json
import re
from enum import Enum

from .events import (
    Ack,
    Auth,
    Bye,
    Chat,
    Closed,
    Error,
    Fatal,
    Frame,
    Gap,
    Hello,
    Help,
    Invalid,
    Message,
    Names,
    Nick,
    Notice,
    Presence,
    Quit,
    Refuse,
    Renamed,
    Request,
    Resume,
    Say,
    Welcome,
    Who,
)
from .framing import TOO_LONG, LineReader
from .sanitize import TelnetRefusals, clean_bytes, clean_text

TYPE_CHECKING = False  # typing is not imported at run time: start-up time
if TYPE_CHECKING:
    from typing import Any

VERSION = 1
HELLO_PREFIX = b"PICCHAT/"
HELLO_TAG = f"PICCHAT/{VERSION}"
_HELLO_RE = re.compile(rb"PICCHAT/(\d{1,6})(?:[ \t]+(.*))?\Z", re.DOTALL)
_REPLY_RE = re.compile(rb"PICCHAT/\d{1,6}[ \t]")
_ID_MAX = 64  # a client's message id is echoed back: keep it short


class Wire(Enum):
    PLAIN = "plain"
    JSON = "json"

    # Members are singletons: hash by identity, in C (Enum's own __hash__ is
    # Python, and a Wire keys the per-message encoding cache of every delivery).
    __hash__ = object.__hash__


class State(Enum):
    AWAIT_AUTH = "await-auth"
    JUDGING = "judging"
    AWAIT_FIRST = "await-first"
    PLAIN = "plain"
    JSON = "json"
    CLOSED = "closed"


class ProtocolError(Exception):
    """The other side broke the protocol (raised on the client side only)."""


class AuthRefused(ProtocolError):
    """The server refused our token (``! authentication failed``)."""


AUTH_FAILED = b"! authentication failed"  # the server's answer to a wrong token


# ---- encoding -------------------------------------------------------------


def _count_text(names: tuple[str, ...], count: int, verb: str) -> str:
    if count > len(names):
        others = count - len(names)
        shown = ", ".join(names) + f" and {others} other{'s' if others != 1 else ''}"
    elif len(names) > 1:
        shown = ", ".join(names[:-1]) + " and " + names[-1]
    else:
        shown = names[0] if names else ""
    return f"{shown} {verb}"


def presence_text(p: Presence) -> str:
    parts = []
    if p.joined_count:
        parts.append(_count_text(p.joined, p.joined_count, "joined"))
    if p.left_count:
        parts.append(_count_text(p.left, p.left_count, "left"))
    return "; ".join(parts)


def plain_text(frame: Frame) -> str | None:
    """The line a plain peer sees for a frame, or None if plain peers skip it."""
    match frame:
        case Chat(Message(sender=sender, text=text)):
            return f"{sender}: {text}"
        case Welcome(name=name):
            return f"* Welcome to picchat! You are {name}. Type /help for commands."
        case Notice(text=text) | Bye(text=text) | Gap(text=text):
            return f"* {text}"
        case Presence():
            return "* " + presence_text(frame)
        case Renamed(old=old, new=new):
            return f"* {old} is now known as {new}"
        case Names(names=names, count=count):
            listed = ", ".join(names)
            if count > len(names):
                listed += f" and {count - len(names)} more"
            return f"* {count} here: {listed}"
        case Error(text=text):
            return f"! {text}"
        case Ack():
            return None
    raise TypeError(f"not a frame: {frame!r}")


def json_object(frame: Frame) -> dict[str, Any]:
    match frame:
        case Chat(Message(seq=seq, time=t, sender=sender, text=text), replay=replay):
            obj = {"type": "msg", "seq": seq, "time": t, "from": sender, "text": text}
            if replay:
                obj["replay"] = True
            return obj
        case Welcome():
            return {
                "type": "welcome",
                "name": frame.name,
                "member": frame.member,
                "history_id": frame.history_id,
                "seq": frame.seq,
                "max_line": frame.max_line,
                "server": frame.server,
            } | ({"session": frame.session} if frame.session else {})
        case Gap(reason=reason, missed=missed, text=text):
            return {"type": "gap", "reason": reason, "missed": missed, "text": text}
        case Notice(text=text, code=code):
            return {"type": "notice", "code": code, "text": text}
        case Presence():
            return {
                "type": "presence",
                "joined": list(frame.joined),
                "joined_count": frame.joined_count,
                "left": list(frame.left),
                "left_count": frame.left_count,
                "text": presence_text(frame),
            }
        case Renamed(old=old, new=new):
            return {"type": "renamed", "old": old, "new": new}
        case Names(names=names, count=count, id=id_):
            return _with_id({"type": "names", "names": list(names), "count": count}, id_)
        case Ack(id=id_, seq=seq):
            return {"type": "ack", "id": id_, "seq": seq}
        case Error(code=code, text=text, id=id_):
            return _with_id({"type": "error", "code": code, "text": text}, id_)
        case Bye(text=text):
            return {"type": "bye", "text": text}
    raise TypeError(f"not a frame: {frame!r}")


def _with_id(obj: dict[str, Any], id_: str | None) -> dict[str, Any]:
    if id_ is not None:
        obj["id"] = id_
    return obj


# Compact JSON, for the wire and the history on disk. One encoder for all:
# json.dumps with options builds a new JSONEncoder at every call.
dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def encode(frame: Frame, wire: Wire) -> bytes:
    """The bytes of one frame in one wire format (b"" if that format skips it)."""
    if wire is Wire.PLAIN:
        text = plain_text(frame)
        return b"" if text is None else (text + "\n").encode()
    if isinstance(frame, Welcome):  # the hello reply carries the version tag
        return encode_hello_reply(frame)
    return (dumps(json_object(frame)) + "\n").encode()


def encode_hello_reply(frame: Frame) -> bytes:
    """A JSON frame behind the version tag: the hello's answer (welcome or error)."""
    return f"{HELLO_TAG} {dumps(json_object(frame))}\n".encode()


def encode_hello(name: str | None, *, member: bool = True, client: str = "", **extra: Any) -> bytes:
    obj: dict[str, Any] = {"member": member}
    if name is not None:
        obj["name"] = name
    if client:
        obj["client"] = client
    obj.update(extra)
    return f"{HELLO_TAG} {dumps(obj)}\n".encode()


def encode_request(obj: dict[str, Any]) -> bytes:
    return (dumps(obj) + "\n").encode()


# ---- the server's side of one connection ----------------------------------


def _opt_id(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError("id must be a string or an integer")
    text = str(value)
    if len(text) > _ID_MAX:
        raise ValueError(f"id longer than {_ID_MAX} characters")
    if not text.isprintable():
        raise ValueError("id must be printable text")
    return text


class ServerConnection:
    """Parses what one peer sends. Holds no socket; knows nothing of the room."""

    __slots__ = ("_eof", "_overlong", "_reader", "_telnet", "lines", "state", "wire")

    def __init__(self, max_line: int, auth: bool = False) -> None:
        self.state = State.AWAIT_AUTH if auth else State.AWAIT_FIRST
        # JSON once its hello was accepted, until the end: still JSON once CLOSED
        # (the requests that came with the end of input are answered after that).
        self.wire = Wire.PLAIN
        self._reader = LineReader(max_line)
        self._eof = False  # the peer closed its end; lines may still wait
        self.lines = 0  # lines taken from the input so far (what the rate limit counts)
        self._overlong = False  # an overlong line came while judging: reported after
        self._telnet: TelnetRefusals | None = None  # once a telnet command came

    @property
    def max_line(self) -> int:
        return self._reader.max_line

    @property
    def backlog(self) -> bool:
        """Received lines (or the end of input) wait for ``next_requests``."""
        if self.state in (State.CLOSED, State.JUDGING):
            return False
        return self._reader.backlog or self._eof or self._overlong

    @property
    def first_line_pending(self) -> bool:
        """Bytes of a first line (or of the /auth line) have come, its end not."""
        first = self.state in (State.AWAIT_AUTH, State.AWAIT_FIRST)
        return first and self._reader.pending > 0

    @property
    def authenticating(self) -> bool:
        return self.state in (State.AWAIT_AUTH, State.JUDGING)

    def authenticated(self) -> None:
        """The hub accepted the token: go on with the lines after it."""
        if self.state is State.JUDGING:
            self.state = State.AWAIT_FIRST

    def receive_data(
        self, data: bytes, limit: int | None = None, budget: int | None = None
    ) -> list[Request]:
        """Feed received bytes (``b""``: the peer closed its end). With ``limit``
        lines or ``budget`` bytes, handle only that much; the rest waits for
        ``next_requests`` (see ``backlog``)."""
        if self.state is State.CLOSED:
            return []
        if not data:
            self._eof = True
        requests = self._requests(data, limit, budget)
        # (After a hello line in data the state is JSON: no telnet there; after
        # an /auth line it is JUDGING, and a telnet user may still press Ctrl-C.)
        if self.state in _TELNET_STATES and (self._telnet is not None or 0xFF in data):
            if self._telnet is None:
                self._telnet = TelnetRefusals()
            refuse = self._telnet.feed(data)
            if refuse:
                requests.append(Refuse(refuse))
        return requests

    def next_requests(self, limit: int | None = None, budget: int | None = None) -> list[Request]:
        """Go on with what ``receive_data`` left waiting."""
        if self.state is State.CLOSED:
            return []
        return self._requests(b"", limit, budget)

    def _requests(self, data: bytes, limit: int | None, budget: int | None) -> list[Request]:
        requests: list[Request] = []
        if self.state is State.JUDGING:
            # Kept, unparsed, until the verdict (an overlong line: reported then).
            self._overlong |= bool(self._reader.feed(data, 0))
            return requests
        if self._overlong:
            self._overlong = False
            requests.append(self._too_long())
        if self.state is State.AWAIT_AUTH:
            limit = 1  # a line at a time: after /auth, nothing more until the verdict
        items = self._reader.feed(data, limit, budget)
        self.lines += len(items)
        for n, item in enumerate(items, 1):
            if item is TOO_LONG:
                requests.append(self._too_long())
            else:
                requests.extend(self._line(item))
            if self.state in (State.CLOSED, State.JUDGING):
                # After /auth, the rest waits for the verdict (after the line:
                # at most an overlong one, the reader's limit being 1).
                self._overlong = self.state is State.JUDGING and n < len(items)
                return requests
        if self.state is State.AWAIT_AUTH and self._reader.backlog:
            return requests  # one line per call until authenticated
        if self._eof and not self._reader.backlog:
            last = self._reader.take_partial()
            self.lines += last is TOO_LONG or bool(last)
            if last is TOO_LONG:
                requests.append(self._too_long())
            elif last:
                requests.extend(self._line(last))
                if self.state is State.JUDGING:
                    return requests  # an unterminated /auth: the end waits for the verdict
            self.state = State.CLOSED
            requests.append(Closed())
        return requests

    def _too_long(self) -> Request:
        if self.state is State.AWAIT_AUTH:
            return Invalid("auth_required", AUTH_FIRST)
        if self.state is State.AWAIT_FIRST:
            self.state = State.PLAIN
        return Invalid(
            "line_too_long",
            f"line longer than {self.max_line} bytes was discarded",
        )

    def _line(self, line: bytes) -> list[Request]:
        if line.startswith(TLS_RECORD) and self.state in (State.AWAIT_AUTH, State.AWAIT_FIRST):
            # A TLS client on the plain port: its handshake is not chat.
            self.state = State.CLOSED
            return [Fatal("plain_port", PLAIN_PORT)]
        token = _auth_token(line)
        if self.state is State.AWAIT_AUTH:
            if token is not None:
                self.state = State.JUDGING
                return [Auth(token)]
            if line.startswith(HELLO_PREFIX):
                self.state = State.CLOSED
                return [Fatal("auth_required", AUTH_FIRST)]
            return [Invalid("auth_required", AUTH_FIRST)] if line.strip() else []
        if token is not None:
            return []  # no token needed here: ignored, and the state is kept
        if self.state is State.AWAIT_FIRST:
            if line.startswith(HELLO_PREFIX):
                return [self._hello(line)]
            self.state = State.PLAIN
        if self.state is State.PLAIN:
            return _plain_request(line)
        return [_json_request(line)]

    def _hello(self, line: bytes) -> Request:
        m = _HELLO_RE.match(line)
        if m is None:
            self.state = State.CLOSED
            return Fatal("bad_hello", f"a hello looks like '{HELLO_TAG} {{...}}'")
        version = int(m.group(1))
        if version != VERSION:
            self.state = State.CLOSED
            return Fatal(
                "version",
                f"this server speaks {HELLO_TAG} only, not PICCHAT/{version}; "
                "use a picchat client of the same generation as the server",
            )
        try:
            obj = json.loads((m.group(2) or b"{}").decode("utf-8", "replace"))
            if not isinstance(obj, dict):
                raise ValueError("the hello must be a JSON object")
            name = obj.get("name")
            if name is not None and not isinstance(name, str):
                raise ValueError("name must be a string")
            member = obj.get("member", True)
            if not isinstance(member, bool):
                raise ValueError("member must be true or false")
            client = obj.get("client", "")
            client = clean_text(client)[:64] if isinstance(client, str) else ""
            session = obj.get("session")
            if session is not None and (not isinstance(session, str) or len(session) > 64):
                raise ValueError("session must be a string of at most 64 characters")
            resume = _resume(obj.get("resume"))
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeError
            # RecursionError: json recurses once per nesting level ("[[[[...").
            self.state = State.CLOSED
            return Fatal("bad_hello", f"bad hello: {exc}")
        self.state = State.JSON
        self.wire = Wire.JSON
        return Hello(VERSION, name, member, client, session, resume)


# Where a telnet client may be talking (never in the structured protocol).
_TELNET_STATES = (State.AWAIT_AUTH, State.JUDGING, State.AWAIT_FIRST, State.PLAIN)
AUTH_FIRST = "this server needs a token first: send /auth TOKEN"
TLS_RECORD = b"\x16\x03"  # a TLS handshake record, as every TLS client starts
PLAIN_PORT = "this is picchat's plain-text port: connect with TLS to its tls-port instead"
_AUTH_RE = re.compile(rb"[ \t]*/auth(?:[ \t]+(\S*))?[ \t]*\Z", re.IGNORECASE)


def _auth_token(line: bytes) -> bytes | None:
    """The token of an ``/auth TOKEN`` line (b"" if it has none), else None."""
    m = _AUTH_RE.match(line)
    return None if m is None else (m.group(1) or b"")


def _resume(value: Any) -> Resume | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError("resume must be an object")
    history_id, seq = value.get("history_id"), value.get("seq")
    if not isinstance(history_id, str) or len(history_id) > 64:
        raise ValueError("resume.history_id must be a string")
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
        raise ValueError("resume.seq must be a whole number >= 0")
    return Resume(history_id, seq)


_COMMANDS = "/nick NAME, /who, /help, /quit"


def _plain_request(line: bytes) -> list[Request]:
    text = clean_bytes(line).strip()
    if not text:
        return []  # a bare Enter is not a message
    if not text.startswith("/"):
        return [Say(text)]
    if text.startswith("//"):  # "//path" sends "/path"
        return [Say(text[1:])]
    cmd, _, arg = text[1:].partition(" ")
    cmd = cmd.lower()
    arg = arg.strip()
    if cmd == "nick":
        if not arg or " " in arg:
            return [Invalid("usage", "usage: /nick NAME (one word)")]
        return [Nick(arg)]
    if cmd in ("who", "names"):
        return [Who()]
    if cmd == "help":
        return [Help()]
    if cmd in ("quit", "exit"):
        return [Quit()]
    return [
        Invalid(
            "unknown_command",
            f"unknown command /{cmd}; commands: {_COMMANDS} "
            "(start a message with // to send a literal /)",
        )
    ]


def _json_request(line: bytes) -> Request:
    try:
        obj = json.loads(line.decode("utf-8", "replace"))  # invalid UTF-8 -> U+FFFD
    except (ValueError, RecursionError):  # RecursionError: "[[[[..." nested too deep
        return Invalid("bad_frame", "not a JSON object: ignored")
    if not isinstance(obj, dict):
        return Invalid("bad_frame", "not a JSON object: ignored")
    try:
        id_ = _opt_id(obj.get("id"))
    except ValueError as exc:
        return Invalid("bad_frame", str(exc))
    kind = obj.get("type")
    if kind == "msg":
        text = obj.get("text")
        if not isinstance(text, str):
            return Invalid("bad_frame", "msg needs a text string", id_)
        text = clean_text(text).strip()
        if not text:
            return Invalid("empty", "empty message: nothing sent", id_)
        return Say(text, id_)
    if kind == "nick":
        name = obj.get("name")
        if not isinstance(name, str):
            return Invalid("bad_frame", "nick needs a name string", id_)
        return Nick(name, id_)
    if kind == "who":
        return Who(id_)
    if kind == "quit":
        return Quit()
    return Invalid("unknown_type", f"unknown frame type {kind!r}: ignored", id_)


# ---- the client's side (picchat-send, picchat-client, tests) ---------------


class ClientConnection:
    """Parses what the server sends to a structured client.

    Lines before the hello reply are plain lines meant for people (the server
    greets every connection before it knows its format): they are skipped.
    """

    __slots__ = ("_reader", "last_plain", "welcome")

    def __init__(self, max_line: int = 1 << 20) -> None:
        self._reader = LineReader(max_line)
        self.welcome: dict[str, Any] | None = None
        self.last_plain = ""  # the last line skipped before the reply (may explain a refusal)

    def receive_data(self, data: bytes) -> list[dict[str, Any]]:
        frames = []
        for item in self._reader.feed(data):
            if item is TOO_LONG:
                raise ProtocolError("the server sent an overlong line")
            if self.welcome is None:
                # Only "PICCHAT/<digits> ..." is the reply; anything else (the
                # plain greeting, chat, "! server full") is for people.
                if not _REPLY_RE.match(item):
                    if item == AUTH_FAILED:
                        raise AuthRefused("the server refused our token (authentication failed)")
                    self.last_plain = item.decode("utf-8", "replace")
                    continue
                frame = self._hello_reply(item)
                if frame.get("type") == "welcome":
                    self.welcome = frame
                frames.append(frame)
            else:
                try:
                    frame = json.loads(item)
                except (ValueError, RecursionError) as exc:
                    raise ProtocolError(f"the server sent a bad frame: {exc}") from None
                if not isinstance(frame, dict):
                    raise ProtocolError("the server sent a frame that is not an object")
                frames.append(frame)
        return frames

    @staticmethod
    def _hello_reply(line: bytes) -> dict[str, Any]:
        m = _HELLO_RE.match(line)
        if m is None:
            raise ProtocolError("the server's hello reply is malformed")
        try:
            frame = json.loads(m.group(2) or b"{}")
        except (ValueError, RecursionError) as exc:
            raise ProtocolError(f"the server's hello reply is malformed: {exc}") from None
        if not isinstance(frame, dict):
            raise ProtocolError("the server's hello reply is not an object")
        if int(m.group(1)) != VERSION and frame.get("type") != "error":
            raise ProtocolError(
                f"the server speaks PICCHAT/{m.group(1).decode()}, this client PICCHAT/{VERSION}"
            )
        return frame
