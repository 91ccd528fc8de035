#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, for `craft-run -m hydra/launcher=local_slurm ...`
# and tests/test_slurm.py. Needs root and Debian's package registry (first call only).
#   scripts/local_slurm.sh          # install if missing, configure, start, wait until the node is idle
#   scripts/local_slurm.sh stop     # stop slurmd, slurmctld and munged
# Idempotent: running daemons are left alone unless slurm.conf had to change.
set -euo pipefail

CONF=/etc/slurm/slurm.conf
PARTITION=${LOCAL_SLURM_PARTITION:-local}
MEM_MARGIN_MB=${LOCAL_SLURM_MEM_MARGIN_MB:-1024}  # left to the OS and the daemons
PIDS=(/run/slurmd.pid /run/slurmctld.pid /run/munge/munged.pid)  # stop order: reverse of start

running() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop() {
  local f pid
  for f in "${PIDS[@]}"; do
    running "$f" || continue
    pid=$(cat "$f")
    kill "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  done
}

if [[ ${1:-start} == stop ]]; then stop; echo "local SLURM stopped"; exit 0; fi
[[ $(id -u) == 0 ]] || { echo "local_slurm.sh: needs root" >&2; exit 1; }

# 1. Packages (Debian's slurm-wlm 22.05 and munge). --no-install-recommends keeps it to the daemons.
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi

# 2. munge: the key and directories must belong to the munge user, or munged refuses to start.
install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 0755 /run/munge
[[ -s /etc/munge/munge.key ]] || runuser -u munge -- mungekey --create --keyfile=/etc/munge/munge.key
chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key

# 3. slurm.conf: this host is controller and only node. linuxproc + task/none need no cgroups
# (none in containers); accounting off, so no slurmdbd (submitit then warns that sacct fails).
HOST=$(hostname -s)
CPUS=$(nproc)
MEM=$(( $(free -m | awk '/^Mem:/{print $2}') - MEM_MARGIN_MB ))
install -d /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
NEW=$(cat <<EOF
# Written by scripts/local_slurm.sh: a one-node cluster on $HOST.
ClusterName=local
SlurmctldHost=$HOST
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
# CPUs and memory are both consumable, so jobs asking for 1 CPU run side by side.
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
# A node that was down (e.g. after a restart) comes back by itself once slurmd registers.
ReturnToService=2
# A requeued or cancelled job is killed 5 s after its SIGTERM (30 s by default): short, so a test's job
# cannot finish its training inside that grace and make the requeue a no-op.
KillWait=5
NodeName=$HOST CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=$PARTITION Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
)
if [[ ! -f $CONF || $(cat "$CONF") != "$NEW" ]]; then
  stop  # daemons running on an older slurm.conf would disagree with it
  printf '%s\n' "$NEW" > "$CONF"
fi

# 4. Daemons, in dependency order: slurmctld and slurmd authenticate every message with munge.
running /run/munge/munged.pid || runuser -u munge -- munged
running /run/slurmctld.pid || slurmctld
t0=$(date +%s)
running /run/slurmd.pid && t0=0 || slurmd

# 5. Wait until the node takes jobs. A restarted slurmctld restores the node as idle from its saved
# state before slurmd has registered, so also wait for the new slurmd's start time to show up.
registered() {
  local t
  t=$(scontrol show node "$HOST" 2>/dev/null | grep -o 'SlurmdStartTime=[^ ]*' | cut -d= -f2)
  [[ $t == 20* ]] && (( $(date -d "$t" +%s) >= t0 ))
}
state= ready=
for i in $(seq 120); do
  state=$(sinfo -h -n "$HOST" -o %T 2>/dev/null | head -1 || true)
  [[ $state == idle ]] && registered && { ready=1; break; }
  # A node left down/drained by an earlier run: resume it once.
  [[ $i == 10 && $state =~ ^(down|drain) ]] && scontrol update nodename="$HOST" state=resume || true
  sleep 0.5
done
if [[ -z $ready ]]; then
  reg=$(registered && echo yes || echo no)
  echo "local_slurm.sh: after 60 s node $HOST is '${state:-not answering}', slurmd registered: $reg" >&2
  tail -n 5 /var/log/slurm/*.log >&2 || true  # the daemons' own reasons
  exit 1
fi
echo "local SLURM ready: node $HOST idle, partition $PARTITION, $CPUS CPUs, ${MEM} MB"
