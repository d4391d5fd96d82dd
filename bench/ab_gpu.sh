#!/usr/bin/env bash
# Ours from this tree against ours from an older one, side by side on the GPU machine, interleaved
# per architecture (the machine's speed drifts: compare within one call), plus variants of this
# tree given as environment assignments (SpeedConfig's QLORA_* switches):
#   mkdir -p .keep/old && git archive COMMIT core bench/*.py bench/snli_lengths.json | tar -x -C .keep/old
#   bash bench/ab_gpu.sh .keep/old phi2,qwen1p5b QLORA_KEEP_ABSMAX=0                  # there
#   bash bench/ab_gpu.sh - phi2 QLORA_MICRO_TOKENS=0                                  # no old tree: new and variants
# carry .whl (the bitsandbytes wheel) and the old tree (keep both out of git: echo /.keep/ >>
# .git/info/exclude). Each run is bench.ours experiment as
# bench.run's ours part runs it (batch 32, 1,000 rows, 2 epochs); everything under $OUT/ab comes
# back as one tar (at most 8 files return from a call). Prints one line a run: pairs/s, peak GiB.
set -o pipefail
old=$1
archs=$2
shift 2
. bench/gpu_setup.sh ab
ours() {  # ours TREE LABEL ARCH [ENV ...]
  local tree=$1 label=$2 arch=$3
  shift 3
  (cd $tree && env PYTHONPATH=$t:$PWD "$@" timeout 150 python3 -m bench.ours experiment /tmp/qb --arch $arch \
    --micro 32 --train-rows 1000 --epochs 2 --val-rows 128 --test-rows 128 --out $OUT/ab/$arch.$label.json) \
    > $OUT/ab/$arch.$label.log 2>&1
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[2], f\"{d['pairs_per_s']:.1f} pairs/s\", f\"peak {d['peak_gib']:.2f} GiB\", f\"mfu {d['mfu']:.3f}\", d['state'], [x for x in (d.get('speedups') or []) if 'stream' in x or 'drawn inside' in x])" \
    $OUT/ab/$arch.$label.json "$arch $label" 2>/dev/null || echo "$arch $label failed: $(tail -2 $OUT/ab/$arch.$label.log)"
}
for arch in ${archs//,/ }; do
  PYTHONPATH=$t:$PWD python3 -m bench.assets /tmp/qb --arch $arch > $OUT/ab/$arch.assets.log 2>&1 || { tail -3 $OUT/ab/$arch.assets.log; continue; }
  [ "$old" = - ] || ours $old old $arch
  ours . new $arch
  for v in "$@"; do ours . "${v//[^A-Za-z0-9]/_}" $arch $v; done
done
