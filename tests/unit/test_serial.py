"""The serial bridge's pure parts: its specification, the console/getty check,
and the hub's limited (drop-oldest) queue a serial line gets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from picchat import cli
from picchat.config import ConfigError, SerialSpec, load, parse_serial_spec
from picchat.endpoints.serial import console_conflict
from picchat.hub import Hub

# ---- DEVICE[,baud=N][,name=NAME][,mode=terminal|lines] -------------------------


def test_spec_defaults():
    spec = parse_serial_spec("/dev/ttyUSB0")
    assert spec == SerialSpec("/dev/ttyUSB0", 115200, "ttyUSB0", "terminal")


def test_spec_name_is_the_basename_of_the_device_as_given():
    # /dev/serial0 is a symlink on a Pi: the name is what the user wrote.
    assert parse_serial_spec("/dev/serial0").name == "serial0"
    assert parse_serial_spec("ttyACM0").name == "ttyACM0"


def test_spec_every_option():
    spec = parse_serial_spec("/dev/ttyACM0,baud=9600,name=arduino,mode=lines")
    assert spec == SerialSpec("/dev/ttyACM0", 9600, "arduino", "lines")
    spec = parse_serial_spec("/dev/serial0,mode=terminal,name=pi,baud=57600")
    assert spec == SerialSpec("/dev/serial0", 57600, "pi", "terminal")


@pytest.mark.parametrize("baud", ["50", "300", "115200", "921600", "4000000"])
def test_spec_baud_range(baud):
    assert parse_serial_spec(f"/dev/x,baud={baud}").baud == int(baud)


@pytest.mark.parametrize(
    "spec, words",
    [
        ("/dev/x,speed=9600", ["speed=9600", "baud=N"]),  # unknown option
        ("/dev/x,baud", ["baud", "baud=N"]),  # no value
        ("/dev/x,", ["baud=N"]),  # empty option
        ("/dev/x,baud=fast", ["baud"]),
        ("/dev/x,baud=-9600", ["baud"]),
        ("/dev/x,baud=9600.0", ["baud"]),
        ("/dev/x,baud=0", ["baud"]),
        ("/dev/x,baud=9600²", ["baud"]),  # str.isdigit() says yes, int() says no
        ("/dev/x,baud=99999999", ["baud"]),
        ("/dev/x,name=two words", ["name"]),
        ("/dev/x,name=a:b", ["name"]),
        ("/dev/x,name=Server", ["name", "Server"]),  # the console's name
        ("/dev/x,mode=raw", ["mode", "terminal", "lines"]),
        ("/dev/x,mode=", ["mode"]),
        (",baud=9600", ["no device"]),
        ("", ["no device"]),
    ],
)
def test_spec_errors_say_what_is_wrong(spec, words):
    with pytest.raises(ValueError) as err:
        parse_serial_spec(spec)
    for word in words:
        assert word in str(err.value), (spec, str(err.value))


def test_serial_is_repeatable_on_the_command_line():
    argv = ["--serial", "/dev/ttyUSB0", "--serial", "/dev/ttyACM0,baud=9600,mode=lines"]
    args = vars(cli.server_parser().parse_args(argv))
    assert args == {"serial": ["/dev/ttyUSB0", "/dev/ttyACM0,baud=9600,mode=lines"]}
    settings = load(cli=args, env={})
    assert settings.serial == ("/dev/ttyUSB0", "/dev/ttyACM0,baud=9600,mode=lines")


def test_serial_from_a_toml_list(tmp_path):
    path = tmp_path / "picchat.toml"
    path.write_text('serial = ["/dev/serial0,name=pi", "/dev/ttyACM0,mode=lines"]\n')
    settings = load(cli={}, env={}, config_path=str(path))
    assert settings.serial == ("/dev/serial0,name=pi", "/dev/ttyACM0,mode=lines")


def test_serial_from_the_environment_is_space_separated():
    env = {"PICCHAT_SERIAL": "/dev/serial0  /dev/ttyACM0,baud=9600,name=arduino"}
    settings = load(cli={}, env=env)
    assert settings.serial == ("/dev/serial0", "/dev/ttyACM0,baud=9600,name=arduino")


def test_serial_cli_replaces_environment_and_file(tmp_path):
    path = tmp_path / "picchat.toml"
    path.write_text('serial = ["/dev/a"]\n')
    env = {"PICCHAT_SERIAL": "/dev/b"}
    assert load(cli={}, env=env, config_path=str(path)).serial == ("/dev/b",)
    assert load(cli={"serial": ["/dev/c"]}, env=env, config_path=str(path)).serial == ("/dev/c",)


def test_serial_default_is_none_and_the_other_defaults():
    settings = load(cli={}, env={})
    assert settings.serial == ()
    assert settings.serial_force is False
    assert settings.serial_retry == 5.0
    assert settings.serial_queue == 16384


@pytest.mark.parametrize(
    "source",
    ["cli", "env", "toml"],
)
def test_a_bad_serial_spec_is_a_configuration_error_naming_the_source(tmp_path, source):
    bad = "/dev/ttyUSB0,baud=fast"
    if source == "cli":
        kwargs = {"cli": {"serial": ["/dev/ok", bad]}, "env": {}}
        where = "--serial"
    elif source == "env":
        kwargs = {"cli": {}, "env": {"PICCHAT_SERIAL": f"/dev/ok {bad}"}}
        where = "PICCHAT_SERIAL"
    else:
        path = tmp_path / "picchat.toml"
        path.write_text(f'serial = ["/dev/ok", "{bad}"]\n')
        kwargs = {"cli": {}, "env": {}, "config_path": str(path)}
        where = str(path)
    with pytest.raises(ConfigError) as err:
        load(**kwargs)
    text = str(err.value)
    assert where in text and "baud" in text and bad in text, text


@pytest.mark.parametrize("toml", ["serial = 5", "serial = [1, 2]", "serial = { a = 1 }"])
def test_serial_of_the_wrong_kind_in_toml(tmp_path, toml):
    path = tmp_path / "picchat.toml"
    path.write_text(toml + "\n")
    with pytest.raises(ConfigError, match="serial"):
        load(cli={}, env={}, config_path=str(path))


@pytest.mark.parametrize(
    "setting, value, word",
    [
        ("serial_retry", "0", "below"),
        ("serial_retry", "nan", "finite"),
        ("serial_retry", "1e9", "above"),
        ("serial_queue", "100", "below"),
        ("serial_force", "maybe", "true or false"),
    ],
)
def test_serial_settings_are_checked(setting, value, word):
    with pytest.raises(ConfigError, match=word):
        load(cli={setting: value}, env={})


def test_serial_force_from_the_environment():
    assert load(cli={}, env={"PICCHAT_SERIAL_FORCE": "yes"}).serial_force is True


# ---- who else uses the tty: the kernel console, a getty ------------------------------


def fake_proc(tmp_path: Path, processes: dict[str, bytes], cmdline: str | None = None) -> Path:
    """A /proc of our own: one directory per pid with its cmdline."""
    proc = tmp_path / "proc"
    proc.mkdir()
    if cmdline is not None:
        (proc / "cmdline").write_text(cmdline + "\n")
    for pid, args in processes.items():
        (proc / pid).mkdir()
        (proc / pid / "cmdline").write_bytes(args)
    (proc / "self").mkdir()  # not a pid: never looked at
    return proc


SSHD = {"812": b"sshd: /usr/sbin/sshd -D [listener] 0 of 10-100 startups\0"}
AGETTY_TTYS0 = b"/sbin/agetty\0-o\0-p -- \\u\0--keep-baud\0115200,57600,38400,9600\0ttyS0\0vt220\0"


@pytest.fixture
def ttyS0(tmp_path: Path) -> str:
    """A device file standing for the Pi's UART."""
    dev = tmp_path / "dev"
    dev.mkdir()
    (dev / "ttyS0").touch()
    return str(dev / "ttyS0")


@pytest.mark.parametrize(
    "cmdline",
    [
        "console=ttyS0,115200 console=tty1 root=PARTUUID=1234-02 rootwait",
        "coherent_pool=1M console=tty1 console=ttyS0,115200",
        "console=ttyS0",
    ],
)
def test_the_kernel_console_on_the_device_refuses(tmp_path, ttyS0, cmdline):
    proc = fake_proc(tmp_path, SSHD)
    problem = console_conflict(ttyS0, cmdline=cmdline, proc=proc)
    assert problem is not None
    assert "kernel console" in problem and "ttyS0" in problem
    assert "raspi-config" in problem and "--serial-force" in problem


def test_console_serial0_through_its_symlink_refuses(tmp_path, ttyS0, monkeypatch):
    # On a Pi, console=serial0 names /dev/serial0, a symlink to the UART: the
    # check resolves both sides. Stand /dev/ in for by tmp_path/dev.
    dev = Path(ttyS0).parent
    (dev / "serial0").symlink_to("ttyS0")
    real_realpath = os.path.realpath

    def realpath(path, *args, **kwargs):
        path = os.fspath(path)
        if path.startswith("/dev/"):
            path = str(dev / path[len("/dev/") :])
        return real_realpath(path, *args, **kwargs)

    monkeypatch.setattr(os.path, "realpath", realpath)
    proc = fake_proc(tmp_path, SSHD)
    cmdline = "console=serial0,115200 console=tty1 root=/dev/mmcblk0p2"
    for device in ("/dev/serial0", "/dev/ttyS0", str(dev / "serial0")):
        problem = console_conflict(device, cmdline=cmdline, proc=proc)
        assert problem is not None, device
        assert "console=serial0" in problem and "raspi-config" in problem, problem
    # Another UART is free.
    (dev / "ttyAMA0").touch()
    assert console_conflict("/dev/ttyAMA0", cmdline=cmdline, proc=proc) is None


def test_console_as_an_absolute_path_through_a_symlink_refuses(tmp_path, ttyS0):
    serial0 = Path(ttyS0).parent / "serial0"
    serial0.symlink_to(ttyS0)
    proc = fake_proc(tmp_path, SSHD)
    problem = console_conflict(ttyS0, cmdline=f"console={serial0},115200", proc=proc)
    assert problem is not None and "raspi-config" in problem


def test_the_kernel_console_is_read_from_proc_cmdline(tmp_path, ttyS0):
    proc = fake_proc(tmp_path, SSHD, cmdline="console=ttyS0,115200 quiet")
    problem = console_conflict(ttyS0, proc=proc)
    assert problem is not None and "kernel console" in problem


def test_a_getty_on_the_device_refuses(tmp_path, ttyS0):
    proc = fake_proc(tmp_path, {**SSHD, "1234": AGETTY_TTYS0})
    problem = console_conflict(ttyS0, cmdline="console=tty1 quiet", proc=proc)
    assert problem is not None
    assert "getty" in problem and "1234" in problem and "ttyS0" in problem
    assert "raspi-config" in problem
    assert "serial-getty@ttyS0.service" in problem


def test_a_getty_named_by_its_path_refuses(tmp_path, ttyS0):
    proc = fake_proc(tmp_path, {**SSHD, "77": b"/sbin/getty\x00-L\x00ttyS0\x00115200\x00vt100\x00"})
    problem = console_conflict(ttyS0, cmdline="console=tty1", proc=proc)
    assert problem is not None and "pid 77" in problem


def test_no_conflict(tmp_path, ttyS0):
    processes = {
        **SSHD,
        "600": b"/sbin/agetty\0-o\0-p -- \\u\0--noclear\0-\0linux\0",  # tty1's getty
        "601": b"/sbin/agetty\0--keep-baud\0115200\0ttyS1\0vt220\0",  # another UART
        "602": b"/usr/bin/picocom\0-b\0115200\0/dev/ttyS0\0",  # not a getty
        "603": b"",  # a kernel thread: empty cmdline
    }
    proc = fake_proc(tmp_path, processes)
    assert console_conflict(ttyS0, cmdline="console=tty1 console=ttyS1,115200", proc=proc) is None


def test_an_unreadable_proc_cmdline_refuses_and_says_so(tmp_path, ttyS0):
    proc = fake_proc(tmp_path, SSHD)  # no proc/cmdline
    problem = console_conflict(ttyS0, proc=proc)
    assert problem is not None
    assert f"{proc}/cmdline" in problem and "cannot read" in problem


def test_an_unlistable_proc_refuses_and_says_so(tmp_path, ttyS0):
    problem = console_conflict(ttyS0, cmdline="console=tty1", proc=tmp_path / "no-proc")
    assert problem is not None
    assert "cannot list" in problem and str(tmp_path / "no-proc") in problem


@pytest.mark.parametrize("hidden", ["empty", "only us", "unreadable"])
def test_no_other_process_visible_refuses_and_says_so(tmp_path, ttyS0, hidden):
    # hidepid=2 or ProtectProc=invisible: a getty would be invisible, so
    # "no getty seen" proves nothing.
    if hidden == "empty":
        processes = {}
    elif hidden == "only us":
        processes = {str(os.getpid()): b"python3\0-m\0picchat\0"}
    else:
        processes = {"1": b"/sbin/init\0"}
    proc = fake_proc(tmp_path, processes)
    if hidden == "unreadable":
        (proc / "1" / "cmdline").unlink()  # as if reading it failed
    problem = console_conflict(ttyS0, cmdline="console=tty1", proc=proc)
    assert problem is not None
    assert "cannot see other processes" in problem and str(proc) in problem
    assert "getty" in problem and "ttyS0" in problem


# ---- the hub's limited queue: drop the oldest lines, never the participant -----------


def local_hub(max_queue: int = 4096) -> Hub:
    return Hub(history_id="h1", history_limit=100, max_line=1024, max_queue=max_queue)


def test_a_limited_queue_drops_the_oldest_whole_lines_and_counts_them():
    hub = local_hub()
    hub.open_local(1, "tty1", "serial /dev/x", limit=1024)
    hub.open_local(2, "alice", "test", announce=False)
    hub.take_presence()
    hub.output(1).clear()
    sent = 0
    for i in range(2000):
        text = f"message {i} {'x' * (i * 37 % 150)}".strip()  # lines of varied length
        hub.receive(2, text.encode() + b"\n", 1000.0 + i)
        sent += 1
        out = hub.output(1)
        assert len(out) <= 1024, (i, len(out))
        assert out.endswith(f"alice: {text}\n".encode())
    out = bytes(hub.output(1))
    kept = out.decode().splitlines()
    assert out.endswith(b"\n") and all(line.startswith("alice: message ") for line in kept)
    dropped = hub.take_dropped(1)
    assert dropped + len(kept) == sent
    # What is left is the newest lines, in order and without a gap.
    numbers = [int(line.split()[2]) for line in kept]
    assert numbers == list(range(sent - len(kept), sent))
    assert hub.take_dropped(1) == 0  # counted once
    # Never doomed: still a member, still getting lines.
    assert hub.take_doomed() == []
    assert 1 in hub.room and 1 in hub.peers
    hub.output(1).clear()
    hub.receive(2, b"after\n", 5000.0)
    assert bytes(hub.output(1)) == b"alice: after\n"
    assert hub.take_dropped(1) == 0


def test_a_limited_queue_counts_exactly_when_a_line_fits_exactly():
    hub = local_hub()
    hub.open_local(1, "tty1", "serial /dev/x", limit=1024, announce=False)
    hub.open_local(2, "alice", "test", announce=False)
    line = "y" * (64 - len("alice: ") - 1)  # 64 bytes with "alice: " and LF
    for i in range(16):
        hub.receive(2, line.encode() + b"\n", 1000.0 + i)
    assert len(hub.output(1)) == 1024 and hub.take_dropped(1) == 0
    hub.receive(2, line.encode() + b"\n", 2000.0)
    assert len(hub.output(1)) == 1024 and hub.take_dropped(1) == 1
    hub.receive(2, b"z\n", 2001.0)  # 9 bytes: one whole 64-byte line goes
    assert len(hub.output(1)) == 1024 - 64 + 9 and hub.take_dropped(1) == 1


def test_a_limited_queue_also_bounds_notices_and_presence():
    hub = local_hub()
    hub.open_local(1, "tty1", "serial /dev/x", limit=1024)
    for cid in range(2, 300):  # many joins and leaves, and /who answers
        hub.open(cid, f"test {cid}")
        hub.receive(cid, b"/who\n", 1000.0)
        if cid % 2:
            hub.gone(cid, "closed")
        if cid % 10 == 0:
            hub.take_presence()
            assert len(hub.output(1)) <= 1024
    assert hub.take_dropped(1) > 0
    # One line longer than the limit (/who with 150 names) pushes out all
    # the others; it is kept whole.
    before = hub.output(1).count(b"\n")
    hub.receive(1, b"/who\n", 1001.0)
    out = hub.output(1).decode()
    assert len(out) > 1024 and out.startswith("* 150 here: tty1, ") and out.count("\n") == 1
    assert hub.take_dropped(1) == before
    assert hub.take_doomed() == []


def test_without_a_limit_a_reader_that_falls_behind_is_dropped():
    # The contrast: the same flood drops an ordinary participant.
    hub = local_hub()
    hub.open_local(1, "tty1", "serial /dev/x", announce=False)  # no limit
    hub.open_local(2, "alice", "test", announce=False)
    for i in range(400):
        hub.receive(2, b"x" * 100 + b"\n", 1000.0 + i)
    hub.take_dirty()  # the end of the I/O layer's turn: the chat is queued
    assert [cid for cid, _ in hub.take_doomed()] == [1]


def test_cols_sets_the_terminal_width():
    from picchat.config import parse_serial_spec

    assert parse_serial_spec("/dev/ttyUSB0").cols == 80
    assert parse_serial_spec("/dev/ttyUSB0,cols=132").cols == 132
    for bad in ("cols=5", "cols=x", "cols=²"):
        with pytest.raises(ValueError, match="cols"):
            parse_serial_spec(f"/dev/ttyUSB0,{bad}")
