# Sourced by scripts/test and the benchmarks: installs Debian's PostgreSQL 15 if missing and
# starts a throw-away cluster on a free loopback port. Sets PGROOT, PGPORT, PG_ADMIN_URL and
# defines stop_pg. As root, the cluster runs as the postgres user (initdb refuses root).
PGBIN=/usr/lib/postgresql/15/bin
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
if [ ! -x "$PGBIN/initdb" ]; then
  echo "installing PostgreSQL 15 from Debian ..."
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-15 >/dev/null
fi
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
PGROOT=$(mktemp -d /tmp/strata-pg.XXXXXX)
PGPORT=$(free_port)
if [ "$(id -u)" = 0 ]; then
  chown postgres "$PGROOT"
  as_pg() { runuser -u postgres -- "$@"; }
else
  as_pg() { "$@"; }
fi
stop_pg() {
  as_pg "$PGBIN/pg_ctl" -D "$PGROOT/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$PGROOT"
}
as_pg "$PGBIN/initdb" -D "$PGROOT/data" -U postgres --auth=trust -E UTF8 --locale=C >/dev/null
as_pg "$PGBIN/pg_ctl" -D "$PGROOT/data" -l "$PGROOT/server.log" -w start \
  -o "-c listen_addresses=127.0.0.1 -p $PGPORT -k $PGROOT -c wal_level=logical -c fsync=${PG_FSYNC:-off} -c max_connections=200 ${PG_EXTRA:-}" >/dev/null
PG_ADMIN_URL="postgres://postgres@127.0.0.1:$PGPORT/postgres"
