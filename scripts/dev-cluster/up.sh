#!/usr/bin/env bash
# dev-cluster/up.sh -- bring up a REAL single-node SLURM cluster (slurmctld +
# slurmd [+ slurmdbd/MariaDB]) and an sshd on 127.0.0.1:2222, for tests that submit
# real sbatch jobs over SSH to localhost.
#
# Target: Debian 12 (bookworm), run as root, no systemd as PID 1, no Docker.
# Idempotent: safe to run again while everything is up (no-op, exit 0), after the
# down script, or after a reboot. Daemons are started directly (they daemonize
# themselves / are detached with setsid) and write PID files under /run.
#
# Tunables (environment variables, all optional):
#   SLURM_DEV_USER=slurmuser        unprivileged user that tests ssh in as
#   SLURM_DEV_SSH_PORT=2222         sshd port
#   SLURM_DEV_SSH_LISTEN=127.0.0.1  sshd address (0.0.0.0 in the docker-compose SLURM service)
#   SLURM_DEV_ACCOUNTING=slurmdbd   slurmdbd (MariaDB + slurmdbd: full sacct) | none
#                                   (none: sacct says "accounting storage is disabled";
#                                   only `sacct -c` (jobcomp/filetxt) works)
#   SLURM_DEV_CPUS=                 CPUs advertised for the node (default max(8,nproc));
#                                   more than the hardware is fine (config_overrides)
#   SLURM_DEV_MIN_JOB_AGE=60        seconds finished jobs stay visible to scontrol/squeue (then only
#                                   sacct knows them; short, so tests of that fallback are quick)
#   SLURM_DEV_CRED_EXPIRE=10        AuthInfo cred_expire: also the delay before a
#                                   requeued job may start again (Slurm default 120)
#   SLURM_DEV_STATE_DIR=/var/lib/slurm-dev   client key, known_hosts, env file
#   SLURM_DEV_TIMEOUT=120           seconds to wait for each readiness check
#   SLURM_DEV_ROOT_SSH=0            1: also authorize the client key for root
#   SLURM_DEV_SMOKE_TEST=1          1: submit one job over ssh and wait for COMPLETED
set -Eeuo pipefail

SLURM_DEV_USER="${SLURM_DEV_USER:-slurmuser}"
SLURM_DEV_SSH_PORT="${SLURM_DEV_SSH_PORT:-2222}"
SLURM_DEV_SSH_LISTEN="${SLURM_DEV_SSH_LISTEN:-127.0.0.1}"
SLURM_DEV_ACCOUNTING="${SLURM_DEV_ACCOUNTING:-slurmdbd}"
SLURM_DEV_MIN_JOB_AGE="${SLURM_DEV_MIN_JOB_AGE:-60}"
SLURM_DEV_CRED_EXPIRE="${SLURM_DEV_CRED_EXPIRE:-10}"
SLURM_DEV_STATE_DIR="${SLURM_DEV_STATE_DIR:-/var/lib/slurm-dev}"
SLURM_DEV_TIMEOUT="${SLURM_DEV_TIMEOUT:-120}"
SLURM_DEV_ROOT_SSH="${SLURM_DEV_ROOT_SSH:-0}"
SLURM_DEV_SMOKE_TEST="${SLURM_DEV_SMOKE_TEST:-1}"

CLUSTER=devcluster
PARTITION=debug
SLURM_ETC=/etc/slurm
RUN_SLURM=/run/slurm
LOG_DIR=/var/log/slurm
SSHD_CONF=/etc/ssh/sshd_config_slurmdev
SSHD_PID=/run/sshd-slurmdev.pid
DB_NAME=slurm_acct_db
DB_USER=slurm
DB_PASS=slurmdevdbpass
MYSQL_SOCK=/run/mysqld/mysqld.sock
STARTED_DIR="$SLURM_DEV_STATE_DIR/started"   # markers: daemons this script started

T_START=$(date +%s.%N)
log() { printf '[slurm-dev-up %6.1fs] %s\n' "$(awk -v a="$T_START" -v b="$(date +%s.%N)" 'BEGIN{print b-a}')" "$*"; }
die() { log "ERROR: $*"; exit 1; }

trap 'log "ERROR: line $LINENO: \"$BASH_COMMAND\" failed (exit $?)"' ERR
[ "$(id -u)" = 0 ] || die "must run as root"
case "$SLURM_DEV_ACCOUNTING" in slurmdbd|none) ;; *) die "SLURM_DEV_ACCOUNTING must be slurmdbd or none";; esac
export DEBIAN_FRONTEND=noninteractive
export PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH"

# alive PID: true while PID exists and is not a zombie (PID 1 here may reap slowly)
alive() { local st; st=$(sed -n 's/.*) \([A-Za-z]\) .*/\1/p' "/proc/$1/stat" 2>/dev/null); [ -n "$st" ] && [ "$st" != Z ] && [ "$st" != X ]; }
# pid_of PIDFILE COMM -> prints the PID if the file names a live process called COMM
pid_of() {
  local f=$1 comm=$2 pid
  [ -s "$f" ] || return 1
  pid=$(tr -dc '0-9' < "$f")
  [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$comm" ] && alive "$pid" || return 1
  echo "$pid"
}
# wait_for SECONDS DESCRIPTION CMD... -> polls CMD every 0.2 s
wait_for() {
  local secs=$1 what=$2; shift 2
  local end=$(( $(date +%s) + secs ))
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$end" ] || return 1
    sleep 0.2
  done
  log "ready: $what"
}
# stop_pid PID: TERM, wait up to 30 s, then KILL
stop_pid() {
  local pid=$1
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 1 150); do alive "$pid" || return 0; sleep 0.2; done
  kill -KILL "$pid" 2>/dev/null || true
  sleep 0.2
}
mark_started() { mkdir -p "$STARTED_DIR"; echo "$2" > "$STARTED_DIR/$1"; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# ---------------------------------------------------------------- 1. packages
PKGS=(munge slurmctld slurmd slurm-client openssh-server openssh-client python3)
if [ "$SLURM_DEV_ACCOUNTING" = slurmdbd ]; then PKGS+=(slurmdbd mariadb-server); fi
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  log "installing: ${missing[*]}"
  # Keep package postinst scripts from starting services (sshd on 0.0.0.0:22,
  # munged, slurm*) through invoke-rc.d: a policy-rc.d that denies everything.
  policy_created=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d
    policy_created=1
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT   # also removed if the install fails
  fi
  APT_OPTS=(-y -q --no-install-recommends -o DPkg::Lock::Timeout=600)
  apt-get -q -o DPkg::Lock::Timeout=600 update >/dev/null || die "apt-get update failed"
  apt-get install "${APT_OPTS[@]}" "${missing[@]}" >/dev/null || die "apt-get install ${missing[*]} failed"
  if [ "$policy_created" = 1 ]; then rm -f /usr/sbin/policy-rc.d; trap - EXIT; fi
  log "packages installed"
fi
# (not `sinfo -V`: every Slurm client command, even -V, dies without a slurm.conf)
SLURM_VERSION=$(dpkg-query -W -f='${Version}' slurm-client 2>/dev/null || echo unknown)

# ---------------------------------------------------------------- 2. host name
NODE=$(hostname -s)
[ -n "$NODE" ] || die "hostname -s is empty"
if ! getent hosts "$NODE" >/dev/null; then
  echo "127.0.0.1 $NODE # added by slurm-dev-cluster-up.sh" >> /etc/hosts
  log "added '$NODE' to /etc/hosts"
fi
NCPU=$(nproc)
CPUS="${SLURM_DEV_CPUS:-$(( NCPU > 8 ? NCPU : 8 ))}"
MEM_MB=$(awk '/MemTotal/ {printf "%d", $2/1024*0.9}' /proc/meminfo)

# ---------------------------------------------------------------- 3. munge
install -d -o munge -g munge -m 0700 /etc/munge /var/log/munge
install -d -o munge -g munge -m 0711 /var/lib/munge
install -d -o munge -g munge -m 0755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
  mungekey --create --keyfile=/etc/munge/munge.key
  log "created /etc/munge/munge.key"
fi
chown munge:munge /etc/munge/munge.key; chmod 0600 /etc/munge/munge.key
started=0
if ! pid_of /run/munge/munged.pid munged >/dev/null; then
  runuser -u munge -- /usr/sbin/munged </dev/null >/dev/null 2>&1 || die "munged failed; see /var/log/munge/munged.log"
  started=1
fi
wait_for "$SLURM_DEV_TIMEOUT" "munged" bash -c 'munge -n | unmunge' || die "munged not working; see /var/log/munge/munged.log"
[ "$started" = 0 ] || mark_started munged "$(pid_of /run/munge/munged.pid munged)"

# ---------------------------------------------------------------- 4. slurm config
install -d -o slurm -g slurm -m 0755 /var/spool/slurmctld "$LOG_DIR" "$RUN_SLURM"
install -d -o root -g root -m 0755 /var/spool/slurmd "$SLURM_ETC"
install -d -m 0700 "$SLURM_DEV_STATE_DIR"

if [ "$SLURM_DEV_ACCOUNTING" = slurmdbd ]; then
  ACCT_LINES="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819"
else
  ACCT_LINES="AccountingStorageType=accounting_storage/none"
fi
NEW_CONF=$(mktemp)
cat > "$NEW_CONF" <<EOF
# Managed by slurm-dev-cluster-up.sh -- single-node dev/CI cluster on loopback.
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=$SLURM_DEV_CRED_EXPIRE
CredType=cred/munge
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$RUN_SLURM/slurmctld.pid
SlurmdPidFile=$RUN_SLURM/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
# no cgroups anywhere: plain process tracking, no task binding
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=5,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# advertise more CPUs than the hardware has so several 1-CPU jobs run at once
SlurmdParameters=config_overrides
$ACCT_LINES
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG_DIR/jobcomp.log
# reject impossible requests (e.g. -c 16 on an 8-CPU node) at submit time instead of
# leaving them PENDING (Reason=PartitionConfig) forever
EnforcePartLimits=ALL
MaxJobCount=100000
MaxArraySize=10001
MinJobAge=$SLURM_DEV_MIN_JOB_AGE
KillWait=5
InactiveLimit=0
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
SLURM_CONF_CHANGED=0
if ! cmp -s "$NEW_CONF" "$SLURM_ETC/slurm.conf"; then
  install -m 0644 "$NEW_CONF" "$SLURM_ETC/slurm.conf"; SLURM_CONF_CHANGED=1
  log "wrote $SLURM_ETC/slurm.conf"
fi
rm -f "$NEW_CONF"

# ---------------------------------------------------------------- 5. MariaDB + slurmdbd
if [ "$SLURM_DEV_ACCOUNTING" = slurmdbd ]; then
  install -d -o mysql -g root -m 0755 /run/mysqld
  if ! mariadb-admin --socket="$MYSQL_SOCK" ping >/dev/null 2>&1; then
    if [ ! -d /var/lib/mysql/mysql ]; then
      log "initialising MariaDB data directory"
      mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
    fi
    setsid /usr/sbin/mariadbd --user=mysql --pid-file=/run/mysqld/mysqld.pid \
      --socket="$MYSQL_SOCK" --bind-address=127.0.0.1 --innodb-lock-wait-timeout=900 \
      </dev/null >>"$LOG_DIR/mariadb.log" 2>&1 &
    wait_for "$SLURM_DEV_TIMEOUT" "mariadb" mariadb-admin --socket="$MYSQL_SOCK" ping \
      || die "mariadb did not start; see $LOG_DIR/mariadb.log"
    mark_started mariadbd "$(pid_of /run/mysqld/mysqld.pid mariadbd)"
  fi
  mariadb --socket="$MYSQL_SOCK" <<EOF
CREATE DATABASE IF NOT EXISTS $DB_NAME;
CREATE USER IF NOT EXISTS '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
ALTER USER '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL PRIVILEGES ON $DB_NAME.* TO '$DB_USER'@'localhost';
FLUSH PRIVILEGES;
EOF
  NEW_DBD=$(mktemp)
  cat > "$NEW_DBD" <<EOF
# Managed by slurm-dev-cluster-up.sh
AuthType=auth/munge
DbdHost=$NODE
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=slurm
DebugLevel=info
LogFile=$LOG_DIR/slurmdbd.log
PidFile=$RUN_SLURM/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StoragePort=3306
StorageUser=$DB_USER
StoragePass=$DB_PASS
StorageLoc=$DB_NAME
EOF
  DBD_CHANGED=0
  if ! cmp -s "$NEW_DBD" "$SLURM_ETC/slurmdbd.conf"; then
    install -m 0600 -o slurm -g slurm "$NEW_DBD" "$SLURM_ETC/slurmdbd.conf"; DBD_CHANGED=1
    log "wrote $SLURM_ETC/slurmdbd.conf"
  fi
  rm -f "$NEW_DBD"
  chown slurm:slurm "$SLURM_ETC/slurmdbd.conf"; chmod 0600 "$SLURM_ETC/slurmdbd.conf"
  if pid=$(pid_of "$RUN_SLURM/slurmdbd.pid" slurmdbd) && [ "$DBD_CHANGED" = 1 ]; then
    log "slurmdbd.conf changed: restarting slurmdbd"; stop_pid "$pid"
  fi
  if ! pid_of "$RUN_SLURM/slurmdbd.pid" slurmdbd >/dev/null; then
    /usr/sbin/slurmdbd </dev/null >/dev/null 2>&1 || die "slurmdbd failed; see $LOG_DIR/slurmdbd.log"
    wait_for "$SLURM_DEV_TIMEOUT" "slurmdbd" port_open 6819 || die "slurmdbd not listening; see $LOG_DIR/slurmdbd.log"
    mark_started slurmdbd "$(pid_of "$RUN_SLURM/slurmdbd.pid" slurmdbd)"
  fi
fi

# ---------------------------------------------------------------- 6. slurmctld + slurmd
if [ "$SLURM_CONF_CHANGED" = 1 ]; then
  for d in slurmd slurmctld; do
    if pid=$(pid_of "$RUN_SLURM/$d.pid" "$d"); then log "slurm.conf changed: restarting $d"; stop_pid "$pid"; fi
  done
fi
if ! pid_of "$RUN_SLURM/slurmctld.pid" slurmctld >/dev/null; then
  /usr/sbin/slurmctld </dev/null >/dev/null 2>&1 || { tail -20 "$LOG_DIR/slurmctld.log" >&2; die "slurmctld failed to start"; }
fi
wait_for "$SLURM_DEV_TIMEOUT" "slurmctld" bash -c 'scontrol ping | grep -q "is UP"' \
  || { tail -20 "$LOG_DIR/slurmctld.log" >&2; die "slurmctld not responding"; }
mark_started slurmctld "$(pid_of "$RUN_SLURM/slurmctld.pid" slurmctld)"
if ! pid_of "$RUN_SLURM/slurmd.pid" slurmd >/dev/null; then
  /usr/sbin/slurmd </dev/null >/dev/null 2>&1 || { tail -20 "$LOG_DIR/slurmd.log" >&2; die "slurmd failed to start"; }
fi
node_usable() { case "$(sinfo -h -n "$NODE" -o %t 2>/dev/null)" in idle|mix|alloc|comp) return 0;; *) return 1;; esac; }
if ! wait_for 15 "node $NODE" node_usable; then
  # a node left DOWN/DRAIN from an earlier run: resume it once
  log "node state '$(sinfo -h -n "$NODE" -o %t)': resuming"
  scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
  wait_for "$SLURM_DEV_TIMEOUT" "node $NODE" node_usable \
    || { sinfo -R >&2; tail -20 "$LOG_DIR/slurmd.log" >&2; die "node $NODE not usable"; }
fi
mark_started slurmd "$(pid_of "$RUN_SLURM/slurmd.pid" slurmd)"

# ---------------------------------------------------------------- 7. SSH user, keys, sshd
if ! id -u "$SLURM_DEV_USER" >/dev/null 2>&1; then
  useradd -m -s /bin/bash "$SLURM_DEV_USER"; log "created user $SLURM_DEV_USER"
fi
# '!' (locked) in /etc/shadow blocks key logins when UsePAM=no; '*' = no password, not locked
if [ "$(getent shadow "$SLURM_DEV_USER" | cut -d: -f2)" = '!' ]; then usermod -p '*' "$SLURM_DEV_USER"; fi
USER_HOME=$(getent passwd "$SLURM_DEV_USER" | cut -d: -f6)
USER_GROUP=$(id -gn "$SLURM_DEV_USER")
KEY="$SLURM_DEV_STATE_DIR/id_ed25519"
[ -s "$KEY" ] || ssh-keygen -q -t ed25519 -N '' -C slurm-dev-client -f "$KEY"
PUB=$(cat "$KEY.pub")
add_key() {  # add_key HOME OWNER GROUP
  install -d -m 0700 -o "$2" -g "$3" "$1/.ssh"
  touch "$1/.ssh/authorized_keys"
  grep -qxF "$PUB" "$1/.ssh/authorized_keys" || echo "$PUB" >> "$1/.ssh/authorized_keys"
  chown "$2:$3" "$1/.ssh/authorized_keys"; chmod 0600 "$1/.ssh/authorized_keys"
}
add_key "$USER_HOME" "$SLURM_DEV_USER" "$USER_GROUP"
if [ "$SLURM_DEV_ROOT_SSH" = 1 ]; then add_key /root root root; fi
ssh-keygen -A >/dev/null                    # host keys, only those missing
install -d -m 0755 /run/sshd                # privilege separation dir (normally systemd's job)
NEW_SSHD=$(mktemp)
cat > "$NEW_SSHD" <<EOF
# Managed by slurm-dev-cluster-up.sh -- separate sshd instance for the dev cluster
Port $SLURM_DEV_SSH_PORT
ListenAddress $SLURM_DEV_SSH_LISTEN
HostKey /etc/ssh/ssh_host_ed25519_key
HostKey /etc/ssh/ssh_host_ecdsa_key
HostKey /etc/ssh/ssh_host_rsa_key
PidFile $SSHD_PID
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
AuthorizedKeysFile .ssh/authorized_keys
UsePAM yes
X11Forwarding no
PrintMotd no
MaxStartups 100:30:200
MaxSessions 100
AcceptEnv LANG LC_*
Subsystem sftp /usr/lib/openssh/sftp-server
EOF
SSHD_CHANGED=0
if ! cmp -s "$NEW_SSHD" "$SSHD_CONF"; then install -m 0644 "$NEW_SSHD" "$SSHD_CONF"; SSHD_CHANGED=1; fi
rm -f "$NEW_SSHD"
/usr/sbin/sshd -t -f "$SSHD_CONF" || die "sshd config test failed"
if pid=$(pid_of "$SSHD_PID" sshd) && [ "$SSHD_CHANGED" = 1 ]; then stop_pid "$pid"; fi
if ! pid_of "$SSHD_PID" sshd >/dev/null; then
  /usr/sbin/sshd -f "$SSHD_CONF" -E "$LOG_DIR/sshd.log" </dev/null >/dev/null 2>&1 || die "sshd failed to start"
fi
wait_for "$SLURM_DEV_TIMEOUT" "sshd on 127.0.0.1:$SLURM_DEV_SSH_PORT" port_open "$SLURM_DEV_SSH_PORT" || die "sshd not listening"
mark_started sshd "$(pid_of "$SSHD_PID" sshd)"
KNOWN="$SLURM_DEV_STATE_DIR/known_hosts"
ssh-keyscan -p "$SLURM_DEV_SSH_PORT" -t ed25519,ecdsa,rsa 127.0.0.1 2>/dev/null > "$KNOWN.tmp" && mv "$KNOWN.tmp" "$KNOWN"
SSH_CFG="$SLURM_DEV_STATE_DIR/ssh_config"
cat > "$SSH_CFG" <<EOF
Host slurm-dev
  HostName 127.0.0.1
  Port $SLURM_DEV_SSH_PORT
  User $SLURM_DEV_USER
  IdentityFile $KEY
  IdentitiesOnly yes
  UserKnownHostsFile $KNOWN
  StrictHostKeyChecking yes
  BatchMode yes
EOF
SSH=(ssh -n -F "$SSH_CFG" slurm-dev)   # -n: never eat the caller's stdin
"${SSH[@]}" true || die "ssh as $SLURM_DEV_USER to 127.0.0.1:$SLURM_DEV_SSH_PORT failed; see $LOG_DIR/sshd.log"
log "ready: ssh $SLURM_DEV_USER@127.0.0.1:$SLURM_DEV_SSH_PORT"

# ---------------------------------------------------------------- 8. accounting associations
if [ "$SLURM_DEV_ACCOUNTING" = slurmdbd ]; then
  wait_for "$SLURM_DEV_TIMEOUT" "cluster '$CLUSTER' registered in slurmdbd" \
    bash -c "sacctmgr -n -P list cluster format=cluster | grep -qx $CLUSTER" || die "cluster not registered in slurmdbd"
  sacctmgr -n -P list account dev format=account | grep -qx dev \
    || sacctmgr -i add account dev Description=dev Organization=dev >/dev/null
  sacctmgr -n -P list user "$SLURM_DEV_USER" format=user | grep -qx "$SLURM_DEV_USER" \
    || sacctmgr -i add user "$SLURM_DEV_USER" DefaultAccount=dev >/dev/null
fi

# ---------------------------------------------------------------- 9. smoke test
if [ "$SLURM_DEV_SMOKE_TEST" = 1 ]; then
  JOB=$("${SSH[@]}" "sbatch --parsable --job-name=slurm-dev-smoke --output=/dev/null --wrap=true") \
    || die "smoke sbatch failed"
  job_done() { [ "$(scontrol show job "$JOB" 2>/dev/null | grep -o 'JobState=[A-Z_]*')" = JobState=COMPLETED ]; }
  wait_for "$SLURM_DEV_TIMEOUT" "smoke job $JOB COMPLETED" job_done \
    || { scontrol show job "$JOB" >&2 || true; die "smoke job $JOB did not complete"; }
fi

# ---------------------------------------------------------------- 10. connection info
ENV_FILE="$SLURM_DEV_STATE_DIR/cluster.env"
cat > "$ENV_FILE" <<EOF
SLURM_DEV_SSH_HOST=127.0.0.1
SLURM_DEV_SSH_PORT=$SLURM_DEV_SSH_PORT
SLURM_DEV_SSH_USER=$SLURM_DEV_USER
SLURM_DEV_SSH_KEY=$KEY
SLURM_DEV_SSH_KNOWN_HOSTS=$KNOWN
SLURM_DEV_SSH_CONFIG=$SSH_CFG
SLURM_DEV_USER_HOME=$USER_HOME
SLURM_DEV_PARTITION=$PARTITION
SLURM_DEV_CLUSTER=$CLUSTER
SLURM_DEV_NODE=$NODE
SLURM_DEV_CPUS=$CPUS
SLURM_DEV_ACCOUNTING=$SLURM_DEV_ACCOUNTING
SLURM_DEV_SLURM_VERSION=$SLURM_VERSION
EOF
chmod 0644 "$ENV_FILE"
# readable by every user (the key directory is not): lets airflow-oellm detect the platform `devcluster`
echo "# airflow-oellm dev cluster ($CLUSTER); see scripts/dev-cluster.sh" > "$SLURM_ETC/oellm-dev-cluster"
chmod 0644 "$SLURM_ETC/oellm-dev-cluster"
pids() { local out="" d f
  for d in munged:/run/munge/munged.pid mariadbd:/run/mysqld/mysqld.pid slurmdbd:$RUN_SLURM/slurmdbd.pid \
           slurmctld:$RUN_SLURM/slurmctld.pid slurmd:$RUN_SLURM/slurmd.pid sshd:$SSHD_PID; do
    f=${d#*:}; d=${d%%:*}; p=$(pid_of "$f" "$d" 2>/dev/null) && out="$out $d=$p"
  done; echo "${out# }"; }
log "cluster up in $(awk -v a="$T_START" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')s"
cat <<EOF
======================================================================
 SLURM dev cluster is up  (slurm $SLURM_VERSION, accounting=$SLURM_DEV_ACCOUNTING)
   node $NODE  CPUs=$CPUS  partition=$PARTITION (default)  cluster=$CLUSTER
   daemons: $(pids)
   ssh:  ssh -F $SSH_CFG slurm-dev sbatch --parsable --wrap=hostname
         ssh -p $SLURM_DEV_SSH_PORT -i $KEY -o UserKnownHostsFile=$KNOWN $SLURM_DEV_USER@127.0.0.1 squeue
   env:  $ENV_FILE  (source it: set -a; . $ENV_FILE; set +a)
   logs: $LOG_DIR/{slurmctld,slurmd,slurmdbd,sshd,mariadb}.log, jobcomp: $LOG_DIR/jobcomp.log
   down: scripts/dev-cluster.sh down [--purge]
======================================================================
EOF
