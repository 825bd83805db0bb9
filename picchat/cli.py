"""Command-line front ends: argument parsing and exit codes, nothing else.

picchat-server's options come from the settings table (``config.SETTINGS``),
read here without argparse: importing it and building a parser of 50 options
cost the daemon about half a megabyte of its start-up memory. picchat-send
and picchat-client use argparse (``client_cli``). Exit codes are in ``exits``
(sysexits.h values), documented in --help.
"""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

from . import __version__
from .config import SETTINGS, ConfigError, env_name, flag, load, setting_type
from .exits import EX_CONFIG, EX_OK, EX_SOFTWARE, EX_UNAVAILABLE, EX_USAGE

TYPE_CHECKING = False  # typing is not imported at run time: start-up time
if TYPE_CHECKING:
    from typing import Any, NoReturn


class ServerOptions:
    """``--name VALUE`` or ``--name=VALUE`` for each setting, ``--name`` and
    ``--no-name`` for yes-or-no ones, ``--serial`` as often as needed; plus
    --config, --print-fingerprint, --version and -h/--help. Only the options
    given are in the result (the other sources fill in the rest); values stay
    text, converted and checked with the other sources by ``config.load``.
    A usage error exits 64 (EX_USAGE)."""

    prog = "picchat-server"
    description = (
        "Run the picchat chat hub in the foreground. Settings come from defaults, then "
        "the config file, then PICCHAT_* environment variables, then these options "
        "(each later one wins)."
    )
    epilog = (
        "Exit codes: 0 stopped cleanly, 64 usage error, 69 a listener could not be "
        "opened, 70 internal error (see the log), 78 configuration error."
    )

    def __init__(self) -> None:
        # option -> (dest, what): "value", "append", "yes", "no", or an action
        self._options: dict[str, tuple[str, str]] = {
            "-h": ("", "help"),
            "--help": ("", "help"),
            "--version": ("", "version"),
            "--print-fingerprint": ("print_fingerprint", "yes"),
            "--config": ("config", "value"),
        }
        for name in SETTINGS:
            kind = setting_type(name)
            if kind is bool:
                self._options[flag(name)] = (name, "yes")
                self._options["--no-" + flag(name)[2:]] = (name, "no")
            else:
                self._options[flag(name)] = (name, "append" if kind is tuple else "value")

    def parse_args(self, argv: list[str] | None = None) -> SimpleNamespace:
        args = sys.argv[1:] if argv is None else list(argv)
        values: dict[str, Any] = {}
        while args:
            arg = args.pop(0)
            option, eq, value = arg.partition("=")
            if not option.startswith("--"):
                option, eq = arg, ""
            option = self._full_name(option)
            dest, what = self._options.get(option, ("", ""))
            if not what:
                self.error(f"unrecognized argument: {arg}")
            if what in ("help", "version", "yes", "no"):
                if eq:
                    self.error(f"argument {option}: takes no value")
                if what == "help":
                    print(self.format_help())
                    raise SystemExit(EX_OK)
                if what == "version":
                    print(f"picchat {__version__}")
                    raise SystemExit(EX_OK)
                values[dest] = what == "yes"
                continue
            if not eq:
                if not args:
                    self.error(f"argument {option}: expected a value")
                value = args.pop(0)
            choices = SETTINGS[dest].metadata["choices"] if dest in SETTINGS else None
            if choices and value not in choices:
                listed = ", ".join(choices)
                self.error(f"argument {option}: invalid choice: {value!r} (choose from {listed})")
            if what == "append":
                values.setdefault(dest, []).append(value)
            else:
                values[dest] = value
        return SimpleNamespace(**values)

    def _full_name(self, option: str) -> str:
        """An option, or the one it is the unique beginning of (as argparse
        allows: --max-q for --max-queue)."""
        if option in self._options or not option.startswith("--"):
            return option
        matches = [name for name in self._options if name.startswith(option)]
        if len(matches) > 1:
            self.error(f"ambiguous option: {option} could match {', '.join(matches)}")
        return matches[0] if matches else option

    def usage(self) -> str:
        return f"usage: {self.prog} [--help] [--version] [--config PATH] [--SETTING VALUE ...]"

    def format_help(self) -> str:
        import textwrap  # only for --help

        width = _columns()
        lines = [self.usage(), "", textwrap.fill(self.description, width), "", "options:"]

        def option(head: str, text: str) -> None:
            indent = " " * 26
            if len(head) > 22:
                lines.append("  " + head)
                lines.append(
                    textwrap.fill(text, width, initial_indent=indent, subsequent_indent=indent)
                )
            else:
                lines.append(
                    textwrap.fill(
                        text, width, initial_indent=f"  {head:<24}", subsequent_indent=indent
                    )
                )

        option("-h, --help", "show this help message and exit")
        option("--version", "show the version and exit")
        option(
            "--print-fingerprint",
            "print the SHA-256 fingerprint of tls-cert (for clients to pin) and exit",
        )
        option(
            "--config PATH",
            "TOML config file, keys named like these options (env: PICCHAT_CONFIG; default: none)",
        )
        for name, setting in SETTINGS.items():
            kind = setting_type(name)
            default = "none" if setting.default == () else repr(setting.default)
            text = f"{setting.metadata['help']} (default: {default}; env: {env_name(name)})"
            if kind is bool:
                head = f"{flag(name)}, --no-{flag(name)[2:]}"
            elif kind is tuple:
                head = f"{flag(name)} SPEC"
            else:
                head = f"{flag(name)} {name.upper()}"
            option(head, text)
        lines += ["", textwrap.fill(self.epilog, width)]
        return "\n".join(lines)

    def error(self, message: str) -> NoReturn:
        print(self.usage(), file=sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(EX_USAGE)


def _columns() -> int:
    """The terminal's width for --help: $COLUMNS, else the terminal's, else 80."""
    try:
        return max(int(os.environ.get("COLUMNS", "")) - 2, 40)
    except ValueError:
        try:
            return max(os.get_terminal_size(sys.stdout.fileno()).columns - 2, 40)
        except (OSError, ValueError):
            return 78


def server_parser() -> ServerOptions:
    return ServerOptions()


def server_main(argv: list[str] | None = None) -> int:
    from . import logs
    from .endpoints.listeners import StartupError
    from .server import serve

    args: dict[str, Any] = vars(server_parser().parse_args(argv))
    config_path = args.pop("config", None)
    print_fingerprint = args.pop("print_fingerprint", False)
    try:
        settings = load(cli=args, config_path=config_path)
    except ConfigError as exc:
        # Under systemd, give it the error priority (<3>) so `journalctl -p err` shows it.
        prefix = "<3>" if logs.journal_stream() else ""
        if exc.usage:
            print(f"{prefix}picchat-server: error: {exc}", file=sys.stderr)
            return EX_USAGE
        print(f"{prefix}picchat-server: configuration error: {exc}", file=sys.stderr)
        return EX_CONFIG
    if print_fingerprint:
        return _print_fingerprint(settings.tls_cert)
    writer = logs.setup(settings.log_level, settings.log_buffer)
    try:
        serve(settings, writer, reload=lambda: load(cli=args, config_path=config_path))
    except ConfigError as exc:
        logs.get("picchat").error("Configuration error: %s", exc)
        return EX_CONFIG
    except StartupError as exc:
        logs.get("picchat").error("%s", exc)
        return EX_UNAVAILABLE
    except KeyboardInterrupt:  # Ctrl-C before the loop took over the signal
        return 130
    except Exception:  # a bug of ours: into the log with its traceback, then exit
        logs.get("picchat").critical("Internal error, stopping", exc_info=True)
        return EX_SOFTWARE
    finally:
        writer.flush()
    return EX_OK


def _print_fingerprint(cert: str) -> int:
    from .auth import SecretError
    from .tls import cert_fingerprint

    if not cert:
        print("picchat-server: no tls-cert is set (config, env or --tls-cert)", file=sys.stderr)
        return EX_CONFIG
    try:
        print(cert_fingerprint(cert))
    except SecretError as exc:
        print(f"picchat-server: {exc}", file=sys.stderr)
        return EX_CONFIG
    return EX_OK


def send_main(argv: list[str] | None = None) -> int:
    """picchat-send (its command line is in client_cli)."""
    from .client_cli import send_main

    return send_main(argv)


def client_main(argv: list[str] | None = None) -> int:
    """picchat-client (its command line is in client_cli)."""
    from .client_cli import client_main

    return client_main(argv)
