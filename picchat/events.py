"""The vocabulary of picchat: what a peer asks for and what the server sends.

Plain value objects only. ``protocol`` turns bytes into requests and frames
into bytes (once per wire format); ``room`` decides who gets which frame.

They are plain classes with ``__slots__``, not dataclasses: 22 frozen
dataclasses took ~30 ms to create at import, and importing ``dataclasses``
pulls in ``inspect`` (~11 ms, 1.4 MB). They are immutable by convention:
nothing assigns to an attribute after ``__init__`` (a guard would slow down
creating them, which the hub does for every line).
"""

from __future__ import annotations


class Value:
    """Value semantics from ``__slots__``, as a frozen dataclass has them:
    equal when of the same class with equal fields, hashable, and a repr that
    names the fields (but not those in ``_hidden``)."""

    __slots__ = ()
    _hidden: tuple[str, ...] = ()  # fields kept out of repr (secrets)

    def _fields(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._fields() == other._fields()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{name}={getattr(self, name)!r}" for name in self.__slots__ if name not in self._hidden
        )
        return f"{self.__class__.__qualname__}({shown})"


# ---- requests: from a peer to the server ---------------------------------


class Hello(Value):
    """First line of a structured connection."""

    __slots__ = __match_args__ = ("version", "name", "member", "client", "session", "resume")

    def __init__(
        self,
        version: int,
        name: str | None = None,
        member: bool = True,  # False: a one-shot sender such as picchat-send
        client: str = "",
        session: str | None = None,  # token from an earlier welcome: resume that session
        resume: Resume | None = None,
    ) -> None:
        self.version = version
        self.name = name
        self.member = member
        self.client = client
        self.session = session
        self.resume = resume


class Resume(Value):
    """The last message a reconnecting client saw: replay what came after."""

    __slots__ = __match_args__ = ("history_id", "seq")

    def __init__(self, history_id: str, seq: int) -> None:
        self.history_id = history_id
        self.seq = seq


class Auth(Value):
    """``/auth TOKEN``: the first line where the server asks for a token."""

    __slots__ = __match_args__ = ("token",)
    _hidden = ("token",)  # never in a log or a traceback

    def __init__(self, token: bytes) -> None:
        self.token = token


class Say(Value):
    __slots__ = __match_args__ = ("text", "id")

    def __init__(self, text: str, id: str | None = None) -> None:
        self.text = text
        self.id = id  # the client's own message id, echoed in the ack


class Nick(Value):
    __slots__ = __match_args__ = ("name", "id")

    def __init__(self, name: str, id: str | None = None) -> None:
        self.name = name
        self.id = id


class Who(Value):
    __slots__ = __match_args__ = ("id",)

    def __init__(self, id: str | None = None) -> None:
        self.id = id


class Help(Value):
    __slots__ = __match_args__ = ()


class Quit(Value):
    __slots__ = __match_args__ = ()


class Invalid(Value):
    """The peer sent something we cannot accept; it is told, and stays."""

    __slots__ = __match_args__ = ("code", "text", "id")

    def __init__(self, code: str, text: str, id: str | None = None) -> None:
        self.code = code
        self.text = text
        self.id = id


class Fatal(Value):
    """The peer sent something that ends the conversation (wrong version)."""

    __slots__ = __match_args__ = ("code", "text")

    def __init__(self, code: str, text: str) -> None:
        self.code = code
        self.text = text


class Closed(Value):
    """The peer closed its end."""

    __slots__ = __match_args__ = ()


class Refuse(Value):
    """A telnet client asked for options: these bytes refuse them (sent as they are)."""

    __slots__ = __match_args__ = ("reply",)

    def __init__(self, reply: bytes) -> None:
        self.reply = reply


Request = Auth | Hello | Say | Nick | Who | Help | Quit | Invalid | Fatal | Closed | Refuse

# ---- frames: from the server to peers ------------------------------------


class Message(Value):
    """One chat line as the room recorded it."""

    __slots__ = __match_args__ = ("seq", "time", "sender", "text", "origin", "id")

    def __init__(
        self,
        seq: int,
        time: float,  # seconds since the epoch, when the server accepted it
        sender: str,
        text: str,
        origin: str = "",  # the sender's session token: not sent, keeps replays from echoing
        id: str = "",  # the sender's own message id (structured clients): dedupe after a restart
    ) -> None:
        self.seq = seq
        self.time = time
        self.sender = sender
        self.text = text
        self.origin = origin
        self.id = id


class Chat(Value):
    __slots__ = __match_args__ = ("message", "replay")

    def __init__(self, message: Message, replay: bool = False) -> None:
        self.message = message
        self.replay = replay  # sent again from history to a resuming client


class Welcome(Value):
    __slots__ = __match_args__ = (
        "name",
        "history_id",
        "seq",
        "max_line",
        "server",
        "member",
        "session",
    )

    def __init__(
        self,
        name: str,
        history_id: str,
        seq: int,  # sequence number of the newest message in history (0: none)
        max_line: int,
        server: str,
        member: bool = True,
        session: str | None = None,  # present it in a later hello to resume
    ) -> None:
        self.name = name
        self.history_id = history_id
        self.seq = seq
        self.max_line = max_line
        self.server = server
        self.member = member
        self.session = session


class Gap(Value):
    """A resuming client cannot get everything it missed."""

    __slots__ = __match_args__ = ("reason", "missed", "text")

    def __init__(self, reason: str, missed: int | None, text: str) -> None:
        self.reason = reason  # "overflow": history too short; "new_history": it restarted
        self.missed = missed  # how many messages are lost for good, when known
        self.text = text


class Notice(Value):
    __slots__ = __match_args__ = ("text", "code")

    def __init__(self, text: str, code: str = "info") -> None:
        self.text = text
        self.code = code


class Presence(Value):
    """Coalesced joins and leaves: names are samples, counts are totals."""

    __slots__ = __match_args__ = ("joined", "joined_count", "left", "left_count")

    def __init__(
        self, joined: tuple[str, ...], joined_count: int, left: tuple[str, ...], left_count: int
    ) -> None:
        self.joined = joined
        self.joined_count = joined_count
        self.left = left
        self.left_count = left_count


class Renamed(Value):
    __slots__ = __match_args__ = ("old", "new")

    def __init__(self, old: str, new: str) -> None:
        self.old = old
        self.new = new


class Names(Value):
    __slots__ = __match_args__ = ("names", "count", "id")

    def __init__(self, names: tuple[str, ...], count: int, id: str | None = None) -> None:
        self.names = names
        self.count = count
        self.id = id


class Ack(Value):
    __slots__ = __match_args__ = ("id", "seq")

    def __init__(self, id: str, seq: int) -> None:
        self.id = id
        self.seq = seq


class Error(Value):
    __slots__ = __match_args__ = ("code", "text", "id")

    def __init__(self, code: str, text: str, id: str | None = None) -> None:
        self.code = code
        self.text = text
        self.id = id


class Bye(Value):
    __slots__ = __match_args__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


Frame = Chat | Welcome | Notice | Presence | Renamed | Names | Ack | Error | Bye | Gap
