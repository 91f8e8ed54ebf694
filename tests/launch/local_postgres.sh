#!/bin/bash
# A PostgreSQL server on localhost for the tracking-server tests (run as root): Debian's
# postgresql, a throwaway cluster owned by the postgres user, started by hand (no systemd).
#   local_postgres.sh up     install if missing, initdb, start on $PORT, create the mlflow db
#   local_postgres.sh down   stop it and remove the cluster
set -euo pipefail
LAB=${SEQTRAIN_PG_LAB:-/tmp/seqtrain-postgres}
PORT=${SEQTRAIN_PG_PORT:-55432}
action=${1:-up}

bin() {
  local d
  d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
  echo "$d/$1"
}

as_pg() { runuser -u postgres -- "$@"; }

if [[ $action == down ]]; then
  if [[ -d $LAB/data ]]; then as_pg "$(bin pg_ctl)" -D "$LAB/data" -m fast stop >/dev/null 2>&1 || true; fi
  rm -rf "$LAB"
  exit 0
fi

if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null 2>&1
  apt-get install -y -q --no-install-recommends postgresql >/dev/null 2>&1
fi
if [[ -d $LAB/data ]]; then as_pg "$(bin pg_ctl)" -D "$LAB/data" -m fast stop >/dev/null 2>&1 || true; fi
rm -rf "$LAB"
mkdir -p "$LAB"
chown postgres:postgres "$LAB"
as_pg "$(bin initdb)" -D "$LAB/data" -U postgres --auth=trust >"$LAB/initdb.log" 2>&1
as_pg "$(bin pg_ctl)" -D "$LAB/data" -l "$LAB/server.log" -w \
  -o "-p $PORT -k $LAB -c listen_addresses=127.0.0.1 -c max_connections=200" start >/dev/null
as_pg "$(bin psql)" -h 127.0.0.1 -p "$PORT" -U postgres -q \
  -c "CREATE USER mlflow PASSWORD 'mlflow'" -c "CREATE DATABASE mlflow OWNER mlflow"
echo "postgresql://mlflow:mlflow@127.0.0.1:$PORT/mlflow"
