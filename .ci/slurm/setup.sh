#!/usr/bin/env bash
# Start a single-node SLURM cluster on this machine (Debian 12, SLURM 22.05) for the `pytest -m slurm` tests.
#
#   sudo bash .ci/slurm/setup.sh          # then: pytest -m slurm
#
# What it does, in order (every step is skipped when already done, so running it twice is safe):
#   1. apt-installs slurm-wlm, munge, slurmdbd, mariadb-server (without letting the packages start services);
#   2. starts munged;
#   3. writes /etc/slurm/{slurm.conf,gres.conf} from the templates next to this script, with the node's real
#      CPU topology and memory (`slurmd -C`), cgroup-free plugins and two partitions (cpu, gpu);
#   4. starts MariaDB and slurmdbd (slurmdbd.conf), registers cluster/account/users with sacctmgr;
#   5. starts slurmctld and slurmd (restarting them if the configuration changed);
#   6. waits for the node to be idle and runs one `sbatch --wrap` job per partition, checked with sacct.
#
# No systemd: containers have none, so every daemon is started directly; pid files live in /run/slurm (and
# /run/munge, /run/mysqld), logs in /var/log/slurm.
#
# Why accounting (slurmdbd + MariaDB) at all: snakemake-executor-plugin-slurm polls job states with `sacct`
# whenever the sacct binary exists; without an accounting store sacct fails on SLURM 22.05, and plugin 2.8.0
# then silently drops the job from its watch list, so the workflow hangs.  Details: docs/slurm.md.
#
# Environment knobs:
#   SLURM_ACCOUNTING=slurmdbd|none  default slurmdbd; "none" reproduces the hang described in docs/slurm.md
#   SLURM_FAKE_GPUS=N               count-only GPU GRES on the node (default 2; 0 = no GRES at all)
#   SLURM_CLUSTER=name              ClusterName and sacctmgr cluster (default ncpipe)
#   SLURM_ACCOUNT=name              account that root and $SUDO_USER (and SLURM_USERS) are added to (default ncpipe)
#   SLURM_USERS="u1 u2"             further users to register in the accounting database
#   SLURM_SETUP_TIMEOUT=seconds     how long to wait for each daemon / the test job (default 120)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ACCOUNTING="${SLURM_ACCOUNTING:-slurmdbd}"
FAKE_GPUS="${SLURM_FAKE_GPUS:-2}"
CLUSTER="${SLURM_CLUSTER:-ncpipe}"
ACCOUNT="${SLURM_ACCOUNT:-ncpipe}"
TIMEOUT="${SLURM_SETUP_TIMEOUT:-120}"
ETC=/etc/slurm
LOGDIR=/var/log/slurm
RUNDIR=/run/slurm
DBNAME=slurm_acct_db
DBUSER=slurm
T0=$SECONDS

log() { printf '[slurm-setup %4ds] %s\n' "$((SECONDS - T0))" "$*" >&2; }

# Everything a person needs to see when the cluster does not come up.
diagnostics() {
    set +e
    log "---- diagnostics ----"
    for f in "$LOGDIR"/slurmctld.log "$LOGDIR"/slurmd.log "$LOGDIR"/slurmdbd.log "$LOGDIR"/mariadb.log \
             /var/log/munge/munged.log; do
        [[ -f $f ]] && { echo "== tail -n 25 $f"; tail -n 25 "$f"; }
    done
    echo "== processes"; ps -eo pid,user,args | grep -E '[m]unged|[m]ariadbd|[s]lurm(ctld|d|dbd)'
    echo "== scontrol ping"; timeout 10 scontrol ping
    echo "== sinfo"; timeout 10 sinfo -N -l
    echo "== scontrol show node"; timeout 10 scontrol show node
    echo "== squeue"; timeout 10 squeue -a
    log "---- end of diagnostics ----"
}
die() { log "ERROR: $*"; diagnostics >&2; exit 1; }
trap 'die "command failed (line $LINENO): $BASH_COMMAND"' ERR

# wait_for SECONDS DESCRIPTION COMMAND...: poll COMMAND every second until it succeeds.
wait_for() {
    local secs=$1 what=$2; shift 2
    local i
    for ((i = 0; i < secs; i++)); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 1
    done
    die "timed out after ${secs}s waiting for $what"
}

pid_alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

# stop_daemon PIDFILE NAME: SIGTERM, then wait (the daemons remove their pid files themselves).
stop_daemon() {
    local pidfile=$1 name=$2 i pid
    pid_alive "$pidfile" || return 0
    pid=$(cat "$pidfile")
    log "stopping $name (pid $pid)"
    kill "$pid"
    for ((i = 0; i < 30; i++)); do kill -0 "$pid" 2>/dev/null || return 0; sleep 1; done
    kill -9 "$pid" 2>/dev/null || true
}

# render TEMPLATE KEY=VALUE...: print TEMPLATE with every @KEY@ replaced (values may span lines).
render() {
    local text kv
    text="$(<"$1")"; shift
    for kv in "$@"; do text="${text//@${kv%%=*}@/${kv#*=}}"; done
    printf '%s\n' "$text"
}

# install_file DEST MODE OWNER < content: write only when the content differs; return 0 if it changed.
install_file() {
    local dest=$1 mode=$2 owner=$3 tmp
    tmp="$(mktemp)"
    cat >"$tmp"
    if [[ -f $dest ]] && cmp -s "$tmp" "$dest"; then rm -f "$tmp"; return 1; fi
    install -m "$mode" -o "${owner%%:*}" -g "${owner#*:}" "$tmp" "$dest"
    rm -f "$tmp"
    log "wrote $dest"
    return 0
}

[[ $(id -u) -eq 0 ]] || { echo "run as root: sudo bash $0" >&2; exit 1; }
[[ $ACCOUNTING == slurmdbd || $ACCOUNTING == none ]] || die "SLURM_ACCOUNTING must be slurmdbd or none"

# ---------------------------------------------------------------------------------------------------------------
# 1. Packages.  Debian's maintainer scripts would start munge/mariadb/slurm* through invoke-rc.d (or systemd on a
# VM); a policy-rc.d that answers 101 ("action forbidden") stops that, so we are the only one starting daemons.
# ---------------------------------------------------------------------------------------------------------------
PKGS=(slurm-wlm slurm-client munge)
[[ $ACCOUNTING == slurmdbd ]] && PKGS+=(slurmdbd mariadb-server mariadb-client)
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
    log "apt-get install ${missing[*]}"
    own_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && own_policy=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    ((own_policy)) && rm -f /usr/sbin/policy-rc.d
else
    log "packages already installed: ${PKGS[*]}"
fi

install -d -m 755 -o slurm -g slurm "$LOGDIR" "$RUNDIR" /var/spool/slurmctld
install -d -m 755 -o root -g root /var/spool/slurmd "$ETC"

# ---------------------------------------------------------------------------------------------------------------
# 2. munge: every SLURM daemon and client authenticates through it.
# ---------------------------------------------------------------------------------------------------------------
install -d -m 700 -o munge -g munge /etc/munge /var/lib/munge /var/log/munge
install -d -m 755 -o munge -g munge /run/munge
if [[ ! -s /etc/munge/munge.key ]]; then
    log "creating /etc/munge/munge.key"
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
fi
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    log "munged already running"
else
    log "starting munged"
    rm -f /run/munge/munged.pid
    runuser -u munge -- /usr/sbin/munged    # daemonises itself
    wait_for 30 "munged" bash -c 'munge -n | unmunge'
fi

# ---------------------------------------------------------------------------------------------------------------
# 3. slurm.conf + gres.conf, from the node's real topology.  Written before slurmdbd is asked anything: every
#    client (sacctmgr included) finds the accounting host through slurm.conf, and without the file it falls back
#    to a DNS SRV lookup and fails ("Could not establish a configuration source").
#    `slurmd -C` needs no configuration and prints e.g.
#    NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=24105
# ---------------------------------------------------------------------------------------------------------------
NODE="$(hostname -s)"
HW="$(slurmd -C | head -n 1)"
hw() { sed -n "s/.* $1=\([0-9]*\).*/\1/p" <<<"$HW"; }
CPUS="$(hw CPUs)"; BOARDS="$(hw Boards)"; SOCKETS="$(hw SocketsPerBoard)"
CORES="$(hw CoresPerSocket)"; THREADS="$(hw ThreadsPerCore)"; MEM="$(hw RealMemory)"
[[ -n $CPUS && -n $MEM && -n $CORES ]] || die "could not parse 'slurmd -C' output: $HW"
log "node $NODE: CPUs=$CPUS RealMemory=${MEM}MB fake GPUs=$FAKE_GPUS accounting=$ACCOUNTING"

if [[ $ACCOUNTING == slurmdbd ]]; then
    ACCT_CONF="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
AccountingStorageTRES=gres/gpu
# the plugin writes rule and wildcards into --comment; sacct shows it only with this flag
AccountingStoreFlags=job_comment
JobAcctGatherFrequency=30"
else
    ACCT_CONF="AccountingStorageType=accounting_storage/none"
fi
GRES=""
((FAKE_GPUS > 0)) && GRES="Gres=gpu:${FAKE_GPUS}"

conf_changed=0
render "$HERE/slurm.conf.in" CLUSTER="$CLUSTER" NODE="$NODE" CPUS="$CPUS" BOARDS="$BOARDS" SOCKETS="$SOCKETS" \
    CORES="$CORES" THREADS="$THREADS" MEM="$MEM" GRES="$GRES" ACCOUNTING="$ACCT_CONF" |
    install_file "$ETC/slurm.conf" 644 root:root && conf_changed=1
if ((FAKE_GPUS > 0)); then
    # The fake GPUs' "device files": character devices 1:3 (what /dev/null is) where mknod is allowed, plain
    # files otherwise (slurmd then logs "not a valid character or block device" but counts them all the same).
    for ((g = 0; g < FAKE_GPUS; g++)); do
        [[ -e $RUNDIR/fake-gpu$g ]] || mknod -m 666 "$RUNDIR/fake-gpu$g" c 1 3 2>/dev/null ||
            touch "$RUNDIR/fake-gpu$g"
    done
    render "$HERE/gres.conf.in" NODE="$NODE" NGPU="$FAKE_GPUS" LASTGPU="$((FAKE_GPUS - 1))"
else
    echo "# no GRES (SLURM_FAKE_GPUS=0)"
fi | install_file "$ETC/gres.conf" 644 root:root && conf_changed=1

# ---------------------------------------------------------------------------------------------------------------
# 4. Accounting store: MariaDB + slurmdbd, then cluster/account/users in it.
# ---------------------------------------------------------------------------------------------------------------
if [[ $ACCOUNTING == slurmdbd ]]; then
    if mariadb-admin ping >/dev/null 2>&1; then
        log "MariaDB already running"
    else
        install -d -m 755 -o mysql -g mysql /run/mysqld
        if [[ ! -d /var/lib/mysql/mysql ]]; then
            log "initialising the MariaDB data directory"
            mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
        fi
        log "starting MariaDB"
        # setsid + nohup: detach from this shell so that the server outlives the script (and CI steps).
        setsid nohup /usr/sbin/mariadbd --user=mysql --pid-file=/run/mysqld/mysqld.pid \
            --log-error="$LOGDIR/mariadb.log" </dev/null >/dev/null 2>&1 &
        wait_for "$TIMEOUT" "MariaDB (mariadb-admin ping)" mariadb-admin ping
    fi

    # The DB password only protects a database that listens on this machine; keep it stable across runs.
    PASSFILE="$ETC/.slurmdbd-password"
    [[ -s $PASSFILE ]] || (umask 077; head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' >"$PASSFILE")
    DBPASS="$(<"$PASSFILE")"
    # root logs in through the unix socket (Debian default), so no root password is involved.
    mariadb <<SQL
CREATE DATABASE IF NOT EXISTS ${DBNAME};
CREATE USER IF NOT EXISTS '${DBUSER}'@'localhost' IDENTIFIED BY '${DBPASS}';
ALTER USER '${DBUSER}'@'localhost' IDENTIFIED BY '${DBPASS}';
GRANT ALL PRIVILEGES ON ${DBNAME}.* TO '${DBUSER}'@'localhost';
FLUSH PRIVILEGES;
SQL

    dbd_changed=0
    render "$HERE/slurmdbd.conf.in" DBUSER="$DBUSER" DBPASS="$DBPASS" DBNAME="$DBNAME" |
        install_file "$ETC/slurmdbd.conf" 600 slurm:slurm && dbd_changed=1
    if ((dbd_changed)); then stop_daemon "$RUNDIR/slurmdbd.pid" slurmdbd; fi
    if pid_alive "$RUNDIR/slurmdbd.pid"; then
        log "slurmdbd already running"
    else
        log "starting slurmdbd"
        /usr/sbin/slurmdbd    # daemonises itself; drops to SlurmUser
    fi
    # slurmdbd creates its tables on first start; sacctmgr answers once it listens.
    wait_for "$TIMEOUT" "slurmdbd (sacctmgr list cluster)" sacctmgr -n list cluster

    # Register cluster, account and users before slurmctld starts: slurmctld fetches its TRES and associations
    # from slurmdbd at start-up.  No AccountingStorageEnforce, so unregistered users can still submit.
    sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER" ||
        { log "sacctmgr add cluster $CLUSTER"; sacctmgr -i add cluster "$CLUSTER" >/dev/null; }
    sacctmgr -n -P list account format=account | grep -qx "$ACCOUNT" ||
        { log "sacctmgr add account $ACCOUNT"; sacctmgr -i add account "$ACCOUNT" cluster="$CLUSTER" \
              description="ncpipe CI" organization=ncpipe >/dev/null; }
    for u in root ${SUDO_USER:-} ${SLURM_USERS:-}; do
        id "$u" >/dev/null 2>&1 || continue
        sacctmgr -n -P list user "$u" format=user | grep -qx "$u" ||
            { log "sacctmgr add user $u account=$ACCOUNT"; \
              sacctmgr -i add user "$u" account="$ACCOUNT" defaultaccount="$ACCOUNT" >/dev/null; }
    done
fi

# ---------------------------------------------------------------------------------------------------------------
# 5. slurmctld + slurmd.  A changed configuration means a restart (cheaper and surer than `scontrol reconfigure`,
#    which cannot change node definitions).
# ---------------------------------------------------------------------------------------------------------------
if ((conf_changed)); then
    stop_daemon "$RUNDIR/slurmd.pid" slurmd
    stop_daemon "$RUNDIR/slurmctld.pid" slurmctld
fi
if pid_alive "$RUNDIR/slurmctld.pid"; then
    log "slurmctld already running"
else
    log "starting slurmctld"
    /usr/sbin/slurmctld    # daemonises itself; drops to SlurmUser
fi
wait_for "$TIMEOUT" "slurmctld (scontrol ping)" bash -c 'scontrol ping | grep -q UP'
if pid_alive "$RUNDIR/slurmd.pid"; then
    log "slurmd already running"
else
    log "starting slurmd"
    /usr/sbin/slurmd       # daemonises itself; runs as root (SlurmdUser)
fi

# ---------------------------------------------------------------------------------------------------------------
# 6. Readiness: node idle, then a real job on each partition, seen by sacct.
# ---------------------------------------------------------------------------------------------------------------
node_state() { sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null | head -n 1; }
for ((i = 0; i < TIMEOUT; i++)); do
    state="$(node_state)"
    case "$state" in
        idle|mixed|allocated) break ;;
        inval*)
            # slurmd registered resources that differ from slurm.conf; resuming cannot help.
            die "node $NODE is INVALID: $(sinfo -h -N -n "$NODE" -o '%E' | head -n 1)" ;;
        drain*|drained|down*|fail*)
            # e.g. left DOWN/DRAINED by an earlier run with another configuration: give it back.
            log "node is '$state' ($(sinfo -h -N -n "$NODE" -o '%E' | head -n 1)); resuming it"
            scontrol update NodeName="$NODE" State=RESUME || true ;;
    esac
    sleep 1
done
[[ $state =~ ^(idle|mixed|allocated)$ ]] || die "node $NODE not idle after ${TIMEOUT}s (state '$state')"
log "node $NODE is $state"

run_test_job() {   # run_test_job PARTITION [extra sbatch args...]
    local part=$1; shift
    local out jobid st
    out="$(mktemp /tmp/slurm-setup-XXXXXX.out)"
    jobid="$(timeout "$TIMEOUT" sbatch --parsable --wait -p "$part" "$@" -J setup-check -o "$out" \
        --wrap 'echo ok on $(hostname) CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-unset}')" ||
        die "sbatch --wait -p $part $* failed or timed out (job output: $(cat "$out" 2>/dev/null))"
    jobid="${jobid%%;*}"
    log "test job $jobid on partition $part: $(cat "$out")"
    rm -f "$out"
    if [[ $ACCOUNTING == slurmdbd ]]; then
        # the job record reaches slurmdbd asynchronously; give it a few seconds
        for ((k = 0; k < 30; k++)); do
            st="$(sacct -n -X -P -j "$jobid" -o State 2>/dev/null | head -n 1)"
            [[ $st == COMPLETED ]] && break
            sleep 1
        done
        [[ $st == COMPLETED ]] || die "sacct reports '$st' for test job $jobid (expected COMPLETED)"
        log "sacct: job $jobid COMPLETED"
    fi
}
# Both at once: `sbatch --wait` polls with growing intervals, so two jobs in a row cost ~10 s more.
run_test_job cpu & cpu_pid=$!
if ((FAKE_GPUS > 0)); then run_test_job gpu --gpus=1 & else run_test_job gpu & fi
gpu_pid=$!
wait "$cpu_pid" || die "test job on partition cpu failed"
wait "$gpu_pid" || die "test job on partition gpu failed"

trap - ERR
log "SLURM is ready: cluster $CLUSTER, node $NODE, partitions cpu (default) and gpu, accounting=$ACCOUNTING"
sinfo >&2
