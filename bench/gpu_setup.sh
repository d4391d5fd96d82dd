# Sourced by the GPU machine's scripts (families_gpu.sh, ab_gpu.sh): bitsandbytes from the carried
# wheel (.whl) into /tmp/site once a machine, the environment every part runs in, and everything
# under $OUT/DIR tarred into one file when the script exits, also when the call's time limit stops
# it (at most 8 files return from a call):  . bench/gpu_setup.sh DIR
t=/tmp/site
[ -d $t/bitsandbytes ] || python3 -m pip install -q --no-index --no-deps --no-compile --target $t .whl/*.whl || exit 1
export PYTHONUNBUFFERED=1 PYTHONPYCACHEPREFIX=/tmp/pyc
name=$1-$(date -u +%H%M%S)
trap "cd $OUT && tar czf $name.tgz $1 2>/dev/null && rm -rf $1" EXIT
mkdir -p $OUT/$1
date -u
