#!/bin/sh
# Install picchat as a systemd service on this machine (a Raspberry Pi or any
# Debian-like box), from a checkout: no internet needed.
#
#   sudo deploy/install.sh              install or upgrade, enable and start
#   sudo deploy/install.sh --dry-run    say what would change, change nothing
#   sudo deploy/install.sh --tls        also a self-signed TLS certificate in
#                                       /etc/picchat/tls (an existing one is kept),
#                                       and print its fingerprint for clients to pin
#   sudo deploy/install.sh --uninstall [--purge]
#
# Idempotent: a second run changes nothing (file times and the service's
# MainPID stay) and says so. Uninstalling keeps /etc/picchat (the settings and
# the TLS certificate) and the state directory /var/lib/picchat unless --purge.
set -eu

PREFIX=/opt/picchat
CONF_DIR=/etc/picchat
CONF=$CONF_DIR/picchat.toml
TLS_DIR=$CONF_DIR/tls
TLS_PORT=1235
UNIT_DIR=/etc/systemd/system
BIN_DIR=/usr/local/bin
SERVICE=picchat-server.service
USER_NAME=picchat
COMMANDS="picchat-server picchat-send picchat-client"
SRC=$(cd "$(dirname "$0")/.." && pwd)

dry_run=0
uninstall=0
purge=0
tls=0
changed=0

usage() {
    echo "usage: $0 [--dry-run] [--tls] [--uninstall [--purge]]" >&2
    exit 64
}

while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) dry_run=1 ;;
        --uninstall) uninstall=1 ;;
        --purge) purge=1 ;;
        --tls) tls=1 ;;
        -h|--help) usage ;;
        *) echo "install.sh: unknown option $1" >&2; usage ;;
    esac
    shift
done
[ "$purge" -eq 0 ] || [ "$uninstall" -eq 1 ] || { echo "install.sh: --purge goes with --uninstall" >&2; exit 64; }
[ "$tls" -eq 0 ] || [ "$uninstall" -eq 0 ] || { echo "install.sh: --tls does not go with --uninstall (the certificate is kept unless --purge)" >&2; exit 64; }

say() { echo "picchat: $*"; }
fail() { echo "picchat: error: $1" >&2; exit "${2:-1}"; }

# Run a command that changes the machine (or only show it with --dry-run).
run() {
    changed=1
    if [ "$dry_run" -eq 1 ]; then
        echo "  would run: $*"
    else
        "$@"
    fi
}

# Like run, but the command's own chatter is shown only if it fails.
run_quietly() {
    changed=1
    if [ "$dry_run" -eq 1 ]; then
        echo "  would run: $*"
    elif ! "$@" 2>"$tmp/stderr"; then
        cat "$tmp/stderr" >&2
        fail "$1 failed (its message is above); nothing was put in place" 73
    fi
}

# Put SRC at DEST with MODE unless DEST already has the same bytes.
install_file() {
    src=$1 dest=$2 mode=$3
    if [ -f "$dest" ] && cmp -s "$src" "$dest"; then
        return 1
    fi
    say "installing $dest"
    run install -D -m "$mode" "$src" "$dest"
    return 0
}

# ---- checks ------------------------------------------------------------------

[ "$(id -u)" -eq 0 ] || fail "run me as root: sudo $0" 77
[ -d /run/systemd/system ] || fail "this machine does not run systemd (no /run/systemd/system); picchat-server can still run by hand: picchat-server" 69
command -v python3 >/dev/null 2>&1 || fail "python3 is missing: sudo apt install python3 python3-venv" 69
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    fail "Python 3.11 or newer is needed, this is $(python3 -V 2>&1); Raspberry Pi OS bookworm has it" 69
if [ "$uninstall" -eq 0 ]; then
    # About 1 MiB of code and a venv of a few MiB: ask for 20 MiB to be safe.
    parent=$PREFIX
    while [ ! -d "$parent" ]; do parent=$(dirname "$parent"); done
    free_kib=$(df -Pk "$parent" | awk 'NR == 2 { print $4 }')
    [ "$free_kib" -ge 20480 ] ||
        fail "not enough disk space: $((free_kib / 1024)) MiB free for $PREFIX, picchat needs about 20 MiB; free some (sudo apt clean, old logs) and run me again" 73
fi
if [ "$tls" -eq 1 ]; then
    # Never replace a certificate or a key, and never pair a new one with an old one.
    if [ -e "$TLS_DIR/cert.pem" ] && [ ! -e "$TLS_DIR/key.pem" ]; then
        fail "$TLS_DIR/cert.pem is there but not its key $TLS_DIR/key.pem: put the key back, or remove the certificate to get a new pair" 78
    elif [ -e "$TLS_DIR/key.pem" ] && [ ! -e "$TLS_DIR/cert.pem" ]; then
        fail "$TLS_DIR/key.pem is there but not its certificate $TLS_DIR/cert.pem: put it back, or remove the key to get a new pair" 78
    elif [ ! -e "$TLS_DIR/cert.pem" ]; then
        command -v openssl >/dev/null 2>&1 ||
            fail "openssl is missing; --tls needs it to make a certificate: sudo apt install openssl" 69
    fi
fi

# ---- uninstall -------------------------------------------------------------------

if [ "$uninstall" -eq 1 ]; then
    for unit in "$UNIT_DIR"/picchat-server*.service "$UNIT_DIR"/picchat-server*.socket; do
        [ -e "$unit" ] || continue
        name=$(basename "$unit")
        say "stopping and removing $name"
        run systemctl disable --now "$name"
        run rm -f "$unit"
    done
    [ "$changed" -eq 0 ] || run systemctl daemon-reload
    for cmd in $COMMANDS; do
        if [ -L "$BIN_DIR/$cmd" ]; then run rm -f "$BIN_DIR/$cmd"; fi
    done
    if [ -d "$PREFIX" ]; then say "removing $PREFIX"; run rm -rf "$PREFIX"; fi
    if [ "$purge" -eq 1 ]; then
        for dir in "$CONF_DIR" /var/lib/picchat; do
            if [ -e "$dir" ]; then say "removing $dir"; run rm -rf "$dir"; fi
        done
        if id "$USER_NAME" >/dev/null 2>&1; then say "removing user $USER_NAME"; run userdel "$USER_NAME"; fi
    else
        say "kept $CONF_DIR (settings, TLS certificate) and /var/lib/picchat; --purge removes them"
    fi
    [ "$changed" -eq 1 ] || say "nothing to remove"
    exit 0
fi

# ---- install -------------------------------------------------------------------------

if ! getent group "$USER_NAME" >/dev/null; then
    say "creating group $USER_NAME"
    run groupadd --system "$USER_NAME"
fi
if ! id "$USER_NAME" >/dev/null 2>&1; then
    say "creating user $USER_NAME"
    run useradd --system --gid "$USER_NAME" --groups dialout --home-dir /var/lib/picchat \
        --no-create-home --shell /usr/sbin/nologin "$USER_NAME"
fi

# A venv that also sees Debian's packages (python3-serial for the serial bridge).
if [ ! -x "$PREFIX/bin/python3" ]; then
    say "creating the Python environment in $PREFIX"
    run python3 -m venv --system-site-packages --without-pip "$PREFIX"
fi

# The package itself: plain Python files, copied (no pip, no network).
site=$(python3 -c 'import sys; print(f"lib/python{sys.version_info[0]}.{sys.version_info[1]}/site-packages")')
code_changed=0
for file in $(cd "$SRC" && find picchat -name '*.py' | sort); do
    if install_file "$SRC/$file" "$PREFIX/$site/$file" 0644; then code_changed=1; fi
done
# Files of an older version that this one no longer has.
if [ -d "$PREFIX/$site/picchat" ]; then
    for file in $(cd "$PREFIX/$site" && find picchat -name '*.py' | sort); do
        if [ ! -f "$SRC/$file" ]; then
            say "removing $PREFIX/$site/$file"
            run rm -f "$PREFIX/$site/$file"
            code_changed=1
        fi
    done
fi
# Compiled once here: the service runs with a read-only /opt (ProtectSystem=strict) and
# could never write its __pycache__, so it would recompile at every start.
if [ "$code_changed" -eq 1 ]; then
    say "compiling the Python files"
    run "$PREFIX/bin/python3" -m compileall -q "$PREFIX/$site/picchat"
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"; rm -f "$TLS_DIR/key.pem.new" "$TLS_DIR/cert.pem.new"' EXIT
for cmd in $COMMANDS; do
    case "$cmd" in
        picchat-server) main=server_main ;;
        picchat-send) main=send_main ;;
        picchat-client) main=client_main ;;
    esac
    printf '#!%s/bin/python3\nfrom picchat.cli import %s\nraise SystemExit(%s())\n' \
        "$PREFIX" "$main" "$main" >"$tmp/$cmd"
    if install_file "$tmp/$cmd" "$PREFIX/bin/$cmd" 0755; then code_changed=1; fi
    if [ "$(readlink "$BIN_DIR/$cmd" 2>/dev/null || true)" != "$PREFIX/bin/$cmd" ]; then
        say "linking $BIN_DIR/$cmd"
        run ln -sf "$PREFIX/bin/$cmd" "$BIN_DIR/$cmd"
    fi
done

# The settings: the example only where there is none yet (never over an edited one).
# With --tls: the example with TLS switched on, where there is none yet or only
# the untouched example; an edited file is left alone and we say what to add.
config_changed=0
tls_lines=""
if [ "$tls" -eq 0 ]; then
    if [ ! -e "$CONF" ]; then
        install_file "$SRC/deploy/picchat.toml" "$CONF" 0644 || true
    fi
else
    sed -e "s|^#tls-port = .*|tls-port = $TLS_PORT|" \
        -e "s|^#tls-cert = .*|tls-cert = \"$TLS_DIR/cert.pem\"|" \
        -e "s|^#tls-key = .*|tls-key = \"$TLS_DIR/key.pem\"|" \
        "$SRC/deploy/picchat.toml" >"$tmp/picchat.toml"
    if [ ! -e "$CONF" ] || cmp -s "$SRC/deploy/picchat.toml" "$CONF"; then
        say "writing $CONF: the example with TLS on port $TLS_PORT (tls-port, tls-cert, tls-key)"
        run install -D -m 0644 "$tmp/picchat.toml" "$CONF"
        config_changed=1
    elif ! cmp -s "$tmp/picchat.toml" "$CONF"; then
        # Edited by hand: which of the three settings it still lacks (or has off).
        grep -Eq '^[[:space:]]*tls[-_]port[[:space:]]*=[[:space:]]*[1-9]' "$CONF" ||
            tls_lines="$tls_lines    tls-port = $TLS_PORT
"
        grep -Eq '^[[:space:]]*tls[-_]cert[[:space:]]*=[[:space:]]*["'\''][^"'\'']' "$CONF" ||
            tls_lines="$tls_lines    tls-cert = \"$TLS_DIR/cert.pem\"
"
        grep -Eq '^[[:space:]]*tls[-_]key[[:space:]]*=[[:space:]]*["'\''][^"'\'']' "$CONF" ||
            tls_lines="$tls_lines    tls-key = \"$TLS_DIR/key.pem\"
"
    fi
fi

# ---- TLS (--tls): a self-signed certificate, made once and never replaced -----------

tls_changed=0
if [ "$tls" -eq 1 ]; then
    if [ ! -d "$TLS_DIR" ]; then
        say "creating $TLS_DIR (root:$USER_NAME, 0750)"
        run install -d -o root -g "$USER_NAME" -m 0750 "$TLS_DIR"
    elif [ "$(stat -c '%U:%G %a' "$TLS_DIR")" != "root:$USER_NAME 750" ]; then
        say "setting $TLS_DIR to root:$USER_NAME, 0750"
        run chown "root:$USER_NAME" "$TLS_DIR"
        run chmod 0750 "$TLS_DIR"
    fi
    if [ -e "$TLS_DIR/cert.pem" ]; then
        say "keeping the TLS certificate $TLS_DIR/cert.pem and its key (never replaced; to get a new pair, remove both and run me again)"
        # Not ours to change, but the service would refuse them: say how to fix.
        key_state=$(stat -L -c '%U %a' "$TLS_DIR/key.pem")
        case "$key_state" in
            "$USER_NAME 600"|"$USER_NAME 400") ;;
            *) say "warning: $TLS_DIR/key.pem is ${key_state% *} mode ${key_state#* }; picchat-server needs it private to its user: sudo chown $USER_NAME:$USER_NAME $TLS_DIR/key.pem && sudo chmod 600 $TLS_DIR/key.pem" ;;
        esac
    else
        name=$(uname -n)
        san="DNS:$name"
        [ "${name%%.*}.local" = "$name" ] || san="$san,DNS:${name%%.*}.local"
        for ip in $(hostname -I 2>/dev/null || true); do san="$san,IP:$ip"; done
        say "making a self-signed TLS certificate for $name ($san), valid for 10 years"
        old_umask=$(umask)
        umask 077
        run_quietly openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
            -days 3650 -subj "/CN=$name" -addext "subjectAltName=$san" \
            -keyout "$TLS_DIR/key.pem.new" -out "$TLS_DIR/cert.pem.new"
        umask "$old_umask"
        run chown "$USER_NAME:$USER_NAME" "$TLS_DIR/key.pem.new"
        run chmod 0644 "$TLS_DIR/cert.pem.new"
        run mv "$TLS_DIR/key.pem.new" "$TLS_DIR/key.pem"
        run mv "$TLS_DIR/cert.pem.new" "$TLS_DIR/cert.pem"
        tls_changed=1
    fi
fi

units_changed=0
for unit in "$SRC"/systemd/*; do
    if install_file "$unit" "$UNIT_DIR/$(basename "$unit")" 0644; then units_changed=1; fi
done
[ "$units_changed" -eq 0 ] || run systemctl daemon-reload

if ! systemctl is-enabled --quiet "$SERVICE" 2>/dev/null; then
    say "enabling $SERVICE"
    run systemctl enable "$SERVICE"
fi
if ! systemctl is-active --quiet "$SERVICE" 2>/dev/null; then
    say "starting $SERVICE"
    run systemctl start "$SERVICE"
elif [ "$code_changed" -eq 1 ] || [ "$units_changed" -eq 1 ]; then
    say "restarting $SERVICE for the new version (clients reconnect by themselves)"
    run systemctl restart "$SERVICE"
elif [ "$config_changed" -eq 1 ] || [ "$tls_changed" -eq 1 ]; then
    say "restarting $SERVICE for TLS (clients reconnect by themselves)"
    run systemctl restart "$SERVICE"
fi

# An edited picchat.toml that lacks TLS settings: what to set, shown, not done.
tls_advice() {
    [ -n "$tls_lines" ] || return 0
    say "$CONF has your own edits, so it is left as it is; to serve TLS, set these lines in it, then: sudo systemctl restart $SERVICE"
    printf '%s' "$tls_lines"
}

if [ "$dry_run" -eq 1 ]; then
    tls_advice
    [ "$changed" -eq 1 ] || say "nothing would change"
    exit 0
fi

# ---- health check: the service is up and a message goes through ------------------------

i=0
until [ -S /run/picchat/picchat.sock ] && systemctl is-active --quiet "$SERVICE"; do
    i=$((i + 1))
    [ "$i" -le 50 ] || fail "$SERVICE did not come up; see: journalctl -u $SERVICE -n 50" 69
    sleep 0.2
done
"$PREFIX/bin/python3" - <<'EOF' || fail "health check failed: a message did not go through; see: journalctl -u picchat-server -n 50" 69
import socket, subprocess, sys
listener = socket.socket(socket.AF_UNIX)
listener.settimeout(5)
listener.connect("/run/picchat/picchat.sock")
listener.recv(4096)  # the welcome
subprocess.run(["/opt/picchat/bin/picchat-send", "--socket", "/run/picchat/picchat.sock",
                "--name", "install", "health check"], check=True, timeout=10)
data = b""
while b"install: health check" not in data:
    chunk = listener.recv(4096)
    if not chunk:
        sys.exit(1)
    data += chunk
EOF
if [ "$changed" -eq 1 ]; then
    say "installed and running: picchat-send \"hello\" (users in group $USER_NAME), picchat-client"
else
    say "nothing changed; $SERVICE is running and healthy"
fi

# ---- TLS: what to pin ------------------------------------------------------------------

[ "$tls" -eq 1 ] || exit 0
tls_advice
fp=$("$PREFIX/bin/picchat-server" --tls-cert "$TLS_DIR/cert.pem" --print-fingerprint) ||
    fail "cannot read the certificate $TLS_DIR/cert.pem (see above)" 65
# What the service serves, if its settings name a certificate (maybe another one).
served=$("$PREFIX/bin/picchat-server" --config "$CONF" --print-fingerprint 2>/dev/null) || served=""
say "TLS certificate $TLS_DIR/cert.pem, fingerprint $fp"
if [ -n "$served" ] && [ "$served" != "$fp" ]; then
    say "note: $CONF serves another certificate (its tls-cert), fingerprint $served"
    fp=$served
fi
if cmp -s "$tmp/picchat.toml" "$CONF"; then
    say "TLS listens on 127.0.0.1:$TLS_PORT, as host does: this machine only; for other machines set tls-host = \"0.0.0.0\" and a token-file in $CONF (docs/operations.md), then: sudo systemctl restart $SERVICE"
fi
port=$(sed -n 's/^[[:space:]]*tls[-_]port[[:space:]]*=[[:space:]]*\([0-9][0-9]*\).*/\1/p' "$CONF" | tail -n 1)
case "$port" in
    ""|0|"$TLS_PORT") port="" ;;
    *) port=" --port $port" ;;
esac
say "clients pin it with: picchat-client --host $(uname -n | cut -d. -f1).local$port --tls --fingerprint $fp"
