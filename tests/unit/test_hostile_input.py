"""Whatever a peer sends, the hub neither raises nor lets it reach others unsafely.

These run the whole sans-IO path (framing, protocol, room, hub, encoding) on
arbitrary input, with another member of each wire format listening.
"""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from picchat.hub import Hub
from picchat.protocol import encode_hello

UNSAFE = set(range(0x00, 0x09)) | set(range(0x0B, 0x20)) | {0x7F}


def make_hub() -> Hub:
    hub = Hub(history_id="h", history_limit=50, max_line=256, max_queue=1 << 20, log_chat=False)
    hub.open(1, "listener-plain")
    hub.receive(1, b"/who\n", 0.0)
    hub.open(2, "listener-json")
    hub.receive(2, encode_hello("json-listener"), 0.0)
    for cid in (1, 2):
        hub.output(cid).clear()
    return hub


def check_output(hub: Hub) -> None:
    for cid in (1, 2):
        if cid not in hub.peers:
            continue
        data = bytes(hub.output(cid))
        text = data.decode("utf-8")  # always valid UTF-8
        for line in data.split(b"\n"):
            assert not set(line) & UNSAFE, line
            assert b"\x1b" not in line
        assert not any(0x80 <= ord(c) <= 0x9F for c in text)
        if cid == 2:
            for line in data.splitlines():
                if not line.startswith(b"PICCHAT/"):
                    json.loads(line)  # every structured line is JSON


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text() | st.floats(allow_nan=False),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)
frames = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(["msg", "nick", "who", "quit", "bogus"]) | st.text(max_size=5),
        "id": json_values,
        "text": json_values,
        "name": json_values,
    },
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=6))
def test_plain_peer_any_bytes(chunks):
    hub = make_hub()
    hub.open(3, "attacker")
    for chunk in chunks:
        hub.receive(3, chunk, 1.0)
    hub.take_presence()
    check_output(hub)


@settings(max_examples=300, deadline=None)
@given(st.lists(frames, max_size=6), st.booleans())
def test_structured_peer_any_frames(objs, member):
    hub = make_hub()
    hub.open(3, "attacker")
    hub.receive(3, encode_hello("attacker", member=member), 1.0)
    for obj in objs:
        # ensure_ascii=True writes lone surrogates as \ud800 escapes, as an attacker would
        hub.receive(3, json.dumps(obj).encode() + b"\n", 1.0)
    check_output(hub)


def test_lone_surrogates_in_json_become_replacement_characters():
    hub = make_hub()
    hub.open(3, "attacker")
    hub.receive(3, encode_hello("attacker"), 1.0)
    hub.output(3).clear()
    hub.receive(3, b'{"type":"msg","id":"1","text":"a\\ud800b"}\n', 1.0)
    assert bytes(hub.output(1)).decode().endswith("a\ufffdb\n")
    hub.receive(3, b'{"type":"who","id":"\\udc80"}\n', 1.0)
    reply = json.loads(bytes(hub.output(3)).splitlines()[-1])
    assert reply["type"] == "error" and reply["code"] == "bad_frame"


def test_invalid_utf8_in_a_json_frame_is_replaced_not_refused():
    hub = make_hub()
    hub.open(3, "attacker")
    hub.receive(3, encode_hello("attacker"), 1.0)
    hub.output(3).clear()
    hub.receive(3, b'{"type":"msg","id":"1","text":"caf\xff"}\n', 1.0)
    ack = json.loads(bytes(hub.output(3)).splitlines()[-1])
    assert ack == {"type": "ack", "id": "1", "seq": 1}
    assert bytes(hub.output(1)).decode().endswith("attacker: caf\ufffd\n")
