#!/bin/sh
# The container's start command (Dockerfile CMD; a Hugging Face Space runs it as uid 1000).
# Puts the runs folder and the Hugging Face cache on the persistent disk when there is one, so runs
# and downloaded models survive a restart, then serves the app on all interfaces.
#
#   QLORA_STUDIO_DATA   the persistent folder (default /data, where a Space mounts its storage)
#   QLORA_STUDIO_RUNS   the runs folder: $QLORA_STUDIO_DATA/runs when that folder exists and is
#                       writable, else ~/runs (lost with the container); a value set here wins
#   HF_HOME             the Hub cache: $QLORA_STUDIO_DATA/.huggingface likewise, else the default
#   PORT                the port (default 8501: app_port in README.md's front matter, EXPOSE)
#   QLORA_STUDIO_ALLOW_LOCAL_PATHS  0 unless given: the model and data fields take Hub ids and the
#                       embedded / built-in names only, never a path on this server (core/access.py)
#   QLORA_STUDIO_READ_ONLY  set: browse only, and the upload endpoint takes no bytes (maxUploadSize 0)
set -eu
cd "$(dirname "$0")/.."  # .streamlit/config.toml is read from the working directory

data="${QLORA_STUDIO_DATA:-/data}"
if [ -d "$data" ] && mkdir -p "$data/runs" 2>/dev/null && [ -w "$data/runs" ]; then
    : "${QLORA_STUDIO_RUNS:=$data/runs}"
    : "${HF_HOME:=$data/.huggingface}"
    export HF_HOME
else
    echo "start.sh: $data is missing or not writable: runs and downloaded models last only as long as this container" >&2
    : "${QLORA_STUDIO_RUNS:=$HOME/runs}"
fi
export QLORA_STUDIO_RUNS
: "${QLORA_STUDIO_ALLOW_LOCAL_PATHS:=0}"
export QLORA_STUDIO_ALLOW_LOCAL_PATHS
mkdir -p "$QLORA_STUDIO_RUNS"
echo "start.sh: runs folder $QLORA_STUDIO_RUNS; Hugging Face cache ${HF_HOME:-(default)}"

# Read-only (QLORA_STUDIO_READ_ONLY set, as core/access.py reads it): Streamlit's upload endpoint
# takes no file at all (0 MB: every upload is refused with 413), though no uploader is drawn.
set --
case "$(printf '%s' "${QLORA_STUDIO_READ_ONLY:-}" | tr -d ' \t' | tr 'A-Z' 'a-z')" in
    "" | 0 | false | no | off) ;;
    *) set -- --server.maxUploadSize 0 ;;
esac
exec python -m streamlit run app.py --server.port "${PORT:-8501}" --server.address 0.0.0.0 --server.headless true "$@"
