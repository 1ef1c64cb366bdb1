#!/usr/bin/env bash
# Stop what tests/slurm/start.sh DIR started (by the pid files it wrote), leaving DIR's logs.
DIR=$(realpath -m "${1:?usage: stop.sh DIR}")
for pidfile in "$DIR/run/slurmd.pid" "$DIR/run/slurmctld.pid" "$DIR/munge/munged.pid"; do
  [ -s "$pidfile" ] || continue
  pid=$(cat "$pidfile")
  kill "$pid" 2>/dev/null || continue
  for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
done
if [ -L /etc/slurm/slurm.conf ] && [ "$(readlink /etc/slurm/slurm.conf)" = "$DIR/slurm.conf" ]; then
  rm -f /etc/slurm/slurm.conf
fi
exit 0
