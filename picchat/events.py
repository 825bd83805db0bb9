"""The vocabulary of picchat: what a peer asks for and what the server sends.

Plain value objects only. ``protocol`` turns bytes into requests and frames
into bytes (once per wire format); ``room`` decides who gets which frame.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# ---- requests: from a peer to the server ---------------------------------


@dataclass(frozen=True, slots=True)
class Hello:
    """First line of a structured connection."""

    version: int
    name: str | None = None
    member: bool = True  # False: a one-shot sender such as picchat-send
    client: str = ""
    session: str | None = None  # token from an earlier welcome: resume that session
    resume: Resume | None = None


@dataclass(frozen=True, slots=True)
class Resume:
    """The last message a reconnecting client saw: replay what came after."""

    history_id: str
    seq: int


@dataclass(frozen=True, slots=True)
class Auth:
    """``/auth TOKEN``: the first line where the server asks for a token."""

    token: bytes = field(repr=False)  # never in a log or a traceback


@dataclass(frozen=True, slots=True)
class Say:
    text: str
    id: str | None = None  # the client's own message id, echoed in the ack


@dataclass(frozen=True, slots=True)
class Nick:
    name: str
    id: str | None = None


@dataclass(frozen=True, slots=True)
class Who:
    id: str | None = None


@dataclass(frozen=True, slots=True)
class Help:
    pass


@dataclass(frozen=True, slots=True)
class Quit:
    pass


@dataclass(frozen=True, slots=True)
class Invalid:
    """The peer sent something we cannot accept; it is told, and stays."""

    code: str
    text: str
    id: str | None = None


@dataclass(frozen=True, slots=True)
class Fatal:
    """The peer sent something that ends the conversation (wrong version)."""

    code: str
    text: str


@dataclass(frozen=True, slots=True)
class Closed:
    """The peer closed its end."""


Request = Auth | Hello | Say | Nick | Who | Help | Quit | Invalid | Fatal | Closed

# ---- frames: from the server to peers ------------------------------------


@dataclass(frozen=True, slots=True)
class Message:
    """One chat line as the room recorded it."""

    seq: int
    time: float  # seconds since the epoch, when the server accepted it
    sender: str
    text: str
    origin: str = ""  # the sender's session token: not sent, keeps replays from echoing
    id: str = ""  # the sender's own message id (structured clients): for dedupe after a restart


@dataclass(frozen=True, slots=True)
class Chat:
    message: Message
    replay: bool = False  # sent again from history to a resuming client


@dataclass(frozen=True, slots=True)
class Welcome:
    name: str
    history_id: str
    seq: int  # sequence number of the newest message in history (0: none)
    max_line: int
    server: str
    member: bool = True
    session: str | None = None  # present it in a later hello to resume


@dataclass(frozen=True, slots=True)
class Gap:
    """A resuming client cannot get everything it missed."""

    reason: str  # "overflow": history too short; "new_history": the server's history restarted
    missed: int | None  # how many messages are lost for good, when known
    text: str


@dataclass(frozen=True, slots=True)
class Notice:
    text: str
    code: str = "info"


@dataclass(frozen=True, slots=True)
class Presence:
    """Coalesced joins and leaves: names are samples, counts are totals."""

    joined: tuple[str, ...]
    joined_count: int
    left: tuple[str, ...]
    left_count: int


@dataclass(frozen=True, slots=True)
class Renamed:
    old: str
    new: str


@dataclass(frozen=True, slots=True)
class Names:
    names: tuple[str, ...]
    count: int
    id: str | None = None


@dataclass(frozen=True, slots=True)
class Ack:
    id: str
    seq: int


@dataclass(frozen=True, slots=True)
class Error:
    code: str
    text: str
    id: str | None = None


@dataclass(frozen=True, slots=True)
class Bye:
    text: str


Frame = Chat | Welcome | Notice | Presence | Renamed | Names | Ack | Error | Bye | Gap
