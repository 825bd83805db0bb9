"""Settings: defaults <- TOML file <- PICCHAT_* environment <- command line."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from picchat import cli, config
from picchat.config import SETTINGS, ConfigError, Settings, default_socket_path, load


def write(tmp_path: Path, text: str, name: str = "picchat.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_defaults_without_any_source():
    s = load(cli={}, env={})
    assert s == Settings()
    assert s.port == 1234
    assert s.max_line == 4096
    assert s.log_chat is True


def test_every_setting_has_help_and_an_env_name():
    for name, f in SETTINGS.items():
        assert f.metadata["help"], name
        assert config.env_name(name) == "PICCHAT_" + name.upper()
        assert config.flag(name) == "--" + name.replace("_", "-")


def test_precedence_file_env_cli(tmp_path):
    path = write(
        tmp_path,
        'port = 2000\nmax-line = 2048\nmax_queue = 8192\nfifo-name = "from-file"\n'
        "presence-interval = 0.5\nlog_chat = false\n",
    )
    env = {"PICCHAT_PORT": "3000", "PICCHAT_MAX_LINE": "1024", "PICCHAT_UNRELATED": "x"}
    s = load(cli={"port": "4000"}, env=env, config_path=path)
    assert s.port == 4000  # cli beats env beats file
    assert s.max_line == 1024  # env beats file
    assert s.max_queue == 8192  # file (underscore key) beats default
    assert s.fifo_name == "from-file"  # file (dashed key)
    assert s.presence_interval == 0.5
    assert s.log_chat is False
    assert s.history == Settings().history  # default


def test_file_only(tmp_path):
    path = write(tmp_path, 'host = "0.0.0.0"\nhistory = 5\n')
    s = load(cli={}, env={}, config_path=path)
    assert (s.host, s.history) == ("0.0.0.0", 5)


def test_picchat_config_names_the_file(tmp_path):
    path = write(tmp_path, "port = 2222\n")
    assert load(cli={}, env={"PICCHAT_CONFIG": path}).port == 2222


def test_config_path_beats_picchat_config(tmp_path):
    env_file = write(tmp_path, "port = 2222\n", "env.toml")
    cli_file = write(tmp_path, "port = 3333\n", "cli.toml")
    assert load(cli={}, env={"PICCHAT_CONFIG": env_file}, config_path=cli_file).port == 3333


def test_no_file_is_read_unless_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "port = 9\n")
    assert load(cli={}, env={}).port == 1234


def test_cli_values_are_converted():
    s = load(cli={"max_line": "512", "presence_interval": "2.5", "log_chat": False}, env={})
    assert (s.max_line, s.presence_interval, s.log_chat) == (512, 2.5, False)


# ---- errors --------------------------------------------------------------------------


def test_unknown_key_in_file(tmp_path):
    path = write(tmp_path, "max-lines = 10\n")
    with pytest.raises(ConfigError) as exc:
        load(cli={}, env={}, config_path=path)
    assert "max-lines" in str(exc.value)
    assert path in str(exc.value)


def test_table_in_file_is_an_unknown_key(tmp_path):
    path = write(tmp_path, "[server]\nport = 1\n")
    with pytest.raises(ConfigError, match="server"):
        load(cli={}, env={}, config_path=path)


@pytest.mark.parametrize(
    ("toml", "setting"),
    [
        ('port = "abc"\n', "port"),
        ("max-line = 100.5\n", "max-line"),
        ("max-line = true\n", "max-line"),
        ("host = 5\n", "host"),
        ("log-chat = 1\n", "log-chat"),
        ('presence-interval = "soon"\n', "presence-interval"),
        ("presence-interval = true\n", "presence-interval"),
        ("presence-interval = nan\n", "presence-interval"),
        ("shutdown-timeout = inf\n", "shutdown-timeout"),
    ],
)
def test_bad_type_in_file(tmp_path, toml, setting):
    path = write(tmp_path, toml)
    with pytest.raises(ConfigError) as exc:
        load(cli={}, env={}, config_path=path)
    assert setting in str(exc.value)
    assert path in str(exc.value)


@pytest.mark.parametrize(
    ("env", "setting"),
    [
        ({"PICCHAT_PORT": "12x"}, "port"),
        ({"PICCHAT_PORT": "-1"}, "port"),
        ({"PICCHAT_PORT": "70000"}, "port"),
        ({"PICCHAT_MAX_LINE": "63"}, "max-line"),
        ({"PICCHAT_MAX_QUEUE": "100"}, "max-queue"),
        ({"PICCHAT_HISTORY": "0"}, "history"),
        ({"PICCHAT_PRESENCE_INTERVAL": "-0.1"}, "presence-interval"),
        ({"PICCHAT_PRESENCE_INTERVAL": "nan"}, "presence-interval"),
        ({"PICCHAT_SHUTDOWN_TIMEOUT": "inf"}, "shutdown-timeout"),
        ({"PICCHAT_LOG_LEVEL": "verbose"}, "log-level"),
        ({"PICCHAT_LOG_CHAT": "maybe"}, "log-chat"),
        ({"PICCHAT_LOG_BUFFER": "1023"}, "log-buffer"),
    ],
)
def test_bad_environment_value_names_setting_and_variable(env, setting):
    with pytest.raises(ConfigError) as exc:
        load(cli={}, env=env)
    assert setting in str(exc.value)
    assert next(iter(env)) in str(exc.value)


def test_bad_cli_value_names_the_option():
    with pytest.raises(ConfigError) as exc:
        load(cli={"max_line": "1"}, env={})
    assert "--max-line" in str(exc.value)
    assert "64" in str(exc.value)


def test_below_minimum_message():
    with pytest.raises(ConfigError, match=r"max-line from PICCHAT_MAX_LINE: 10 is below 64"):
        load(cli={}, env={"PICCHAT_MAX_LINE": "10"})


def test_bad_choice_lists_the_choices():
    with pytest.raises(ConfigError) as exc:
        load(cli={"log_level": "loud"}, env={})
    for choice in config.LOG_LEVELS:
        assert choice in str(exc.value)


def test_minimum_is_inclusive():
    s = load(cli={}, env={"PICCHAT_MAX_LINE": "64", "PICCHAT_PORT": "0"})
    assert (s.max_line, s.port) == (64, 0)


def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="does not exist") as exc:
        load(cli={}, env={}, config_path=path)
    assert path in str(exc.value)


def test_missing_file_named_by_picchat_config(tmp_path):
    path = str(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match=r"nope\.toml"):
        load(cli={}, env={"PICCHAT_CONFIG": path})


@pytest.mark.parametrize("text", ["port = \n", "port = 1\nport = 2\n", "[unclosed\n"])
def test_invalid_toml(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match="not valid TOML") as exc:
        load(cli={}, env={}, config_path=path)
    assert path in str(exc.value)


def test_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'fifo-name = "caf\xe9"\n')
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(cli={}, env={}, config_path=str(path))


def test_directory_as_file(tmp_path):
    with pytest.raises(ConfigError, match="directory"):
        load(cli={}, env={}, config_path=str(tmp_path))


# ---- booleans ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "value"),
    [("1", True), ("true", True), ("Yes", True), (" on ", True), ("TRUE", True),
     ("0", False), ("false", False), ("no", False), ("OFF", False)],
)  # fmt: skip
def test_bool_parsing_from_environment(raw, value):
    assert load(cli={}, env={"PICCHAT_LOG_CHAT": raw}).log_chat is value


@pytest.mark.parametrize("raw", ["", "2", "y", "enabled"])
def test_bad_bool_from_environment(raw):
    with pytest.raises(ConfigError, match="log-chat"):
        load(cli={}, env={"PICCHAT_LOG_CHAT": raw})


def test_bool_from_toml(tmp_path):
    assert load(cli={}, env={}, config_path=write(tmp_path, "log-chat = false\n")).log_chat is False
    path = write(tmp_path, 'log-chat = "no"\n', "str.toml")
    assert load(cli={}, env={}, config_path=path).log_chat is False


# ---- the local socket's default path ---------------------------------------------------


def test_socket_path_from_runtime_directory():
    env = {"RUNTIME_DIRECTORY": "/run/picchat", "XDG_RUNTIME_DIR": "/run/user/1000"}
    assert default_socket_path(env) == Path("/run/picchat/picchat.sock")


def test_socket_path_uses_the_first_runtime_directory():
    env = {"RUNTIME_DIRECTORY": "/run/picchat:/run/other"}
    assert default_socket_path(env) == Path("/run/picchat/picchat.sock")


def test_socket_path_from_xdg_runtime_dir():
    env = {"RUNTIME_DIRECTORY": "", "XDG_RUNTIME_DIR": "/run/user/1000"}
    assert default_socket_path(env) == Path("/run/user/1000/picchat/picchat.sock")


def test_socket_path_fallback_in_tmp():
    assert default_socket_path({}) == Path(f"/tmp/picchat-{os.getuid()}/picchat.sock")


def test_socket_setting():
    env = {"XDG_RUNTIME_DIR": "/run/user/7"}
    assert config.socket_path(Settings(socket="off"), env) is None
    assert config.socket_path(Settings(socket="auto"), env) == default_socket_path(env)
    assert config.socket_path(Settings(socket="/srv/c.sock"), env) == Path("/srv/c.sock")


# ---- the command line --------------------------------------------------------------------


def test_help_lists_every_setting(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.server_parser().parse_args(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in SETTINGS:
        assert config.flag(name) in out, name
        assert config.env_name(name) in out, name
    assert "--config" in out


def test_parser_collects_only_given_options():
    args = vars(cli.server_parser().parse_args(["--port", "99", "--no-log-chat"]))
    assert args == {"port": "99", "log_chat": False}
    assert load(cli=args, env={}).port == 99


def test_parser_takes_name_equals_value_and_the_front_end_options():
    argv = [
        "--port=99",
        "--log-chat",
        "--config",
        "/etc/picchat/picchat.toml",
        "--print-fingerprint",
    ]
    args = vars(cli.server_parser().parse_args(argv))
    assert args == {
        "port": "99",
        "log_chat": True,
        "config": "/etc/picchat/picchat.toml",
        "print_fingerprint": True,
    }


def test_an_option_may_be_shortened_while_it_is_unambiguous(capsys):
    args = vars(cli.server_parser().parse_args(["--max-q", "1000", "--conf=/x.toml", "--no-log"]))
    assert args == {"max_queue": "1000", "config": "/x.toml", "log_chat": False}
    with pytest.raises(SystemExit) as exc:
        cli.server_parser().parse_args(["--max", "1000"])
    assert exc.value.code == 64
    assert "ambiguous option: --max could match --max-line, --max-queue" in capsys.readouterr().err


def test_version_and_help_exit_0(capsys):
    for argv, want in ((["--version"], "picchat "), (["-h"], "usage: picchat-server")):
        with pytest.raises(SystemExit) as exc:
            cli.server_parser().parse_args(argv)
        assert exc.value.code == 0
        assert capsys.readouterr().out.startswith(want)


@pytest.mark.parametrize(
    "argv",
    [
        ["--no-such-option"],
        ["--port"],
        ["--log-level", "loud"],
        ["--log-level=loud"],
        ["stray"],
        ["--log-chat=1"],
        ["--no-port"],
    ],
)
def test_parse_errors_exit_64(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.server_parser().parse_args(argv)
    assert exc.value.code == 64
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize(
    "toml",
    ["port = [1]", "max-line = { a = 1 }", "port = 1979-05-27", "log-chat = [true]"],
)
def test_values_of_the_wrong_kind_are_configuration_errors(tmp_path, toml):
    with pytest.raises(ConfigError) as err:
        load(env={}, config_path=write(tmp_path, toml))
    assert toml.split(" =")[0] in str(err.value)


def test_max_queue_must_hold_a_few_lines():
    with pytest.raises(ConfigError, match="max-queue"):
        load(cli={"max_line": "65536", "max_queue": "65536"}, env={})
    assert load(cli={"max_line": "1024", "max_queue": "4096"}, env={}).max_queue == 4096


@pytest.mark.parametrize("name", ["bad name", "Server", "a:b", ""])
def test_fifo_name_must_be_a_valid_name(name):
    with pytest.raises(ConfigError, match="fifo-name"):
        load(cli={"fifo_name": name}, env={})


@pytest.mark.parametrize(
    "setting, value", [("presence_interval", "1e10"), ("shutdown_timeout", "1e300")]
)
def test_timers_have_an_upper_bound(setting, value):
    with pytest.raises(ConfigError, match="above"):
        load(cli={setting: value}, env={})


def test_every_setting_is_documented_in_the_operations_guide():
    guide = (Path(__file__).parents[2] / "docs" / "operations.md").read_text()
    for name in SETTINGS:
        assert f"| `{name.replace('_', '-')}` |" in guide, name


def test_serial_names_must_be_distinct():
    with pytest.raises(ConfigError, match="twice"):
        load(cli={"serial": ["/dev/ttyUSB0", "/dev/x/ttyUSB0"]}, env={})
    settings = load(cli={"serial": ["/dev/ttyUSB0", "/dev/x/ttyUSB0,name=other"]}, env={})
    assert len(settings.serial) == 2


def test_the_example_config_has_every_setting_with_its_default(tmp_path):
    import re

    example = (Path(__file__).parents[2] / "deploy" / "picchat.toml").read_text()
    keys = re.findall(r"^#([a-z-]+) = ", example, re.M)
    assert sorted(keys) == sorted(name.replace("_", "-") for name in SETTINGS)
    # Uncommented, it is valid TOML that gives exactly the defaults.
    active = re.sub(r"^#([a-z-]+ = )", r"\1", example, flags=re.M)
    assert load(env={}, config_path=write(tmp_path, active)) == Settings()


def test_the_operations_guide_lists_every_setting_a_reload_applies():
    from picchat.server import LIVE_SETTINGS

    guide = " ".join((Path(__file__).parents[2] / "docs" / "operations.md").read_text().split())
    start = guide.index("On reload (SIGHUP) it applies")
    paragraph = guide[start : guide.index("need `systemctl restart`", start)]
    for name in LIVE_SETTINGS:
        assert f"`{name.replace('_', '-')}`" in paragraph, name
