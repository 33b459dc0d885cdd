#!/usr/bin/env bash
# Install vhostd into ./.venv and serve the bundled default config
# (unprivileged; sockets in ./run, images in ./var).  Extra args go to `vhostd serve`.
set -euo pipefail
source "$(dirname "$0")/venv.sh" ""
cd "$ROOT"
exec "$VENV/bin/vhostd" serve --config config/vhostd.yaml "$@"
