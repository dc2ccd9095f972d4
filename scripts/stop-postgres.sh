#!/usr/bin/env bash
# Stops the test PostgreSQL server started by scripts/start-postgres.sh. Idempotent: nothing running
# is fine. `--purge` also deletes its folder (data, password, log).
set -euo pipefail

PG_DIR="${QA_PIPELINE_PG_DIR:-${TMPDIR:-/tmp}/qa_pipeline_postgres}"
DATA="$PG_DIR/data"

say() { echo "stop-postgres: $*" >&2; }

BINDIR=""
for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    if [ -x "$dir/pg_ctl" ]; then BINDIR=$dir; break; fi
done

if [ -n "$BINDIR" ] && [ -f "$DATA/postmaster.pid" ]; then
    if [ "$(id -u)" = 0 ]; then
        runuser -u postgres -- "$BINDIR/pg_ctl" -D "$DATA" -m fast -w -t 60 stop >&2 || true
    else
        "$BINDIR/pg_ctl" -D "$DATA" -m fast -w -t 60 stop >&2 || true
    fi
    say "stopped the server in $DATA"
else
    say "no server running from $DATA"
fi

if [ "${1:-}" = "--purge" ]; then
    rm -rf "$PG_DIR"
    say "removed $PG_DIR"
fi
