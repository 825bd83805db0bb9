"""The room: names, presence coalescing, numbered bounded history."""

from __future__ import annotations

import pytest

from picchat.events import Chat, Error, Message, Names, Presence, Renamed
from picchat.room import NAME_MAX, PRESENCE_SAMPLE, WHO_SAMPLE, Deliver, Room, name_problem


def recipients(room: Room, d: Deliver) -> set[int]:
    """The members a delivery reaches."""
    targets = d.to if d.to is not None else tuple(room.members())
    return {m for m in targets if m != d.exclude}


def settled_room(n: int, history_limit: int = 100) -> Room:
    """A room with members 1..n whose joins were announced already."""
    room = Room("h1", history_limit)
    for mid in range(1, n + 1):
        room.join(mid)
    room.take_presence()
    return room


# ---- names -------------------------------------------------------------------------


def test_guest_names_count_up():
    room = Room("h1", 10)
    assert [room.join(mid) for mid in (10, 20, 30)] == ["guest1", "guest2", "guest3"]
    assert room.name_of(20) == "guest2"
    assert len(room) == 3
    assert 30 in room
    assert 40 not in room


def test_guest_names_skip_a_taken_name():
    room = Room("h1", 10)
    assert room.join(1) == "guest1"
    room.rename(1, "guest2")
    assert room.join(2) == "guest3"


def test_guest_names_skip_a_name_taken_in_another_case():
    room = Room("h1", 10)
    room.join(1)
    room.rename(1, "GUEST2")
    assert room.join(2) == "guest3"


def test_guest_number_is_not_reused_after_a_leave():
    room = Room("h1", 10)
    room.join(1)
    room.leave(1)
    assert room.join(2) == "guest2"


def test_joining_twice_is_a_bug():
    room = Room("h1", 10)
    room.join(1)
    with pytest.raises(ValueError):
        room.join(1)


def test_rename_announced_member_tells_everyone():
    room = settled_room(3)
    out = room.rename(2, "alice", "n1")
    assert len(out) == 1
    assert out[0].frame == Renamed("guest2", "alice")
    assert recipients(room, out[0]) == {1, 2, 3}
    assert room.name_of(2) == "alice"


def test_rename_before_the_join_is_announced_tells_only_the_renamer():
    room = settled_room(2)
    room.join(3)
    out = room.rename(3, "carol")
    assert [(d.frame, recipients(room, d)) for d in out] == [(Renamed("guest3", "carol"), {3})]
    # and the join is announced under the new name
    [d] = room.take_presence()
    assert d.frame.joined == ("carol",)


def test_rename_to_a_name_taken_in_any_case_is_refused_to_the_renamer_only():
    room = settled_room(2)
    room.rename(1, "alice")
    for attempt in ("alice", "ALICE", "Alice"):
        out = room.rename(2, attempt, "n2")
        assert len(out) == 1
        assert isinstance(out[0].frame, Error)
        assert out[0].frame.code == "name_taken"
        assert out[0].frame.id == "n2"
        assert recipients(room, out[0]) == {2}
    assert room.name_of(2) == "guest2"


def test_rename_frees_the_old_name():
    room = settled_room(2)
    room.rename(1, "alice")
    out = room.rename(2, "guest1")
    assert out[0].frame == Renamed("guest2", "guest1")


def test_rename_to_another_case_of_ones_own_name_is_allowed():
    room = settled_room(1)
    room.rename(1, "alice")
    [d] = room.rename(1, "Alice")
    assert d.frame == Renamed("alice", "Alice")


@pytest.mark.parametrize(
    "bad",
    ["", "two words", "tab\there", "x" * (NAME_MAX + 1), "a:b", "/slash", "*star", "!bang",
     "#hash", "@at", "esc\x1b[31m", "nul\x00"],
)  # fmt: skip
def test_rename_to_an_invalid_name_is_bad_name(bad):
    room = settled_room(2)
    out = room.rename(1, bad, "n1")
    assert len(out) == 1
    assert isinstance(out[0].frame, Error)
    assert out[0].frame.code == "bad_name"
    assert out[0].frame.id == "n1"
    assert recipients(room, out[0]) == {1}
    assert room.name_of(1) == "guest1"


def test_rename_to_the_same_name_is_refused_as_bad_name():
    room = settled_room(1)
    [d] = room.rename(1, "guest1")
    assert isinstance(d.frame, Error)
    assert d.frame.code == "bad_name"


def test_rename_to_the_same_name_containing_taken_is_still_bad_name():
    room = settled_room(1)
    room.rename(1, "mistaken")
    [d] = room.rename(1, "mistaken")
    assert isinstance(d.frame, Error)
    assert d.frame.code == "bad_name"


def test_name_problem_accepts_ordinary_names():
    for name in ("alice", "x" * NAME_MAX, "Ünïcødé", "日本", "a-b_c.d", "bob!"):
        assert name_problem(name) is None, name


# ---- presence -------------------------------------------------------------------------


def test_three_joins_are_one_presence_for_everyone():
    """The newcomers get the summary too: it tells them who else arrived."""
    room = settled_room(2)
    for mid in (3, 4, 5):
        room.join(mid)
    assert room.presence_pending
    assert room.pending_joins() == [3, 4, 5]
    out = room.take_presence()
    assert len(out) == 1
    assert out[0].frame == Presence(("guest3", "guest4", "guest5"), 3, (), 0)
    assert recipients(room, out[0]) == {1, 2, 3, 4, 5}
    assert not room.presence_pending
    assert room.take_presence() == []


def test_a_lone_newcomer_is_not_told_of_its_own_arrival():
    room = settled_room(2)
    room.join(3)
    [d] = room.take_presence()
    assert d.frame.joined_count == 1
    assert recipients(room, d) == {1, 2}


def test_join_and_leave_in_one_window_is_not_announced():
    room = settled_room(2)
    room.join(3)
    room.leave(3)
    assert not room.presence_pending
    assert room.take_presence() == []


def test_leaves_are_announced_to_everyone_left():
    room = settled_room(4)
    room.leave(2)
    room.leave(3)
    [d] = room.take_presence()
    assert d.frame == Presence((), 0, ("guest2", "guest3"), 2)
    assert recipients(room, d) == {1, 4}


def test_joins_and_leaves_in_one_window_make_one_line():
    room = settled_room(2)
    room.leave(2)
    room.join(3)
    out = room.take_presence()
    assert len(out) == 1
    assert out[0].frame == Presence(("guest3",), 1, ("guest2",), 1)
    # the newcomer is told who left
    assert recipients(room, out[0]) == {1, 3}


def test_a_thousand_joins_make_one_capped_frame():
    room = settled_room(1)
    for mid in range(2, 1002):
        room.join(mid)
    out = room.take_presence()
    assert len(out) == 1
    p = out[0].frame
    assert isinstance(p, Presence)
    assert p.joined_count == 1000
    assert len(p.joined) == PRESENCE_SAMPLE
    assert p.joined == tuple(f"guest{i}" for i in range(2, 2 + PRESENCE_SAMPLE))
    assert recipients(room, out[0]) == set(range(1, 1002))


def test_a_thousand_leaves_make_one_capped_frame():
    room = settled_room(1001)
    for mid in range(2, 1002):
        room.leave(mid)
    [d] = room.take_presence()
    assert d.frame.left_count == 1000
    assert len(d.frame.left) == PRESENCE_SAMPLE
    assert recipients(room, d) == {1}


def test_two_newcomers_learn_of_each_other():
    room = Room("h1", 10)
    room.join(1)
    room.join(2)
    [d] = room.take_presence()
    assert d.frame == Presence(("guest1", "guest2"), 2, (), 0)
    assert recipients(room, d) == {1, 2}


# ---- messages and history ------------------------------------------------------------


def test_post_numbers_messages_from_one():
    room = settled_room(3)
    seqs = []
    for i in range(3):
        msg, out = room.post("guest1", f"m{i}", 100.0 + i, exclude=1)
        seqs.append(msg.seq)
        assert msg == Message(i + 1, 100.0 + i, "guest1", f"m{i}")
        assert [d.frame for d in out] == [Chat(msg)]
        assert recipients(room, out[0]) == {2, 3}
    assert seqs == [1, 2, 3]
    assert room.seq == 3


def test_post_without_exclude_reaches_every_member():
    room = settled_room(3)
    _, [d] = room.post("fifo", "hello", 1.0)
    assert recipients(room, d) == {1, 2, 3}


def test_history_is_bounded_and_drops_the_oldest():
    room = settled_room(1, history_limit=3)
    for i in range(5):
        room.post("guest1", f"m{i}", float(i))
    assert [m.seq for m in room.history] == [3, 4, 5]
    assert [m.text for m in room.history] == ["m2", "m3", "m4"]
    assert room.seq == 5


def test_set_history_limit_keeps_the_newest():
    room = settled_room(1, history_limit=10)
    for i in range(6):
        room.post("guest1", f"m{i}", float(i))
    room.set_history_limit(2)
    assert [m.seq for m in room.history] == [5, 6]
    room.post("guest1", "again", 9.0)
    assert [m.seq for m in room.history] == [6, 7]


def test_names_lists_members_with_count():
    room = settled_room(3)
    room.rename(2, "bob")
    assert room.names("q1") == Names(("guest1", "bob", "guest3"), 3, "q1")


def test_names_is_capped_at_who_sample():
    room = settled_room(WHO_SAMPLE + 5)
    names = room.names()
    assert names.count == WHO_SAMPLE + 5
    assert len(names.names) == WHO_SAMPLE
    assert names.names[0] == "guest1"
    assert names.id is None


def test_reserved_names_cannot_be_taken():
    room = Room("h", 10, reserved=("cron",))
    room.join(1)
    [d] = room.rename(1, "CRON")
    assert d.frame.code == "bad_name" and "reserved" in d.frame.text
    [d] = room.rename(1, "server")
    assert d.frame.code == "bad_name" and "console" in d.frame.text
    assert room.name_of(1) == "guest1"
