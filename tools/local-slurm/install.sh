#!/usr/bin/env bash
# install.sh: the Debian packages start-local-slurm.sh needs (munge, slurmctld, slurmd,
# slurm-client; with SLURM_LOCAL_ACCOUNTING=1 also slurmdbd and mariadb-server).
# Idempotent: installs only what is missing, and nothing at all when everything is there.
# Must run as root (CI does: .ci/run).
set -euo pipefail
log() { echo "[install-local-slurm] $*" >&2; }
want=(munge slurmctld slurmd slurm-client)
[[ ${SLURM_LOCAL_ACCOUNTING:-0} == 1 ]] && want+=(slurmdbd mariadb-server)
missing=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
done
((${#missing[@]})) || exit 0
[[ $EUID -eq 0 ]] || { log "ERROR: must run as root to install: ${missing[*]}"; exit 1; }
command -v apt-get >/dev/null || { log "ERROR: no apt-get here; install ${missing[*]} yourself"; exit 1; }
log "installing: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
