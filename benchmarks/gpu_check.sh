#!/usr/bin/env bash
# The GPU check of the hot path, run as is on an H100/H200 machine (about 8 of its 10 minutes, 6 without 1b and 5):
#
#     bash benchmarks/gpu_check.sh            # from anywhere; rows land in benchmarks/results/*.csv (and $OUT)
#
# 1. installs what the machine lacks: wheels from ./.whl when that folder exists (a machine without an index:
#    megatron-core and ortools, see docs/gpu_check.md), else from the package index;
# 2. pytest -m gpu (the compiled Triton kernels and the GPU-only paths);
# 3. bench_kernels: the fused LoRA layer against cuBLAS (the frozen GEMM alone) and torch at Llama-3.1-8B shapes;
# 4. bench_end_to_end at bf16 on a Llama-shaped model (hidden 2048), providers a, b, c, cp, in-process engine;
# 5. bench_sparse: SHiRA's native sparse ops (csrc/, built with their CUDA kernels in step 1b) on the GPU.
# Without a CUDA device it stops after step 1 with exit code 2 (tests/benchmarks/test_gpu_check.py runs that).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
status=0

# --- 1. dependencies ------------------------------------------------------------------------------------------
missing=()
for pair in megatron.core:megatron-core ortools:ortools safetensors:safetensors tokenizers:tokenizers yaml:PyYAML \
            jinja2:jinja2 transformers:transformers peft:peft pytest:pytest hypothesis:hypothesis; do
    "$PY" -c "import ${pair%%:*}" 2>/dev/null || missing+=("${pair#*:}")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "gpu_check: every dependency is installed"
elif [ -d .whl ]; then
    echo "gpu_check: installing ${missing[*]} from .whl/"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/lorafusion-site .whl/*.whl || exit 3
    export PYTHONPATH="$PYTHONPATH:/tmp/lorafusion-site"
else
    echo "gpu_check: installing ${missing[*]} from the package index"
    "$PY" -m pip install -q "${missing[@]}" || exit 3
fi
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: torch $("$PY" -c 'import torch; print(torch.__version__)') sees no CUDA device;" \
         "the GPU steps need one (nothing was measured)" >&2
    exit 2
fi
"$PY" -c "import torch; print('gpu_check:', torch.cuda.get_device_name(0), 'torch', torch.__version__)"

# --- 1b. native ops: JIT-build csrc/ (C++ and CUDA, about a minute) once, so that step 2's tests of the CUDA
# kernels (tests/lorafusion/ops/test_native_cuda.py, marked gpu) and step 5 find it in the cache -----------------
timeout 240 "$PY" -c "import sys; from lorafusion.ops import native; sys.exit(0 if native.available('cuda') else 1)" || status=1

# --- 2. GPU tests ----------------------------------------------------------------------------------------------
timeout 240 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests || status=1

# --- 3. kernels against cuBLAS ---------------------------------------------------------------------------------
timeout 120 "$PY" -m benchmarks.bench_kernels --models llama-3.1-8b --m 4096 --iters 20 || status=1

# --- 4. end to end, bf16, Llama-shaped --------------------------------------------------------------------------
timeout 240 "$PY" benchmarks/bench_end_to_end.py --dtype bfloat16 --hidden-size 2048 --intermediate-size 5504 \
    --num-layers 8 --num-heads 16 --num-kv-heads 8 --steps 4 --repeats 1 --threads 8 --engine local \
    --max-tokens-per-microbatch 4096 --cache-dir /tmp/lorafusion-bench || status=1

# --- 5. native sparse ops against the torch fallback and a dense ΔW, on the GPU ------------------------------------
timeout 90 "$PY" -m benchmarks.bench_sparse --device cuda || status=1

if [ -n "${OUT:-}" ]; then
    cp benchmarks/results/*.csv "$OUT"/ 2>/dev/null || true
fi
exit $status
