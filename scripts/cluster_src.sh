#!/usr/bin/env bash
# Copy the project's files (tracked, plus untracked ones git does not ignore) to DEST, for a
# cluster file's `file_mounts`: Ray hashes every file under a mount's source on each `ray up`
# (rsync_exclude does not apply to that hash), so mounting the checkout itself would hash .venv and
# results/ too.
set -euo pipefail
dest=${1:?usage: scripts/cluster_src.sh DEST}
cd "$(dirname "$0")/.."
mkdir -p "$dest"
git ls-files -z -co --exclude-standard | rsync -a --delete --from0 --files-from=- ./ "$dest"/
