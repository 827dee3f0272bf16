#!/usr/bin/env bash
# Single-node SLURM (Debian bookworm, slurm-wlm 22.05) for testing a Snakemake SLURM profile.
# Needs root; no systemd: munged, slurmctld and slurmd (and, with ACCOUNTING=1, mariadbd and
# slurmdbd) are started by hand in the background. Safe to re-run (restarts slurmctld/slurmd).
#   bash tools/slurm_single_node.sh                 # install + configure + start; prints the daemon PIDs
#   FAKE_GPUS=0 bash tools/slurm_single_node.sh     # no GPU GRES: sbatch --gpus=1 fails ("Invalid generic resource")
#   ACCOUNTING=1 bash tools/slurm_single_node.sh    # + MariaDB/slurmdbd: sacct, sacctmgr, account checks work
#   bash tools/slurm_single_node.sh stop            # stop the daemons by their pid files
# Partitions: "cpu" (default) and "gpu", both on this one node. With FAKE_GPUS=N (default 1) the node
# advertises N fake GPUs (Gres=gpu:N backed by empty files: slurmd drops file-less GPUs), so
# `sbatch --gpus=1` is accepted; the job sees SLURM_GPUS_ON_NODE=1, no CUDA device, runs on the CPU.
# ACCOUNTING=0 (default): AccountingStorageType=accounting_storage/none. sacct then fails
# ("Slurm accounting storage is disabled") and snakemake-executor-plugin-slurm, which queries job
# status with sacct by default, never sees a job finish (silent hang): run snakemake with
# `--slurm-status-command squeue` (`slurm-status-command: squeue` in the profile). MinJobAge=600
# keeps finished jobs visible to squeue longer than the plugin's longest check interval (180 s).
# ACCOUNTING=1: account $SLURM_ACCOUNT (default "ci") is created for the calling user.
set -euo pipefail

STATE=${SLURM_TEST_STATE:-/var/lib/slurm-test}

if [[ ${1:-} == stop ]]; then
    for f in "$STATE/slurmd.pid" "$STATE/slurmctld.pid" "$STATE/slurmdbd.pid" \
             /run/mysqld/mysqld.pid /run/munge/munged.pid; do
        if [[ -s $f ]]; then
            pid=$(cat "$f")
            if kill "$pid" 2>/dev/null; then echo "stopped $f ($pid)"; else echo "$f: $pid not running"; fi
        fi
    done
    exit 0
fi

NODE=$(hostname -s)
CPUS=${SLURM_CPUS:-$(nproc)}
# ~85% of physical memory, in MB (slurmd drains a node that claims more than it has)
MEM_MB=${SLURM_MEM_MB:-$(awk '/MemTotal/ {print int($2 / 1024 * 0.85)}' /proc/meminfo)}
FAKE_GPUS=${FAKE_GPUS:-1}
ACCOUNTING=${ACCOUNTING:-0}
SLURM_ACCOUNT=${SLURM_ACCOUNT:-ci}
USER_NAME=${SUDO_USER:-$(id -un)}

# 1. packages (slurm-client: sbatch, squeue, sinfo, sacct, scontrol). In Docker images,
#    /usr/sbin/policy-rc.d (exit 101) keeps apt from starting the services; we start them below.
export DEBIAN_FRONTEND=noninteractive
PKGS="munge slurmctld slurmd slurm-client"
(( ACCOUNTING )) && PKGS="$PKGS slurmdbd mariadb-server"
need_install=0
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need_install=1
done
if (( need_install )); then
    apt-get update -q
    apt-get install -y -q --no-install-recommends $PKGS
fi

# 2. munge: key (the Debian package usually creates one) and daemon
if [[ ! -s /etc/munge/munge.key ]]; then
    mungekey --create --keyfile /etc/munge/munge.key
fi
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
chmod 755 /run/munge
if ! munge -n >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 20); do munge -n >/dev/null 2>&1 && break; sleep 0.5; done
fi
munge -n | unmunge >/dev/null

mkdir -p /etc/slurm "$STATE/ctld" "$STATE/d" /var/log/slurm

# 3. optional accounting: MariaDB + slurmdbd
ACCT_CONF="AccountingStorageType=accounting_storage/none"
if (( ACCOUNTING )); then
    mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
    if ! mysqladmin ping >/dev/null 2>&1; then
        runuser -u mysql -- /usr/sbin/mariadbd --pid-file=/run/mysqld/mysqld.pid \
            --socket=/run/mysqld/mysqld.sock >/var/log/slurm/mariadbd.log 2>&1 &
        for _ in $(seq 60); do mysqladmin ping >/dev/null 2>&1 && break; sleep 0.5; done
    fi
    mysql -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
              CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmdbpass';
              GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
    cat > /etc/slurm/slurmdbd.conf <<DBD
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurmdbpass
StorageLoc=slurm_acct_db
PidFile=$STATE/slurmdbd.pid
LogFile=/var/log/slurm/slurmdbd.log
DBD
    chmod 600 /etc/slurm/slurmdbd.conf
    if ! { [[ -s $STATE/slurmdbd.pid ]] && kill -0 "$(cat "$STATE/slurmdbd.pid")" 2>/dev/null; }; then
        /usr/sbin/slurmdbd
    fi
    ACCT_CONF="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/linux"
fi

# 4. slurm.conf (+ gres.conf for the fake GPUs)
GRES_NODE=""
GRES_TYPES=""
if (( FAKE_GPUS > 0 )); then
    GRES_NODE="Gres=gpu:$FAKE_GPUS"
    GRES_TYPES="GresTypes=gpu"
    : > /etc/slurm/gres.conf
    for i in $(seq 0 $((FAKE_GPUS - 1))); do   # slurmd drops GPUs without a File: empty files stand in
        touch "$STATE/fake-gpu$i"
        echo "NodeName=$NODE Name=gpu File=$STATE/fake-gpu$i" >> /etc/slurm/gres.conf
    done
else
    rm -f /etc/slurm/gres.conf
fi
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=ci
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
SchedulerType=sched/backfill
MinJobAge=600
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
$ACCT_CONF
JobCompType=jobcomp/none
$GRES_TYPES
NodeName=$NODE CPUs=$CPUS RealMemory=$MEM_MB $GRES_NODE State=UNKNOWN
PartitionName=cpu Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$NODE MaxTime=INFINITE State=UP
CONF

# 5. daemons (slurmctld -c: start without saved jobs/state)
for f in "$STATE/slurmctld.pid" "$STATE/slurmd.pid"; do
    if [[ -s $f ]]; then kill "$(cat "$f")" 2>/dev/null || true; fi
done
sleep 1
if (( ACCOUNTING )); then   # the cluster must be known to slurmdbd before slurmctld registers
    for _ in $(seq 30); do sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 0.5; done
    sacctmgr -i add cluster ci >/dev/null 2>&1 || true
fi
/usr/sbin/slurmctld -c
for _ in $(seq 30); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.5; done
/usr/sbin/slurmd
for _ in $(seq 60); do sinfo -h -N -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)' && break; sleep 0.5; done

if (( ACCOUNTING )); then
    sacctmgr -i add account "$SLURM_ACCOUNT" cluster=ci >/dev/null 2>&1 || true
    sacctmgr -i add user "$USER_NAME" account="$SLURM_ACCOUNT" cluster=ci >/dev/null 2>&1 || true
    echo "accounts of $USER_NAME: $(sacctmgr -n -s list user "$USER_NAME" format=account%20 | xargs)"
fi

sinfo
if ! sinfo -h -N -o %t | grep -qE '^(idle|mix|alloc)'; then
    sinfo -N -o '%N %t %E'; echo "node not usable; see /var/log/slurm/slurmd.log" >&2; exit 1
fi
timeout 60 srun -J setup-check -N1 -n1 -t 1 hostname
if (( FAKE_GPUS > 0 )); then timeout 60 srun -J setup-check -p gpu --gpus=1 -t 1 printenv SLURM_GPUS_ON_NODE; fi
if (( ACCOUNTING )); then   # the job records reach slurmdbd a few seconds later
    for _ in $(seq 20); do
        [[ -n $(sacct -X -n -S now-2minutes --name setup-check -o JobID) ]] && break; sleep 1
    done
    sacct -X -n -S now-2minutes --name setup-check -o JobID,JobName,Partition,Account,State
fi
echo "PIDs: munged $(cat /run/munge/munged.pid) slurmctld $(cat "$STATE/slurmctld.pid")" \
     "slurmd $(cat "$STATE/slurmd.pid")" \
     "$( (( ACCOUNTING )) && echo "mariadbd $(cat /run/mysqld/mysqld.pid) slurmdbd $(cat "$STATE/slurmdbd.pid")")"
