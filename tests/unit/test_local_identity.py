"""On the Unix socket a sender's name is tied to the local user (SO_PEERCRED)."""

from __future__ import annotations

import json

import pytest

from picchat import logs
from picchat.hub import Hub
from picchat.protocol import encode_hello


def hub() -> Hub:
    return Hub(history_id="h", history_limit=10, max_line=512, max_queue=65536, log_chat=False)


def reply(h: Hub, cid: int) -> dict:
    lines = bytes(h.output(cid)).splitlines()
    line = next(x for x in lines if x.startswith(b"PICCHAT/"))
    return json.loads(line.split(b" ", 1)[1])


@pytest.mark.parametrize("name", ["pi", "pi@raspberrypi", "pi@backup"])
def test_a_local_user_posts_under_its_own_name(name):
    h = hub()
    h.open(1, "local uid 1000 pid 5", "unix", user="pi")
    h.receive(1, encode_hello(name, member=False), 0.0)
    assert reply(h, 1)["type"] == "welcome"


@pytest.mark.parametrize("name", ["root", "alice", "alice@pi", "pix"])
def test_a_local_user_cannot_pose_as_another(name):
    h = hub()
    h.open(1, "local uid 1000 pid 5", "unix", user="pi")
    h.receive(1, encode_hello(name, member=False), 0.0)
    frame = reply(h, 1)
    assert frame["type"] == "error" and frame["code"] == "bad_name"
    assert "user pi posts as pi" in frame["text"]
    assert h.peers[1].closing  # closed once the error is sent


def test_root_and_tcp_may_use_any_name():
    h = hub()
    h.open(1, "local uid 0 pid 5", "unix", user=None)
    h.receive(1, encode_hello("cron", member=False), 0.0)
    assert reply(h, 1)["type"] == "welcome"
    h.open(2, "127.0.0.1:4000", "tcp")
    h.receive(2, encode_hello("anyone", member=False), 0.0)
    assert reply(h, 2)["type"] == "welcome"


def test_a_sender_without_a_name_gets_its_user_name():
    h = hub()
    h.open(1, "local uid 1000 pid 5", "unix", user="pi")
    h.receive(1, encode_hello(None, member=False), 0.0)
    assert reply(h, 1)["name"] == "pi"


def test_notice_is_journal_priority_5():
    assert logs.SYSLOG_PRIORITY[logs.NOTICE] == 5
    assert logs.LEVEL_NAMES[logs.NOTICE] == "NOTICE"
    assert logs.INFO < logs.NOTICE < logs.WARNING
