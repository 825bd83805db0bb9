"""The chat room: members, names, numbered bounded history, presence.

Pure state: no I/O, no clock (times are passed in), no randomness (the history
id is passed in). Every method returns the deliveries it decided on; the hub
turns them into bytes, once per wire format.

Invariants:
- member names are unique, compared case-insensitively (casefold);
- sequence numbers start at 1 for a history id and grow by one per message;
- history holds at most ``history_limit`` messages (oldest dropped first);
- joins and leaves are not announced one by one: they accumulate until
  ``take_presence`` (called at most once per presence interval) sums them up
  in one line for every member, and a member that came and went in between is
  not mentioned.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator

from .events import Chat, Error, Frame, Message, Names, Presence, Renamed, Value

NAME_MAX = 32  # characters
CONSOLE_NAME = "Server"  # the server's own terminal; nobody else may take it
PRESENCE_SAMPLE = 10  # names shown in one presence line; the rest are counted
WHO_SAMPLE = 200  # names shown by /who; the rest are counted


class Deliver(Value):
    """Send ``frame`` to the members in ``to`` (None: every member) but ``exclude``."""

    __slots__ = ("frame", "to", "exclude")
    __match_args__ = ("frame", "to", "exclude")

    def __init__(
        self, frame: Frame, to: tuple[int, ...] | None = None, exclude: int | None = None
    ) -> None:
        self.frame = frame
        self.to = to
        self.exclude = exclude


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a name, or None if it can."""
    if not name:
        return "a name cannot be empty"
    if len(name) > NAME_MAX:
        return f"a name has at most {NAME_MAX} characters"
    if not name.isprintable() or any(c.isspace() for c in name):
        return "a name cannot contain spaces or control characters"
    if ":" in name:
        return "a name cannot contain ':'"
    if name[0] in "/*!#@":
        return "a name cannot start with / * ! # or @"
    if name.casefold() == CONSOLE_NAME.casefold():
        return f"the name {CONSOLE_NAME} belongs to the server's own console"
    return None


class Room:
    __slots__ = (
        "history_id",
        "history",
        "seq",
        "_names",  # member id -> name
        "_owners",  # casefolded name -> member id
        "_guest_counter",
        "_joined",  # member ids whose join is not announced yet
        "_left",  # names of members who left, not announced yet
        "reserved",
    )

    def __init__(self, history_id: str, history_limit: int, reserved: tuple[str, ...] = ()) -> None:
        self.history_id = history_id
        self.reserved = {n.casefold() for n in reserved}  # e.g. the FIFO's sender name
        self.history: deque[Message] = deque(maxlen=max(1, history_limit))
        self.seq = 0
        self._names: dict[int, str] = {}
        self._owners: dict[str, int] = {}
        self._guest_counter = 0
        self._joined: dict[int, bool] = {}  # in order of arrival -> held back once
        self._left: list[str] = []

    # ---- membership ------------------------------------------------------

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, mid: int) -> bool:
        return mid in self._names

    def members(self) -> Iterator[int]:
        return iter(self._names)

    def name_of(self, mid: int) -> str:
        return self._names[mid]

    def restore(self, messages: list[Message]) -> None:
        """History read back from disk at start (contiguous, oldest first)."""
        self.history.extend(messages)
        if messages:
            self.seq = messages[-1].seq

    def set_history_limit(self, limit: int) -> None:
        self.history = deque(self.history, maxlen=max(1, limit))

    def transfer(self, old: int, new: int) -> None:
        """Member ``new`` takes over ``old``'s place and name, silently.

        A client that reconnects before the server noticed its old connection
        die: nobody should see it leave and come back, and ``new``'s own
        provisional guest entry goes too.
        """
        if new in self._names:
            name = self._names.pop(new)
            del self._owners[name.casefold()]
            self._joined.pop(new, None)
        name = self._names.pop(old)
        self._names[new] = name
        self._owners[name.casefold()] = new
        if old in self._joined:
            self._joined[new] = self._joined.pop(old)

    def join(self, mid: int, name: str | None = None, announce: bool = True) -> str:
        """Add a member under ``name`` (unchecked: for the server's own console)
        or else the next free guest name; returns that name."""
        if mid in self._names:
            raise ValueError(f"member {mid} has joined already")
        if name is not None and name.casefold() in self._owners:
            raise ValueError(f"the name {name} is taken")
        while name is None:
            self._guest_counter += 1
            guest = f"guest{self._guest_counter}"
            if guest.casefold() not in self._owners:
                name = guest
        self._names[mid] = name
        key = name.casefold()
        # Guest names are their own casefold: keep one string, not two.
        self._owners[name if key == name else key] = mid
        if announce:
            self._joined[mid] = False
        return name

    def leave(self, mid: int) -> None:
        """Remove a member; its leave is announced with the next presence line."""
        name = self._names.pop(mid)
        del self._owners[name.casefold()]
        if mid in self._joined:  # came and went unannounced: say nothing
            del self._joined[mid]
        else:
            self._left.append(name)

    def rename(self, mid: int, name: str, id_: str | None = None) -> list[Deliver]:
        old = self._names[mid]
        code = "bad_name"
        problem = name_problem(name)
        if problem is None and name.casefold() in self.reserved:
            problem = f"the name {name} is reserved for messages from the server's inputs"
        if problem is None and name == old:
            problem = f"you are {old} already"
        if problem is None:
            owner = self._owners.get(name.casefold())
            if owner is not None and owner != mid:
                code = "name_taken"
                problem = f"the name {name} is taken; choose another with /nick NAME"
        if problem is not None:
            return [Deliver(Error(code, problem, id_), to=(mid,))]
        del self._owners[old.casefold()]
        self._names[mid] = name
        self._owners[name.casefold()] = mid
        frame = Renamed(old, name)
        if mid in self._joined:  # nobody was told about the old name yet
            return [Deliver(frame, to=(mid,))]
        return [Deliver(frame)]

    def names(self, id_: str | None = None) -> Names:
        sample = []
        for name in self._names.values():
            if len(sample) == WHO_SAMPLE:
                break
            sample.append(name)
        return Names(tuple(sample), len(self._names), id_)

    def take_presence(self, hold: Callable[[int], bool] | None = None) -> list[Deliver]:
        """Sum up the joins and leaves since the last call in one frame.

        ``hold(mid)`` true keeps a join for the next call, once: the hub holds
        back connections that have not said anything yet, so a sender that
        says hello just after a window closes is never announced.
        """
        announce = []
        for mid, held in self._joined.items():
            if hold is not None and not held and hold(mid):
                self._joined[mid] = True
            else:
                announce.append(mid)
        for mid in announce:
            del self._joined[mid]
        joined = [self._names[mid] for mid in announce]
        # Someone who left and came back under the same name within the
        # window (a reconnect) is no news either.
        back = {n.casefold() for n in joined} & {n.casefold() for n in self._left}
        if back:
            pairs = zip(announce, joined, strict=True)
            keep = [(m, n) for m, n in pairs if n.casefold() not in back]
            announce = [m for m, _ in keep]
            joined = [n for _, n in keep]
            self._left = [n for n in self._left if n.casefold() not in back]
        if not announce and not self._left:
            return []
        frame = Presence(
            tuple(joined[:PRESENCE_SAMPLE]),
            len(joined),
            tuple(self._left[:PRESENCE_SAMPLE]),
            len(self._left),
        )
        only_news = announce[0] if len(announce) == 1 and not self._left else None
        self._left.clear()
        # Everyone gets the summary (newcomers learn who else arrived), except
        # a lone newcomer whose own arrival is all there is to tell.
        return [Deliver(frame, exclude=only_news)]

    def message(self, seq: int) -> Message | None:
        """The message numbered ``seq``, if history still holds it."""
        if not self.history:
            return None
        index = seq - self.history[0].seq
        if 0 <= index < len(self.history):
            return self.history[index]
        return None

    @property
    def oldest_seq(self) -> int:
        """Number of the oldest message held (``seq + 1`` when history is empty)."""
        return self.history[0].seq if self.history else self.seq + 1

    def pending_joins(self) -> list[int]:
        """Members whose join is not announced yet, in order of arrival."""
        return list(self._joined)

    @property
    def presence_pending(self) -> bool:
        return bool(self._joined or self._left)

    # ---- messages --------------------------------------------------------

    def post(
        self,
        sender: str,
        text: str,
        now: float,
        exclude: int | None = None,
        origin: str = "",
        id_: str = "",
    ) -> tuple[Message, list[Deliver]]:
        """Record a message and deliver it to every member but ``exclude``."""
        self.seq += 1
        msg = Message(self.seq, now, sender, text, origin, id_)
        self.history.append(msg)
        return msg, [Deliver(Chat(msg), exclude=exclude)]
