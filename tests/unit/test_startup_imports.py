"""A server started with the defaults imports only what it uses (start-up time and memory)."""

from __future__ import annotations

import json
import subprocess
import sys

# Started in a fresh interpreter: what this test process imported does not count.
DRIVER = """
import json, sys
from picchat.cli import server_parser
from picchat.config import load
from picchat.server import Server

args = vars(server_parser().parse_args(sys.argv[1:]))
server = Server(load(cli=args, env={}))
server.start()
server.close()
print(json.dumps(sorted(sys.modules)))
"""

NOT_AT_START = [
    "argparse",  # the server's options are read from the settings table
    "dataclasses",
    "hashlib",  # OpenSSL's libcrypto: megabytes
    "logging",  # picchat.logs is its own small logger
    "picchat.endpoints.console",
    "picchat.endpoints.serial",
    "picchat.store",
    "serial",
    "ssl",
    "tomllib",
    "typing",
]


def started_with(*argv: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", DRIVER, "--port", "0", "--socket", "off", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    return set(json.loads(out.splitlines()[-1]))


def test_a_default_start_imports_none_of_the_optional_parts():
    modules = started_with("--console", "off")
    assert "picchat.hub" in modules  # the driver did start a server
    assert sorted(set(NOT_AT_START) & modules) == []


def test_a_state_directory_brings_in_the_store(tmp_path):
    modules = started_with("--console", "off", "--state-dir", str(tmp_path / "state"))
    assert "picchat.store" in modules
    assert "hashlib" not in modules and "logging" not in modules
