#!/usr/bin/env bash
# The per-family table on the GPU machine (issue 20), within one call's limits:
#   bash bench/families_gpu.sh [check] ARCH:PARTS ...      e.g. check qwen1p5b:ours,tuned,seed,sweep,fp16 phi2:ours
# carry .whl (the bitsandbytes wheel: ../shared/tools/gpu-wheels.sh .whl). What comes back from $OUT
# is at most 8 files (2026-12-03: a call that wrote 14 lost six of them), so everything under
# $OUT/fam is tarred into one file when the script exits, also when the call's time limit stops it
# (the trap; each architecture also has a timeout, six times BENCH_PART_S, default 150 s). Rebuild one table
# from several calls here with:  python -m bench.run --arch phi2,llama3b,qwen1p5b,gemma3-1b --table-only --out DIR
# where DIR holds the untarred fam/ folders of every call. bench/RESULTS.md has the figures of
# 2026-12-03: one H200, about 170-225 s an architecture with all five parts, 35 s for ours alone.
set -o pipefail
. bench/gpu_setup.sh fam
export PYTHONPATH=$t:$PWD
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch,transformers,peft,bitsandbytes,triton;print(torch.__version__,transformers.__version__,peft.__version__,bitsandbytes.__version__,triton.__version__)"
if [ "$1" = check ]; then
  shift
  timeout 150 python3 -m bench.gpu_families --families llama,gemma3_text --out $OUT/fam/gpu_families.json > $OUT/fam/gpu_families.log 2>&1
  grep -E "^(kernels|llama|gemma3_text|OK|MISMATCH)" $OUT/fam/gpu_families.log | cut -c1-700
fi
for spec in "$@"; do
  arch=${spec%%:*}
  parts=${spec#*:}
  timeout $(( ${BENCH_PART_S:-150} * 6 )) python3 -m bench.run --arch $arch --parts $parts --sweep-batches 128,512 \
    --seed-rows 128 --root /tmp/qb --out $OUT/fam 2>&1 | grep -v "Writing model shards" >> $OUT/fam/run.log
done
tail -12 $OUT/fam/run.log
