"""The benchmark's load generator counts what it receives correctly.

bench/loadgen.py checks a chunk of lines in bulk when it is clean and falls
back to line by line otherwise; both must give the same counts, or the
benchmark's loss, duplicate, corruption and order columns would be wrong.
"""

import sys
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import loadgen

BASE = 7 * loadgen.ID_SPAN
MESSAGES = 50


def conn(proto: str = "plain", index: int = 3) -> loadgen.Conn:
    return loadgen.Conn(proto, index, None, True)  # type: ignore[arg-type]


PAYLOADS: dict[tuple[int, int], bytes] = {}


def sent(t: loadgen.Tally, senders: int = 3) -> loadgen.Tally:
    """t, told of every payload the senders send (as the generator's senders do)."""
    for s in range(senders):
        for q in range(MESSAGES + 1):
            PAYLOADS[s, q] = t.payload(s, q)
    return t


def line(sender: int, seq: int, prefix: bytes = b"c0: ", end: bytes = b"\n") -> bytes:
    return prefix + PAYLOADS[sender, seq] + end


def counts(c: loadgen.Conn) -> tuple:
    return c.got, c.dups, c.corrupt, c.order


def tally(sample: int = 1, talkers: bool = False) -> loadgen.Tally:
    t = sent(loadgen.Tally(BASE, MESSAGES, talkers, sample))
    t.timing = True
    return t


def test_a_receiver_then_follows_the_senders_stream_exactly() -> None:
    t, c = tally(), conn()
    t.receive(c, line(0, 0) + line(0, 1), 0)
    assert c.stream is not None and c.stream.prefix == b"c0: "
    t.receive(c, line(0, 2) + line(0, 3), 0)
    assert counts(c) == (4, 0, 0, 0)
    assert t.lat_ns[2:] == [-t.stamps[0][2], -t.stamps[0][3]]
    # one digit changed in the payload: not what was sent, and its checksum says so
    bad = line(0, 4).replace(b"~B~%d:4:" % BASE, b"~B~%d:4:1" % BASE)
    t.receive(c, bad + line(0, 5), 0)
    assert counts(c) == (5, 0, 1, 0)
    # a message the server lost: the rest still count, nothing is out of order
    t.receive(c, line(0, 7) + line(0, 8), 0)
    t.receive(c, line(0, 9), 0)
    assert counts(c) == (8, 0, 1, 0)


def test_a_clean_chunk_counts_every_line_and_its_latency() -> None:
    t, c = tally(), conn()
    t.receive(c, b"".join(line(0, q) for q in range(10)), 0)
    assert counts(c) == (10, 0, 0, 0)
    assert len(t.lat_ns) == 10
    assert all(v < 0 for v in t.lat_ns)  # received "at 0", sent later on the monotonic clock


def test_a_chunk_seen_twice_counts_duplicates() -> None:
    t, c = tally(), conn()
    chunk = b"".join(line(0, q) for q in range(5))
    t.receive(c, chunk, 0)
    t.receive(c, chunk, 0)
    assert counts(c) == (5, 5, 0, 0)


def test_a_step_back_is_an_order_violation() -> None:
    t, c = tally(), conn()
    t.receive(c, line(0, 5) + line(0, 6), 0)
    t.receive(c, line(0, 3) + line(0, 7), 0)
    assert counts(c) == (4, 0, 0, 1)


def test_a_prefix_inside_a_line_is_corruption() -> None:
    t, c = tally(), conn()
    good = line(0, 1)
    cut = good[:20] + b"<user4> " + good[20:]
    t.receive(c, line(0, 0) + cut + line(0, 2), 0)
    assert counts(c) == (2, 0, 1, 0)
    assert "<user4>" in t.corrupt_sample


def test_a_wrong_checksum_is_corruption() -> None:
    t, c = tally(), conn()
    bad = line(0, 1).replace(b":" + loadgen.PAD + b":", b":" + loadgen.PAD + b":0", 1)[:-2]
    t.receive(c, line(0, 0) + bad + b"\n", 0)
    assert counts(c) == (1, 0, 1, 0)


def test_another_runs_lines_are_foreign_not_counted() -> None:
    t, c = tally(), conn()
    other = b"x: " + loadgen.make_payload(BASE + loadgen.ID_SPAN + 1, 0) + b"\n"
    t.receive(c, other + line(0, 0), 0)
    assert counts(c) == (1, 0, 0, 0)
    assert t.foreign == 1


def test_irc_lines_and_a_ping_are_answered() -> None:
    t, c = tally(), conn("irc")
    prefix = b":c0!c0@127.0.0.1 PRIVMSG #bench :"
    t.receive(c, b"PING :srv\r\n" + line(0, 0, prefix, b"\r\n") + line(0, 1, prefix, b"\r\n"), 0)
    assert counts(c) == (2, 0, 0, 0)
    assert bytes(c.outbuf) == b"PONG :srv\r\n"


def test_mqtt_publishes_are_taken_whole_and_counted() -> None:
    t, c = tally(), conn("mqtt")
    packets = b"".join(
        loadgen.mqtt_packet(0x30, loadgen.mqtt_str(b"bench") + loadgen.make_payload(BASE, q))
        for q in range(3)
    )
    c.inbuf += packets[:-5]
    t.receive(c, c.take(), 0)
    assert counts(c) == (2, 0, 0, 0)
    c.inbuf += packets[-5:]
    t.receive(c, c.take(), 0)
    assert counts(c) == (3, 0, 0, 0)


def test_take_keeps_a_partial_line_for_later() -> None:
    c, whole = conn(), line(0, 0)
    c.inbuf += whole + b"c0: ~B~12"
    assert c.take() == whole
    assert bytes(c.inbuf) == b"c0: ~B~12"


def test_a_probe_from_another_client_makes_it_ready() -> None:
    t, c = tally(), conn(index=3)
    t.receive(c, b"c3: " + loadgen.PROBE + b"3\n", 0)
    assert not c.ready  # its own probe
    t.receive(c, b"c0: " + loadgen.PROBE + b"0\n" + line(0, 0), 0)
    assert c.ready
    assert counts(c) == (1, 0, 0, 0)


# Each chunk: which lines (sender, and seq, or None for that sender's next one:
# runs of those continue a stream), and whether one line is cut by a prefix.
chunks = st.lists(
    st.tuples(
        st.lists(
            st.tuples(
                st.sampled_from([0, 0, 0, 0, 1, 2]),
                st.one_of(st.none(), st.none(), st.none(), st.integers(0, MESSAGES)),
            ),
            min_size=1,
            max_size=8,
        ),
        st.integers(0, 5),
    ),
    max_size=12,
)


@settings(max_examples=300, deadline=None)
@given(chunks, st.sampled_from([1, 3]), st.booleans())
def test_bulk_and_line_by_line_count_the_same(script: list, sample: int, talkers: bool) -> None:
    # talkers: the receiver is client 1, a sender too; its own lines are echoes to skip
    bulk, bulk_c = tally(sample, talkers), conn(index=1)
    slow, slow_c = loadgen.Tally(BASE, MESSAGES, talkers, sample), conn(index=1)
    slow.timing = True
    nxt = [0, 0, 0]
    for items, cut in script:
        lines = []
        for s, q in items:
            if q is None:
                q = nxt[s] = min(nxt[s], MESSAGES)
                nxt[s] += 1
            lines.append(line(s, q))
        text = b"".join(lines)
        if cut == 0:  # one chunk in six: a prefix cuts its first line
            text = text[:15] + b"<user9> " + text[15:]
        elif cut == 1:  # or its last checksum is wrong
            text = text[:-3] + (b"0" if text[-3:-2] != b"0" else b"1") + text[-2:]
        bulk.receive(bulk_c, text, 0)
        slow.lines(slow_c, text, 0)
    assert counts(bulk_c) == counts(slow_c)
    assert bulk.foreign == slow.foreign
    assert sorted(bulk.lat_ns) == sorted(slow.lat_ns)
    assert bulk_c.last == slow_c.last


def test_a_damaged_echo_of_its_own_line_is_still_corruption() -> None:
    t, c = tally(talkers=True), conn(index=1)
    own = line(1, 0)
    t.receive(c, own, 0)
    assert counts(c) == (0, 0, 0, 0)  # its own line, echoed (MQTT): skipped
    t.receive(c, own[:-3] + (b"0" if own[-3:-2] != b"0" else b"1") + own[-2:], 0)
    assert counts(c) == (0, 0, 1, 0)
