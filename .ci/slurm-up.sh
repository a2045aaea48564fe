#!/usr/bin/env bash
# Bring up a real single-node Slurm cluster on this machine, by hand (no systemd), for tests/test_slurm.py.
#
# What it does (idempotent: run it again and it only starts what is not running):
#   1. installs Debian's slurmctld slurmd slurm-client munge (+ slurmdbd mariadb-server with WITH_DBD=1)
#      when they are missing;
#   2. starts munged, then (WITH_DBD=1) MariaDB + slurmdbd so that `sacct` works, and registers the cluster;
#   3. writes /etc/slurm/slurm.conf for this host (all CPUs, 80% of the memory, partition `debug`,
#      FAKE_GPUS count-only GPUs as GRES so that `--gpus=N` requests of profiles/slurm can be scheduled);
#   4. starts slurmctld and slurmd and waits until `sinfo` shows the node idle.
# Exit status 0 = the node is idle; non-zero = Slurm is not usable (tests/test_slurm.py then skips with
# the reason). If MariaDB/slurmdbd cannot start, it falls back to accounting_storage/none (then `sacct`
# fails and the test uses `--slurm-status-command squeue`).
#
# Environment: WITH_DBD=1 (default) / 0; FAKE_GPUS=2 (default; 0 = no GPU GRES); PARTITION=debug.
# Stop everything again with .ci/slurm-down.sh. Logs: /var/log/slurm/*.log.
# Tested on Debian 12 (Slurm 22.05.8, MariaDB 10.11) as root; adapted from shared/notes/slurm-feasibility.md.
set -euo pipefail
WITH_DBD=${WITH_DBD:-1}
FAKE_GPUS=${FAKE_GPUS:-2}
PARTITION=${PARTITION:-debug}
HOST=$(hostname -s)
export DEBIAN_FRONTEND=noninteractive
log() { echo "[slurm-up] $*"; }
# running PIDFILE: the daemon named in PIDFILE is alive
running() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
# stop PIDFILE: SIGTERM the daemon of PIDFILE and wait until it is gone (at most 30 s)
stop() {
  running "$1" || return 0
  local p; p=$(cat "$1"); kill -TERM "$p" 2>/dev/null || return 0
  for _ in $(seq 150); do kill -0 "$p" 2>/dev/null || return 0; sleep 0.2; done
}

if [ "$(id -u)" != 0 ]; then log "must run as root"; exit 1; fi

# ---- packages -------------------------------------------------------------------------------------
pkgs="slurmctld slurmd slurm-client munge"
[ "$WITH_DBD" = 1 ] && pkgs="$pkgs slurmdbd mariadb-server"
# shellcheck disable=SC2086
if ! dpkg -s $pkgs >/dev/null 2>&1; then
  log "installing $pkgs"
  # shellcheck disable=SC2086
  apt-get update -qq && apt-get install -y -qq $pkgs >/dev/null
fi

# the controller's host name must resolve (SlurmctldHost)
getent hosts "$HOST" >/dev/null || echo "127.0.0.1 $HOST" >>/etc/hosts

# ---- munge ----------------------------------------------------------------------------------------
if [ ! -s /etc/munge/munge.key ]; then
  mungekey -c -f -k /etc/munge/munge.key
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
fi
install -d -o munge -g munge -m 0755 /run/munge   # systemd's tmpfiles would make it; munged refuses to start without
running /run/munge/munged.pid || runuser -u munge -- /usr/sbin/munged
for _ in $(seq 50); do munge -n >/dev/null 2>&1 && break; sleep 0.1; done
munge -n | unmunge >/dev/null || { log "munge does not work"; exit 1; }

install -d -o slurm -g slurm /var/spool/slurmctld /var/log/slurm /run/slurm
install -d /var/spool/slurmd

# ---- slurm.conf -----------------------------------------------------------------------------------
MEM=$(( $(awk '/MemTotal/{print int($2/1024)}' /proc/meminfo) * 8 / 10 ))
GRES_NODE="" GRES_TYPES=""
if [ "$FAKE_GPUS" -gt 0 ]; then
  # Fake GPUs: slurmd drops file-less GPUs, and wants character devices, so each one is a symlink to
  # /dev/null. Slurm schedules --gpus=N / --gres=gpu:N requests on them (and sets CUDA_VISIBLE_DEVICES).
  install -d /var/spool/slurmd/fake-gpus
  for i in $(seq 0 $((FAKE_GPUS - 1))); do ln -sfn /dev/null "/var/spool/slurmd/fake-gpus/gpu$i"; done
  GRES_TYPES="GresTypes=gpu"
  GRES_NODE="Gres=gpu:$FAKE_GPUS"
  echo "NodeName=$HOST Name=gpu File=/var/spool/slurmd/fake-gpus/gpu[0-$((FAKE_GPUS - 1))]" >/etc/slurm/gres.conf
else
  rm -f /etc/slurm/gres.conf
fi

# write_conf ACCOUNTING: (re)write slurm.conf with accounting `slurmdbd` or `none`; when it changed,
# stop slurmctld/slurmd so that they start again below with the new file
write_conf() {
  local acct new_conf
  if [ "$1" = slurmdbd ]; then
    acct="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819"
    # record GPU allocations too, so that `sacct -o AllocTRES` shows gres/gpu=N
    [ "$FAKE_GPUS" -gt 0 ] && acct="$acct
AccountingStorageTRES=gres/gpu"
  else
    acct="AccountingStorageType=accounting_storage/none"
  fi
  new_conf=$(mktemp)
  cat >"$new_conf" <<CONF
# Written by .ci/slurm-up.sh: a single-node test cluster (no cgroups, no systemd).
ClusterName=sandbox
SlurmctldHost=$HOST
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
ReturnToService=2
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
JobAcctGatherType=jobacct_gather/none
$acct
JobCompType=jobcomp/filetxt
JobCompLoc=/var/log/slurm/jobcomp.log
# finished jobs stay visible to squeue for 5 min (the executor plugin's squeue status fallback needs that)
MinJobAge=300
$GRES_TYPES
NodeName=$HOST CPUs=$(nproc) RealMemory=$MEM $GRES_NODE State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
  if ! cmp -s "$new_conf" /etc/slurm/slurm.conf; then
    log "writing /etc/slurm/slurm.conf (accounting $1)"
    cp "$new_conf" /etc/slurm/slurm.conf && chmod 644 /etc/slurm/slurm.conf
    stop /run/slurm/slurmd.pid
    stop /run/slurm/slurmctld.pid
  fi
  rm -f "$new_conf"
}

# ---- MariaDB + slurmdbd (for sacct) ------------------------------------------------------------------
dbd_ok=0
if [ "$WITH_DBD" = 1 ]; then
  install -d -o mysql -g mysql /run/mysqld
  if ! mariadb -e 'select 1' >/dev/null 2>&1; then
    /usr/sbin/mariadbd --user=mysql --pid-file=/run/mysqld/mysqld.pid --socket=/run/mysqld/mysqld.sock \
      >/var/log/slurm/mariadb.out 2>&1 &
    for _ in $(seq 150); do mariadb -e 'select 1' >/dev/null 2>&1 && break; sleep 0.2; done
  fi
  if mariadb -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmpw';
                 CREATE DATABASE IF NOT EXISTS slurm_acct_db;
                 GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';" 2>/var/log/slurm/mariadb-setup.err; then
    cat >/etc/slurm/slurmdbd.conf <<CONF
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=slurm
LogFile=/var/log/slurm/slurmdbd.log
PidFile=/run/slurm/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageLoc=slurm_acct_db
StorageUser=slurm
StoragePass=slurmpw
CONF
    chown slurm:slurm /etc/slurm/slurmdbd.conf && chmod 600 /etc/slurm/slurmdbd.conf   # slurmdbd insists
    write_conf slurmdbd   # sacctmgr refuses to work unless slurm.conf names slurmdbd
    running /run/slurm/slurmdbd.pid || /usr/sbin/slurmdbd
    for _ in $(seq 100); do sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 0.2; done
    if sacctmgr -n list cluster format=cluster 2>/dev/null | grep -qw sandbox ||
       sacctmgr -i add cluster sandbox >/dev/null; then   # this also creates account `root` + root's association
      dbd_ok=1
    fi
  fi
  [ "$dbd_ok" = 1 ] || log "MariaDB/slurmdbd did not come up (see /var/log/slurm/); going on without accounting"
fi
[ "$dbd_ok" = 1 ] || write_conf none

# ---- controller + node daemon ----------------------------------------------------------------------
running /run/slurm/slurmctld.pid || /usr/sbin/slurmctld
running /run/slurm/slurmd.pid || /usr/sbin/slurmd
for _ in $(seq 150); do
  sinfo -h -o '%T' 2>/dev/null | grep -qx idle && break
  # a node left DOWN/DRAINED by an earlier run comes back with RESUME
  sinfo -h -o '%T' 2>/dev/null | grep -Eq 'down|drain' && scontrol update NodeName="$HOST" State=RESUME 2>/dev/null
  sleep 0.2
done
sinfo
if ! sinfo -h -o '%T' | grep -qx idle; then
  log "node $HOST is not idle; see /var/log/slurm/slurmctld.log and slurmd.log"
  exit 1
fi
log "ready: partition $PARTITION, node $HOST, accounting $([ "$dbd_ok" = 1 ] && echo slurmdbd || echo none), gpus $FAKE_GPUS"
