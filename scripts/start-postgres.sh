#!/usr/bin/env bash
# Starts a throwaway PostgreSQL server for the tests marked `postgres`, on 127.0.0.1 only, and prints
# `export QA_PIPELINE_TEST_POSTGRES_URL=...` on stdout (everything else goes to stderr), so
#     eval "$(bash scripts/start-postgres.sh)"
# sets the variable. Installs the Debian package when no server binaries are found. Idempotent: a
# server already running from the same folder is reused. Stop it with scripts/stop-postgres.sh.
#
#   QA_PIPELINE_PG_DIR   where data, socket, log and password live (default: $TMPDIR/qa_pipeline_postgres)
#   QA_PIPELINE_PG_PORT  port to listen on (default: the last one used from that folder, else a free one)
set -euo pipefail

PG_DIR="${QA_PIPELINE_PG_DIR:-${TMPDIR:-/tmp}/qa_pipeline_postgres}"
DATA="$PG_DIR/data"
SOCKET_DIR="$PG_DIR/run"
ROLE=qa_pipeline
DATABASE=qa_pipeline

say() { echo "start-postgres: $*" >&2; }

find_bindir() {
    local dir
    for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        if [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ]; then
            echo "$dir"
            return 0
        fi
    done
    return 1
}

if ! BINDIR=$(find_bindir); then
    if [ "$(id -u)" != 0 ]; then
        say "no PostgreSQL server found in /usr/lib/postgresql and not root: install it with 'sudo apt-get install -y postgresql'"
        exit 1
    fi
    say "installing PostgreSQL (Debian package)"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
    BINDIR=$(find_bindir) || { say "apt-get installed postgresql but no initdb was found"; exit 1; }
fi

# The server refuses to run as root: as root it runs as the `postgres` user the package creates.
if [ "$(id -u)" = 0 ]; then
    OWNER=postgres
    as_owner() { runuser -u postgres -- "$@"; }
else
    OWNER=$(id -un)
    as_owner() { "$@"; }
fi

mkdir -p "$PG_DIR"
chmod 755 "$PG_DIR"
mkdir -p "$SOCKET_DIR"
chown "$OWNER" "$SOCKET_DIR"
chmod 700 "$SOCKET_DIR"

if [ ! -s "$PG_DIR/password" ]; then
    (umask 077; head -c 24 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' >"$PG_DIR/password")
fi
PASSWORD=$(cat "$PG_DIR/password")

if [ ! -f "$DATA/PG_VERSION" ]; then
    say "creating a cluster in $DATA"
    rm -rf "$DATA"
    mkdir -p "$DATA"
    chown "$OWNER" "$DATA"
    as_owner "$BINDIR/initdb" -D "$DATA" -U postgres --auth-local=trust --auth-host=scram-sha-256 \
        --encoding=UTF8 --locale=C.UTF-8 >"$PG_DIR/initdb.log" 2>&1 \
        || { cat "$PG_DIR/initdb.log" >&2; exit 1; }
fi

port_is_free() {
    python3 - "$1" <<'EOF' 2>/dev/null
import socket, sys
with socket.socket() as s:
    s.bind(("127.0.0.1", int(sys.argv[1])))
EOF
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

running() { as_owner "$BINDIR/pg_ctl" -D "$DATA" status >/dev/null 2>&1; }

if running; then
    PORT=$(cat "$PG_DIR/port")
    say "already running on 127.0.0.1:$PORT ($DATA)"
else
    PORT="${QA_PIPELINE_PG_PORT:-$(cat "$PG_DIR/port" 2>/dev/null || true)}"
    if [ -z "$PORT" ] || ! port_is_free "$PORT"; then
        [ -n "${QA_PIPELINE_PG_PORT:-}" ] && { say "port $QA_PIPELINE_PG_PORT is taken; choose another QA_PIPELINE_PG_PORT"; exit 1; }
        PORT=$(free_port)
    fi
    echo "$PORT" >"$PG_DIR/port"
    say "starting PostgreSQL ($BINDIR) on 127.0.0.1:$PORT"
    touch "$PG_DIR/postgres.log"
    chown "$OWNER" "$PG_DIR/postgres.log"
    # A test server: durability settings off for speed; loopback only; its own socket folder.
    as_owner "$BINDIR/pg_ctl" -D "$DATA" -l "$PG_DIR/postgres.log" -w -t 60 start -o \
        "-c listen_addresses=127.0.0.1 -c port=$PORT -c unix_socket_directories=$SOCKET_DIR \
         -c max_connections=300 -c fsync=off -c synchronous_commit=off -c full_page_writes=off" >&2 \
        || { tail -n 30 "$PG_DIR/postgres.log" >&2; exit 1; }
fi

psql_admin() { as_owner "$BINDIR/psql" -h "$SOCKET_DIR" -p "$PORT" -U postgres -d postgres -v ON_ERROR_STOP=1 -qtA "$@"; }

if [ "$(psql_admin -c "SELECT 1 FROM pg_roles WHERE rolname = '$ROLE'")" != 1 ]; then
    psql_admin -c "CREATE ROLE $ROLE LOGIN CREATEDB PASSWORD '$PASSWORD'" >&2
else
    psql_admin -c "ALTER ROLE $ROLE LOGIN CREATEDB PASSWORD '$PASSWORD'" >&2
fi
if [ "$(psql_admin -c "SELECT 1 FROM pg_database WHERE datname = '$DATABASE'")" != 1 ]; then
    psql_admin -c "CREATE DATABASE $DATABASE OWNER $ROLE" >&2
fi

URL="postgresql://$ROLE:$PASSWORD@127.0.0.1:$PORT/$DATABASE"
echo "$URL" >"$PG_DIR/url"
chmod 600 "$PG_DIR/url"
say "ready: postgresql://$ROLE:***@127.0.0.1:$PORT/$DATABASE (role may create databases)"
echo "export QA_PIPELINE_TEST_POSTGRES_URL='$URL'"
