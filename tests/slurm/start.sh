#!/usr/bin/env bash
# Start a one-node Slurm cluster on localhost for tests/test_slurm.py (as root; Debian's slurmctld, slurmd,
# slurm-client and munge): munged, then slurmctld and slurmd with a slurm.conf written into DIR.
#   tests/slurm/start.sh DIR      # prints `export SLURM_CONF=DIR/slurm.conf`; tests/slurm/stop.sh DIR stops it
# No cgroups (ProctrackType=proctrack/linuxproc, TaskPlugin=task/none), no accounting database (job status via
# squeue; MinJobAge keeps finished jobs visible to it), partitions "cpu" (default) and "gpu" (the names
# workflow/profiles/slurm uses), both on this host.
set -euo pipefail
DIR=$(realpath -m "${1:?usage: start.sh DIR}")
mkdir -p "$DIR"/{state,spool,log,run,munge}
for tool in munged slurmctld slurmd sinfo; do
  command -v "$tool" >/dev/null ||
    { echo "start.sh: $tool not found (apt-get install munge slurmctld slurmd slurm-client)" >&2; exit 3; }
done
[ "$(id -u)" = 0 ] || { echo "start.sh: run as root (slurmd starts jobs as their owner)" >&2; exit 3; }

# munge: its own key, socket and pid file in DIR, run as root like the daemons below (DIR may sit in a folder the
# munge user cannot enter, e.g. pytest's tmp); a system munged, if any, is left alone
KEY="$DIR/munge/munge.key"
[ -s "$KEY" ] || { dd if=/dev/urandom of="$KEY" bs=1 count=1024 status=none; }
chmod 700 "$DIR/munge"; chmod 400 "$KEY"
SOCKET="$DIR/munge/munge.socket"
munged --key-file="$KEY" --socket="$SOCKET" --pid-file="$DIR/munge/munged.pid" \
  --log-file="$DIR/munge/munged.log" --seed-file="$DIR/munge/munged.seed" --force

HOST=$(hostname -s)
NODE=$(slurmd -C | head -1 | sed -E 's/ *(Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore)=[0-9]+//g')
MEM=$(sed -nE 's/.*RealMemory=([0-9]+).*/\1/p' <<<"$NODE")
NODE=$(sed -E "s/RealMemory=[0-9]+/RealMemory=$((MEM * 9 / 10))/" <<<"$NODE")
cat > "$DIR/slurm.conf" <<CONF
ClusterName=cloaktest
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCKET
SlurmctldPort=${CLOAK_SLURMCTLD_PORT:-16817}
SlurmdPort=${CLOAK_SLURMD_PORT:-16818}
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
SchedulerType=sched/backfill
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
MinJobAge=3600
DefMemPerCPU=1000
KillWait=5
SlurmdTimeout=60
InactiveLimit=0
$NODE State=UNKNOWN
PartitionName=cpu Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$HOST MaxTime=INFINITE State=UP
CONF
echo > "$DIR/cgroup.conf"
export SLURM_CONF="$DIR/slurm.conf"
# Inside a job, snakemake-executor-plugin-slurm-jobstep (0.6.1) runs the rule through `srun` with every SLURM_*
# variable but a few ids removed — SLURM_CONF included — so srun only finds the default /etc/slurm/slurm.conf.
# Point that at this cluster's config when no real one is there (stop.sh removes the link).
DEFAULT_CONF=/etc/slurm/slurm.conf
if [ ! -e "$DEFAULT_CONF" ] || { [ -L "$DEFAULT_CONF" ] && [ "${CLOAK_SLURM_RELINK:-1}" = 1 ]; }; then
  mkdir -p /etc/slurm && ln -sfn "$SLURM_CONF" "$DEFAULT_CONF"
else
  echo "start.sh: $DEFAULT_CONF exists; jobs run by the Snakemake Slurm executor will read it, not $SLURM_CONF" >&2
fi
slurmctld -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF"
for _ in $(seq 60); do
  if sinfo -h -o '%t' 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then
    echo "export SLURM_CONF=$SLURM_CONF"
    exit 0
  fi
  sleep 1
done
echo "start.sh: the node did not come up; logs in $DIR/log:" >&2
tail -n 20 "$DIR"/log/*.log "$DIR/munge/munged.log" >&2 || true
sinfo >&2 || true
exit 1
