# Sourced by the other scripts: creates .venv once and installs torchfreeze with its extras,
# always through constraints.txt so that torch stays at the pinned CPU build.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
fi
stamp=".venv/.torchfreeze-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
  # Progress is shown (pip's download bars and one line per package): the first install
  # downloads torch and the extras, several minutes on a slow link; later runs skip this block.
  pipi() { .venv/bin/python -m pip install --progress-bar on --disable-pip-version-check -c constraints.txt "$@"; }
  echo "torchfreeze set-up [1/3]: pip (into .venv)" >&2
  pipi --upgrade pip
  echo "torchfreeze set-up [2/3]: torch 2.13.0, CPU build (about 200 MB to download the first time)" >&2
  pipi "torch==2.13.0"
  echo "torchfreeze set-up [3/3]: torchfreeze and its extras (transformers, lightning, scikit-learn, ...)" >&2
  pipi -e ".[dev]"
  touch "$stamp"
  echo "torchfreeze set-up done; next runs skip it (delete $stamp to reinstall)" >&2
fi
export PATH="$root/.venv/bin:$PATH"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
