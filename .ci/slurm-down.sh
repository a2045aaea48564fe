#!/usr/bin/env bash
# Stop the daemons that .ci/slurm-up.sh started (slurmd, slurmctld, slurmdbd, MariaDB, munged), each by the
# pid in its pid file: SIGTERM, then wait up to 20 s for it to exit. Packages and configs stay installed,
# so a later .ci/slurm-up.sh starts them again in a few seconds.
set -u
for f in /run/slurm/slurmd.pid /run/slurm/slurmctld.pid /run/slurm/slurmdbd.pid /run/mysqld/mysqld.pid \
         /run/munge/munged.pid; do
  [ -s "$f" ] || continue
  p=$(cat "$f")
  kill -TERM "$p" 2>/dev/null || continue
  for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
  kill -0 "$p" 2>/dev/null && echo "[slurm-down] pid $p of $f is still running" >&2
done
exit 0
