#!/usr/bin/env bash
# The services a production-shaped Airflow needs beside its own processes: PostgreSQL for the metadata
# database and Redis as the Celery broker, from Debian's packages, as private instances of this project
# (own data directories and ports, on 127.0.0.1 only; the system's own clusters are left alone).
# Idempotent. Needs root (and apt for the first `up`).
#
#   scripts/prod-stack.sh up              install what is missing, start what is stopped, check both
#   scripts/prod-stack.sh down [--purge]  stop them (--purge: also their data)
#   scripts/prod-stack.sh status          exit 0 if both answer, else 1
#   scripts/prod-stack.sh env             the connection settings (source with `set -a`)
#   scripts/prod-stack.sh restart-postgres  stop PostgreSQL (fast shutdown) and start it again
#
# An Airflow stack on top (tests/e2e/conftest.py with OELLM_TEST_EXECUTOR=celery) creates its own
# database (CREATE DATABASE, the airflow role may) and takes its own Redis database number.
# Tunables: OELLM_PROD_STATE_DIR (/var/lib/oellm-prod-stack), OELLM_PROD_PG_PORT and
# OELLM_PROD_REDIS_PORT (defaults 55432 and 56379; a port taken by another program makes `up` pick a free one).
set -Eeuo pipefail
export PATH="/usr/lib/postgresql/15/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH"
state=${OELLM_PROD_STATE_DIR:-/var/lib/oellm-prod-stack}
env_file=$state/stack.env
pg_data=$state/postgres
pg_run=$state/run  # the socket directory: not /var/run/postgresql, which the system's cluster uses
redis_dir=$state/redis
timeout=${OELLM_PROD_TIMEOUT:-60}

log() { printf '[prod-stack] %s\n' "$*"; }
die() { log "ERROR: $*"; exit 1; }
load_env() { [ -r "$env_file" ] && { set -a; . "$env_file"; set +a; }; }
pg_ctl_as() { su postgres -s /bin/sh -c "$(printf '%q ' pg_ctl "$@")"; }
pg_up() { pg_isready -q -h 127.0.0.1 -p "$OELLM_PROD_PG_PORT"; }
redis_up() { [ "$(redis-cli -h 127.0.0.1 -p "$OELLM_PROD_REDIS_PORT" ping 2>/dev/null)" = PONG ]; }
wait_for() {  # SECONDS WHAT CMD...: poll CMD until it succeeds
  local end=$(( $(date +%s) + $1 )) what=$2; shift 2
  until "$@"; do [ "$(date +%s)" -lt "$end" ] || die "$what did not come up"; sleep 0.2; done
}
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

install_packages() {
  local missing=()
  command -v redis-server >/dev/null || missing+=(redis-server)
  [ -x /usr/lib/postgresql/15/bin/initdb ] || missing+=(postgresql)
  [ ${#missing[@]} -eq 0 ] && return
  log "installing ${missing[*]}"
  # the packages' own services must not start (no init system here; our instances are private)
  local policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; policy=1
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  apt-get -q -o DPkg::Lock::Timeout=600 update >/dev/null || die "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q -o DPkg::Lock::Timeout=600 --no-install-recommends \
    "${missing[@]}" >/dev/null || die "apt-get install ${missing[*]} failed"
  if [ "$policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; trap - EXIT; fi
}

write_env() {  # the first `up` picks the ports and the password; later ones keep them
  load_env || true
  local pg_port=${OELLM_PROD_PG_PORT:-55432} redis_port=${OELLM_PROD_REDIS_PORT:-56379}
  local password=${OELLM_PROD_PG_PASSWORD:-$(head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9')}
  if [ ! -r "$env_file" ]; then
    port_free "$pg_port" || pg_port=$(free_port)
    port_free "$redis_port" || redis_port=$(free_port)
  fi
  install -d -m 0755 "$state"
  umask 077
  cat > "$env_file" <<EOF
OELLM_PROD_PG_PORT=$pg_port
OELLM_PROD_PG_PASSWORD=$password
OELLM_PROD_PG_URL=postgresql+psycopg2://airflow:$password@127.0.0.1:$pg_port
OELLM_PROD_REDIS_PORT=$redis_port
OELLM_PROD_REDIS_URL=redis://127.0.0.1:$redis_port
EOF
  umask 022
  chmod 0644 "$env_file"  # test processes run as root; the password guards a 127.0.0.1-only test database
  load_env
}

start_postgres() {
  install -d -o postgres -g postgres -m 0700 "$pg_data"
  install -d -o postgres -g postgres -m 0755 "$pg_run"
  [ -e "$state/postgres.log" ] || install -o postgres -g postgres -m 0640 /dev/null "$state/postgres.log"
  if [ ! -s "$pg_data/PG_VERSION" ]; then
    local pwfile; pwfile=$(mktemp); chown postgres "$pwfile"; printf '%s\n' "$OELLM_PROD_PG_PASSWORD" > "$pwfile"
    su postgres -s /bin/sh -c "initdb -D '$pg_data' -U postgres -A scram-sha-256 --pwfile='$pwfile' -E UTF8" >/dev/null
    rm -f "$pwfile"
    cat >> "$pg_data/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $OELLM_PROD_PG_PORT
unix_socket_directories = '$pg_run'
max_connections = 300
shared_buffers = 128MB
EOF
    printf 'local all postgres peer\nhost all all 127.0.0.1/32 scram-sha-256\n' > "$pg_data/pg_hba.conf"
  fi
  if ! pg_up; then
    pg_ctl_as -D "$pg_data" -l "$state/postgres.log" -o "-p $OELLM_PROD_PG_PORT" -w -t "$timeout" start >/dev/null \
      || die "PostgreSQL did not start; see $state/postgres.log"
  fi
  su postgres -s /bin/sh -c "psql -q -h '$pg_run' -p $OELLM_PROD_PG_PORT -d postgres -v ON_ERROR_STOP=1" <<EOF
SELECT 'CREATE ROLE airflow LOGIN CREATEDB' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'airflow')\gexec
ALTER ROLE airflow PASSWORD '$OELLM_PROD_PG_PASSWORD';
EOF
}

start_redis() {
  install -d -o redis -g redis -m 0750 "$redis_dir" 2>/dev/null || install -d -m 0750 "$redis_dir"
  if ! redis_up; then
    redis-server --bind 127.0.0.1 --port "$OELLM_PROD_REDIS_PORT" --daemonize yes --dir "$redis_dir" \
      --pidfile "$state/redis.pid" --logfile "$state/redis.log" --save "" --appendonly no \
      --databases 64 >/dev/null || die "Redis did not start; see $state/redis.log"
    wait_for "$timeout" Redis redis_up
  fi
}

stop_all() {
  load_env || return 0
  if [ -s "$pg_data/postmaster.pid" ]; then pg_ctl_as -D "$pg_data" -m fast -w stop >/dev/null 2>&1 || true; fi
  if redis_up; then redis-cli -h 127.0.0.1 -p "$OELLM_PROD_REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true; fi
}

case "${1:-}" in
  up)
    [ "$(id -u)" = 0 ] || die "must run as root"
    install_packages
    write_env
    start_postgres
    start_redis
    wait_for "$timeout" PostgreSQL pg_up
    log "up: PostgreSQL 127.0.0.1:$OELLM_PROD_PG_PORT, Redis 127.0.0.1:$OELLM_PROD_REDIS_PORT; settings: $0 env" ;;
  down)
    stop_all
    if [ "${2:-}" = --purge ]; then rm -rf "$state"; fi
    log "down" ;;
  restart-postgres)
    load_env || die "not set up"
    pg_ctl_as -D "$pg_data" -m fast -w stop >/dev/null
    pg_ctl_as -D "$pg_data" -l "$state/postgres.log" -o "-p $OELLM_PROD_PG_PORT" -w -t "$timeout" start >/dev/null ;;
  env) cat "$env_file" ;;
  status)
    load_env || { echo "prod stack: not set up" >&2; exit 1; }
    if pg_up && redis_up; then echo "prod stack: up"; else echo "prod stack: down" >&2; exit 1; fi ;;
  *) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
