#!/usr/bin/env bash
# Debian packages the pipeline and its tests need; installs only what is missing.
#   unar, bsdtar (libarchive-tools): RAR 2-4 (incl. solid) and RAR 5 extraction
#   slurmctld slurmd slurm-client munge: the loopback Slurm cluster of the workflow tests
set -euo pipefail
need=()
command -v unar >/dev/null || need+=(unar)
command -v bsdtar >/dev/null || need+=(libarchive-tools)
if [[ "${IICREPRO_WITH_SLURM:-1}" == 1 ]]; then
  command -v slurmctld >/dev/null || need+=(slurmctld)
  command -v slurmd >/dev/null || need+=(slurmd)
  command -v sbatch >/dev/null || need+=(slurm-client)
  command -v munged >/dev/null || need+=(munge)
fi
[[ ${#need[@]} -eq 0 ]] && exit 0
sudo=""
[[ $(id -u) -ne 0 ]] && sudo="sudo"
echo "installing Debian packages: ${need[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
