"""The one settings object, and where its values come from.

Precedence, lowest first: defaults <- TOML config file <- PICCHAT_* environment
<- command line. The config file is read only when named (``--config`` or
``PICCHAT_CONFIG``), so nothing reads /etc behind a test's back. Its keys are
the long option names (``max-line = 4096``; ``max_line`` works too); the
environment variable of a setting is PICCHAT_ plus its name in capitals
(``PICCHAT_MAX_LINE``).

Every bound picchat enforces is a setting here, with its default and help.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

from .events import Value
from .room import name_problem

TYPE_CHECKING = False  # typing is not imported at run time: start-up time
if TYPE_CHECKING:
    from typing import Any


class ConfigError(Exception):
    """A setting has a value we cannot use; exit 78 (EX_CONFIG), or 64
    (EX_USAGE) when the value came from the command line (``usage``)."""

    def __init__(self, message: str, usage: bool = False) -> None:
        super().__init__(message)
        self.usage = usage


class Setting:
    """One setting: its name, type and default, and in ``metadata`` its help
    text (``help``) and what its values must keep to (``min``, ``max``,
    ``choices``; None where there is no such rule)."""

    __slots__ = ("name", "type", "default", "metadata")

    def __init__(
        self,
        name: str,
        kind: type,
        default: Any,
        help: str,
        *,
        minimum: float | None = None,
        maximum: float | None = None,
        choices: tuple[str, ...] | None = None,
    ) -> None:
        self.name = name
        self.type = kind  # str, int, float, bool, or tuple (of str: a repeatable option)
        self.default = default
        self.metadata = {"help": help, "min": minimum, "max": maximum, "choices": choices}


LOG_LEVELS = ("debug", "info", "warning", "error")

# Every setting, in --help's order: a table, not a dataclass (importing
# dataclasses costs ~11 ms and 1.4 MB at every start).
_TABLE = (
    Setting("host", str, "127.0.0.1", "TCP address to listen on ('' for no TCP listener)"),
    Setting("port", int, 1234, "TCP port to listen on (0: any free port)", minimum=0),
    Setting(
        "socket",
        str,
        "auto",
        "Unix socket path; 'auto': $RUNTIME_DIRECTORY/picchat.sock, else "
        "$XDG_RUNTIME_DIR/picchat/picchat.sock, else /tmp/picchat-$UID/picchat.sock; "
        "'off': none",
    ),
    Setting(
        "fifo", str, "", "FIFO to read lines from and broadcast (created if missing; '' for none)"
    ),
    Setting("fifo_name", str, "fifo", "sender name of the lines read from the FIFO"),
    Setting(
        "max_line", int, 4096, "longest accepted line in bytes; longer ones are refused", minimum=64
    ),
    Setting(
        "max_queue",
        int,
        262144,
        "bytes of output that may wait for one connection; a reader further behind is disconnected",
        minimum=4096,
    ),
    Setting(
        "max_total_queue",
        int,
        33554432,
        "bytes of output that may wait for all connections together; beyond it the readers "
        "furthest behind are disconnected first",
        minimum=65536,
    ),
    Setting(
        "history",
        int,
        1000,
        "messages kept for replay (in memory, and on disk with a state-dir)",
        minimum=1,
    ),
    Setting(
        "state_dir",
        str,
        "",
        "directory for the history on disk ('': $STATE_DIRECTORY, set by systemd's "
        "StateDirectory=; without either, history is kept in memory only)",
    ),
    Setting(
        "sync",
        str,
        "commit",
        "'commit': every message is on disk (fsync) before it is acknowledged, one fsync per "
        "loop turn; 'interval': written at once, fsync'd every sync-interval seconds "
        "(survives a crash of picchat, not a power cut; fewer writes to an SD card)",
        choices=("commit", "interval"),
    ),
    Setting(
        "sync_interval",
        float,
        5.0,
        "seconds between fsyncs with sync = 'interval'",
        minimum=0.01,
        maximum=3600.0,
    ),
    Setting("max_clients", int, 10000, "connections served at once", minimum=1),
    Setting(
        "max_tls_clients",
        int,
        1000,
        "TLS connections served at once (each costs about 18 KiB more than a plain one), "
        "within max-clients",
        minimum=1,
    ),
    Setting(
        "max_per_address",
        int,
        64,
        "connections at once from one IP address (0: no limit); loopback is exempt "
        "unless per-address-loopback",
        minimum=0,
    ),
    Setting(
        "per_address_loopback",
        bool,
        False,
        "apply max-per-address to loopback addresses (127.0.0.0/8, ::1) too",
    ),
    Setting(
        "rate_limit",
        float,
        50.0,
        "lines per second one connection, the FIFO or a serial line may send on average; "
        "beyond it the server reads it more slowly (nothing is dropped; 0: no limit)",
        minimum=0.0,
    ),
    Setting(
        "rate_burst",
        int,
        200,
        "lines one input may send at once before rate-limit applies",
        minimum=1,
    ),
    Setting(
        "sessions",
        int,
        10000,
        "sessions of disconnected clients remembered so they can resume without duplicates",
        minimum=0,
    ),
    Setting(
        "dedupe_window",
        int,
        128,
        "message ids remembered per session to drop a message resent after a lost ack; "
        "a client keeps fewer unacknowledged messages than this",
        minimum=1,
    ),
    Setting(
        "presence_interval",
        float,
        1.0,
        "seconds between join/leave summary lines",
        minimum=0.0,
        maximum=3600.0,
    ),
    Setting(
        "shutdown_timeout",
        float,
        2.0,
        "seconds to flush output to clients when stopping",
        minimum=0.0,
        maximum=3600.0,
    ),
    Setting(
        "keepalive_idle",
        int,
        60,
        "TCP keepalive: idle seconds before probing",
        minimum=1,
        maximum=32767,
    ),
    Setting(
        "keepalive_interval",
        int,
        10,
        "TCP keepalive: seconds between probes",
        minimum=1,
        maximum=32767,
    ),
    Setting(
        "keepalive_count",
        int,
        3,
        "TCP keepalive: unanswered probes before a drop",
        minimum=1,
        maximum=127,
    ),
    Setting(
        "token_file",
        str,
        "",
        "file of tokens (one per line, readable by its owner only) that TCP clients on "
        "other machines must send with /auth TOKEN; PICCHAT_TOKEN may hold one more",
    ),
    Setting(
        "allow_anonymous",
        bool,
        False,
        "let TCP clients on other machines in without a token (refused at start-up otherwise "
        "when listening beyond loopback)",
    ),
    Setting(
        "auth_backoff",
        float,
        30.0,
        "longest wait, in seconds, before a failed /auth from an address is answered "
        "(it doubles from 1 s with each failure)",
        minimum=1.0,
        maximum=3600.0,
    ),
    Setting(
        "login_timeout",
        float,
        30.0,
        "seconds a new connection has to finish its TLS handshake, to authenticate where a "
        "token is needed, and to end a first line it has begun (an idle one may stay)",
        minimum=0.1,
        maximum=3600.0,
    ),
    Setting("tls_port", int, 0, "TCP port of the TLS listener (0: no TLS listener)", minimum=0),
    Setting("tls_host", str, "", "address of the TLS listener ('': the same as host)"),
    Setting("tls_cert", str, "", "TLS certificate file (PEM), for the TLS listener"),
    Setting(
        "tls_key",
        str,
        "",
        "TLS private key file (PEM, readable by its owner only), for the TLS listener",
    ),
    Setting(
        "console",
        str,
        "auto",
        "the server's terminal as a participant named Server; 'auto': when stdin is a "
        "terminal and not under systemd",
        choices=("auto", "on", "off"),
    ),
    Setting(
        "serial",
        tuple,
        (),
        "serial line as a participant: DEVICE[,baud=N][,name=NAME][,mode=terminal|lines]"
        "[,cols=N] (repeatable; baud 115200, name the device's, mode terminal, cols 80)",
    ),
    Setting(
        "serial_force",
        bool,
        False,
        "open a serial device even if the kernel console or a getty uses it",
    ),
    Setting(
        "serial_retry",
        float,
        5.0,
        "seconds between attempts to open a missing or unplugged serial device",
        minimum=0.1,
        maximum=3600.0,
    ),
    Setting(
        "serial_queue",
        int,
        16384,
        "bytes of chat that may wait for a slow serial line; beyond it the oldest lines "
        "for it are dropped (with a notice)",
        minimum=1024,
    ),
    Setting("log_level", str, "info", "least important log level shown", choices=LOG_LEVELS),
    Setting("log_chat", bool, True, "log every chat line (at info level)"),
    Setting(
        "log_buffer",
        int,
        65536,
        "bytes of log output held while stderr is not writable; beyond it "
        "lines are dropped and counted",
        minimum=1024,
    ),
)
SETTINGS: dict[str, Setting] = {s.name: s for s in _TABLE}


class Settings(Value):
    """The one settings object: a value for every name in ``SETTINGS`` (an
    attribute each), the default where none is given. Immutable, as a frozen
    dataclass: ``replace`` returns a changed copy."""

    __slots__ = tuple(SETTINGS)

    def __init__(self, **values: Any) -> None:
        unknown = values.keys() - SETTINGS.keys()
        if unknown:
            raise TypeError(f"unknown settings: {', '.join(sorted(unknown))}")
        for name, setting in SETTINGS.items():
            object.__setattr__(self, name, values.get(name, setting.default))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"settings are immutable; replace({name}=...) makes a copy")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"settings are immutable; cannot delete {name}")

    def replace(self, **changes: Any) -> Settings:
        return Settings(**{name: getattr(self, name) for name in SETTINGS} | changes)


def setting_type(name: str) -> type:
    return SETTINGS[name].type


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def env_name(name: str) -> str:
    return "PICCHAT_" + name.upper()


def _convert(name: str, value: Any, source: str) -> Any:
    t = setting_type(name)
    meta = SETTINGS[name].metadata
    try:
        if t is tuple:  # a repeatable option: a TOML list, or space-separated in the environment
            if isinstance(value, str):
                value = value.split()
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"{value!r} is not a list of strings")
            value = tuple(value)
            if name == "serial":
                for spec in value:
                    parse_serial_spec(spec)
            return value
        if t is bool:
            if isinstance(value, str):
                low = value.strip().lower()
                if low in ("1", "true", "yes", "on"):
                    value = True
                elif low in ("0", "false", "no", "off"):
                    value = False
                else:
                    raise ValueError(f"{value!r} is not true or false")
            elif not isinstance(value, bool):
                raise ValueError(f"{value!r} is not true or false")
        elif t is int:
            if isinstance(value, (bool, float)):
                raise ValueError(f"{value!r} is not a whole number")
            try:
                value = int(value)
            except ValueError:
                raise ValueError(f"{value!r} is not a whole number") from None
        elif t is float:
            if isinstance(value, bool):
                raise ValueError(f"{value!r} is not a number")
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"{value!r} is not a number") from None
            if not math.isfinite(value):  # nan would pass every bound check
                raise ValueError(f"{value!r} is not a finite number")
        elif not isinstance(value, str):
            raise ValueError(f"{value!r} is not a string")
    except (ValueError, TypeError) as exc:  # TypeError: a TOML table or list
        raise ConfigError(f"{flag(name)[2:]} from {source}: {exc}", _cli(source)) from None
    if meta["min"] is not None and value < meta["min"]:
        raise ConfigError(
            f"{flag(name)[2:]} from {source}: {value} is below {meta['min']}", _cli(source)
        )
    if meta["max"] is not None and value > meta["max"]:
        raise ConfigError(
            f"{flag(name)[2:]} from {source}: {value} is above {meta['max']}", _cli(source)
        )
    if name in ("port", "tls_port") and value > 65535:
        raise ConfigError(f"{flag(name)[2:]} from {source}: {value} is above 65535", _cli(source))
    if meta["choices"] and value not in meta["choices"]:
        raise ConfigError(
            f"{flag(name)[2:]} from {source}: {value!r} is not one of {', '.join(meta['choices'])}",
            _cli(source),
        )
    return value


def _cli(source: str) -> bool:
    return source.startswith("--")


def read_config_file(path: str) -> dict[str, Any]:
    import tomllib  # only with a config file: start-up time and memory

    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except PermissionError:
        raise ConfigError(f"config file {path} is not readable by this user") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory") from None
    values = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in SETTINGS:
            raise ConfigError(
                f"unknown setting {key!r} in {path}; `picchat-server --help` lists them"
            )
        values[name] = _convert(name, value, path)
    return values


def load(
    cli: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_path: str | None = None,
) -> Settings:
    """Build the settings: defaults <- file <- environment <- command line.

    ``cli`` holds only the options given on the command line. The file is
    ``config_path`` if given, else $PICCHAT_CONFIG, else none.
    """
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    path = config_path or env.get("PICCHAT_CONFIG") or None
    if path:
        values.update(read_config_file(path))
    for name in SETTINGS:
        raw = env.get(env_name(name))
        if raw is not None:
            values[name] = _convert(name, raw, env_name(name))
    for name, value in (cli or {}).items():
        values[name] = _convert(name, value, flag(name))
    settings = Settings(**values)
    check(settings)
    return settings


def check(settings: Settings) -> None:
    """Rules between settings (each value alone has been checked already)."""
    if settings.max_queue < 4 * settings.max_line:
        # A message of max-line bytes may take twice that in JSON, and the
        # queue must hold a few of them, or a single message drops a reader.
        raise ConfigError(
            f"max-queue ({settings.max_queue}) must be at least 4 x max-line "
            f"({4 * settings.max_line})"
        )
    if settings.tls_port and not (settings.tls_cert and settings.tls_key):
        raise ConfigError(
            "tls-port needs tls-cert and tls-key (a self-signed pair: "
            "`sudo deploy/install.sh --tls`, or see docs/security.md)"
        )
    if (
        settings.tls_port
        and settings.tls_port == settings.port
        and tls_host(settings) == settings.host
    ):
        raise ConfigError(f"tls-port and port are both {settings.port}; give TLS its own port")
    problem = name_problem(settings.fifo_name)
    if problem is not None:
        raise ConfigError(f"fifo-name {settings.fifo_name!r}: {problem}")
    taken = {settings.fifo_name.casefold()} if settings.fifo else set()
    for text in settings.serial:
        spec = parse_serial_spec(text)
        if spec.name.casefold() in taken:
            raise ConfigError(
                f"serial {text!r}: the name {spec.name} is used twice; give each one name=NAME"
            )
        taken.add(spec.name.casefold())


def tls_host(settings: Settings) -> str:
    """Where the TLS listener listens: tls-host, else host."""
    return settings.tls_host or settings.host


# ---- the local socket's default path ---------------------------------------


def default_socket_path(env: Mapping[str, str] | None = None) -> Path:
    """$RUNTIME_DIRECTORY/picchat.sock, else $XDG_RUNTIME_DIR/picchat/picchat.sock,
    else /tmp/picchat-$UID/picchat.sock."""
    env = os.environ if env is None else env
    runtime = env.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if runtime:
        return Path(runtime) / "picchat.sock"
    xdg = env.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "picchat" / "picchat.sock"
    return Path(f"/tmp/picchat-{os.getuid()}") / "picchat.sock"


SYSTEM_SOCKET = Path("/run/picchat/picchat.sock")  # the systemd service's (RuntimeDirectory=)


def client_socket_paths(env: Mapping[str, str] | None = None) -> list[Path]:
    """Where picchat-send and picchat-client look for a server's socket, in
    order: the default path of a server run by this user, then the system
    service's."""
    own = default_socket_path(env)
    return [own] if own == SYSTEM_SOCKET else [own, SYSTEM_SOCKET]


def socket_path(settings: Settings, env: Mapping[str, str] | None = None) -> Path | None:
    if settings.socket == "off":
        return None
    if settings.socket == "auto":
        return default_socket_path(env)
    return Path(settings.socket)


# ---- serial line specifications -----------------------------------------------

SERIAL_MODES = ("terminal", "lines")


class SerialSpec(Value):
    __slots__ = __match_args__ = ("device", "baud", "name", "mode", "cols")

    def __init__(
        self,
        device: str,
        baud: int = 115200,
        name: str = "",
        mode: str = "terminal",
        cols: int = 80,
    ) -> None:
        self.device = device
        self.baud = baud
        self.name = name
        self.mode = mode
        self.cols = cols  # the terminal's width: a serial line cannot tell us


def parse_serial_spec(spec: str) -> SerialSpec:
    """'DEVICE[,baud=N][,name=NAME][,mode=terminal|lines][,cols=N]' (raises ValueError)."""
    device, *options = spec.split(",")
    if not device:
        raise ValueError(f"{spec!r}: no device")
    values: dict[str, Any] = {}
    for option in options:
        key, eq, value = option.partition("=")
        if not eq or key not in ("baud", "name", "mode", "cols"):
            raise ValueError(f"{spec!r}: {option!r} is not baud=N, name=NAME, mode=MODE or cols=N")
        values[key] = value
    baud = values.get("baud", "115200")
    if not (baud.isascii() and baud.isdigit()) or not 50 <= int(baud) <= 4_000_000:
        raise ValueError(f"{spec!r}: baud must be a number such as 9600 or 115200")
    name = values.get("name") or Path(device).name
    problem = name_problem(name)
    if problem is not None:
        raise ValueError(f"{spec!r}: name {name!r}: {problem}")
    mode = values.get("mode", "terminal")
    if mode not in SERIAL_MODES:
        raise ValueError(f"{spec!r}: mode must be terminal or lines")
    cols = values.get("cols", "80")
    if not (cols.isascii() and cols.isdigit()) or not 20 <= int(cols) <= 1000:
        raise ValueError(f"{spec!r}: cols must be the terminal's width, 20 to 1000")
    return SerialSpec(device, int(baud), name, mode, int(cols))
