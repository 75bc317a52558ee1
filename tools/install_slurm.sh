#!/usr/bin/env bash
# What the launcher tests need on the machine: Debian's SLURM daemons, client and munge (tests/helpers/local_slurm.py
# starts a cluster from them), and iproute2 and util-linux (tests/helpers/hosts.py makes two hosts of namespaces with
# ip, unshare and nsenter). Does nothing when they are there.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"
missing=0
for cmd in munged slurmctld slurmd sbatch ip unshare nsenter; do
  command -v "$cmd" >/dev/null || missing=1
done
[ "$missing" -eq 0 ] && exit 0
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge iproute2 util-linux >/dev/null
echo "installed $(slurmctld -V), munge, iproute2 and util-linux"
