#!/usr/bin/env bash
# Run the GPU checks on an NVIDIA machine with no network, from the repository root:
#
#   WHEELS=.whl OUT=gpu_out bash benchmarks/gpu_offline.sh
#
# WHEELS holds what the machine lacks, made on a machine with network (docs/performance.md, "GPU"):
# pure-Python wheels (open_clip_torch, ftfy, wcwidth, pytools, platformdirs, mako, typing_extensions),
# siphash24 for the target Python, and the pycuda sdist, which is compiled here against this machine's
# CUDA (about a minute). Then: the GPU tests (pytest -m gpu) and python -m benchmarks.gpu_check, whose
# gpu_check.json / gpu_check.md land in OUT with the logs. Every step runs even if an earlier one failed.
set -u
WHEELS=$(cd "${WHEELS:-.whl}" && pwd)
OUT=${OUT:-gpu_out}
SITE=${SITE:-/tmp/i2p_site}
mkdir -p "$OUT" "$SITE"
export PYTHONUNBUFFERED=1 I2P_CACHE_DIR=${I2P_CACHE_DIR:-/tmp/i2p_cache}
PY=${PYTHON:-python3}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
$PY -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$WHEELS"/*.whl 2>&1 | tail -3
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
# i2p itself (package-dir maps i2p.* onto the top-level folders): a regular install into SITE.
$PY -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target "$SITE" . \
    > "$OUT/install.log" 2>&1 || echo "i2p install failed: see install.log"

# pycuda from its sdist, built in parallel against this machine's CUDA (driver API only, no curand).
CUDA_ROOT=$(dirname "$(dirname "$(command -v nvcc)")")
if ls "$WHEELS"/pycuda-*.tar.gz > /dev/null 2>&1; then
    (
        set -e
        rm -rf /tmp/pycuda_src && mkdir -p /tmp/pycuda_src && cd /tmp/pycuda_src
        tar xzf "$WHEELS"/pycuda-*.tar.gz --strip-components=1
        libs="$CUDA_ROOT/lib64/stubs,$CUDA_ROOT/targets/x86_64-linux/lib/stubs,$CUDA_ROOT/lib64"
        libs="$libs,/usr/local/nvidia/lib64,/usr/lib/x86_64-linux-gnu"
        $PY configure.py --cuda-root="$CUDA_ROOT" --cudadrv-lib-dir="$libs"
        time $PY setup.py build_ext --inplace -j "$(nproc)"
    ) > "$OUT/pycuda_build.log" 2>&1 && echo "pycuda built" || echo "pycuda build failed: see pycuda_build.log"
    export PYTHONPATH="/tmp/pycuda_src:$PYTHONPATH"
fi
$PY -c "import pycuda.driver as d; d.init(); print('pycuda', d.get_version(), d.Device(0).name())" 2>&1 | tail -1

$PY -m pytest -q -m gpu -p no:cacheprovider tests/kernels tests/runtime/test_backend_tensorrt.py -rs \
    2>&1 | tee "$OUT/pytest_gpu.log" | tail -15
$PY -m benchmarks.gpu_check --out "$OUT" 2>&1 | tee "$OUT/gpu_check.log" | tail -30
