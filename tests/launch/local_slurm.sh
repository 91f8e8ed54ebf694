#!/bin/bash
# A real Slurm controller and compute node on localhost, for the launch tests (run as root).
# Debian's munge, slurmctld and slurmd, started by hand (no systemd in CI containers).
#   local_slurm.sh up     install if missing, start the daemons, wait for the node to be idle
#   local_slurm.sh down   stop what `up` started
# Notes: munged needs /run/munge owned by munge; MinJobAge is small so `sbatch --wait` returns
# quickly; CPUs=4 with config_overrides lets 4 single-thread tasks share a 2-core machine;
# EnforcePartLimits rejects (instead of pending forever) a job larger than the node.
set -euo pipefail
LAB=${SEQTRAIN_SLURM_LAB:-/tmp/seqtrain-slurm}
action=${1:-up}

stop() {
  local pids
  pids="$(cat "$LAB/slurmctld.pid" "$LAB/slurmd.pid" 2>/dev/null || true)"
  scontrol shutdown >/dev/null 2>&1 || true
  for _ in $(seq 50); do
    local alive=0
    for p in $pids; do kill -0 "$p" 2>/dev/null && alive=1; done
    [[ $alive == 0 ]] && break
    sleep 0.2
  done
  for p in $pids; do kill -9 "$p" 2>/dev/null || true; done
  if [[ -f /run/munge/munged.pid ]]; then kill "$(cat /run/munge/munged.pid)" 2>/dev/null || true; fi
}

if [[ $action == down ]]; then stop; exit 0; fi

mkdir -p "$LAB"/{state,spool,log}
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >"$LAB/apt.log" 2>&1
  apt-get install -y -q --no-install-recommends munge slurmctld slurmd slurm-client >>"$LAB/apt.log" 2>&1
fi
stop  # a previous run's daemons hold sockets and locks
# A fresh controller state: jobs of a previous session must not be recovered and run again.
rm -rf "${LAB:?}/state" "${LAB:?}/spool"
mkdir -p "$LAB"/{state,spool}
[[ -s /etc/munge/munge.key ]] || mungekey --create --force
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
install -d -o munge -g munge -m 0755 /run/munge
runuser -u munge -- /usr/sbin/munged
munge -n | unmunge >/dev/null
cat >/etc/slurm/slurm.conf <<CONF
ClusterName=seqtrain
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$LAB/state
SlurmdSpoolDir=$LAB/spool
SlurmctldPidFile=$LAB/slurmctld.pid
SlurmdPidFile=$LAB/slurmd.pid
SlurmctldLogFile=$LAB/log/slurmctld.log
SlurmdLogFile=$LAB/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
EnforcePartLimits=ALL
MinJobAge=4
KillWait=30
NodeName=localhost NodeAddr=127.0.0.1 CPUs=4 RealMemory=16000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
slurmctld
slurmd -N localhost
for _ in $(seq 150); do
  [[ "$(sinfo -h -o %t 2>/dev/null)" == idle ]] && { sinfo; exit 0; }
  sleep 0.2
done
echo "slurm node did not become idle; see $LAB/log" >&2
exit 1
