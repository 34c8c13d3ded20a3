#!/usr/bin/env bash
# Everything issue 4 and issue 9 measure on a GPU, in parts that each fit one call of the device tool
# (10 minutes): run tools/device_wheels.sh here first, then, there, from the repository root with
# .whl carried:
#
#     bash benchmarks/gpu_session.sh check          # environment, -m gpu tests, kernel micro-benchmarks
#     bash benchmarks/gpu_session.sh ffhq           # latency.py, ffhq256, both codecs, batch 1 and 8
#     bash benchmarks/gpu_session.sh imagenet       # latency.py, imagenet256
#     bash benchmarks/gpu_session.sh psc            # benchmarks/psc.py, eager and fast
#     bash benchmarks/gpu_session.sh lease          # all of it, cut down to one call of a 15-minute lease
#     bash benchmarks/gpu_session.sh lease2         # what the first lease left unmeasured, one call
#     bash benchmarks/gpu_session.sh lease3         # what lease2 found or could not finish, one call
#     bash benchmarks/gpu_session.sh lease4         # issue 27 item 6, one call; results in $OUT/gpu_<date>_<gpu>/
#     bash benchmarks/gpu_session.sh lease4 --device cpu   # its try on a machine without a GPU (.venv, no wheels)
#     bash benchmarks/gpu_session.sh speed          # issue 30: benchmarks/gpu_variants.py, one call (--device cpu: dry run)
#     bash benchmarks/gpu_session.sh tiles          # issue 28 item 6: benchmarks/tiled_gpu.py (--device cpu: dry run)
#
# Results (JSON and logs) go to $OUT, for benchmarks/RESULTS.md. Each part stops itself before the
# call's limit (PART_SECONDS, default 540), so what it measured so far still comes back.
set -uo pipefail
part=${1:?usage: gpu_session.sh check|ffhq|imagenet|psc|lease|lease2|lease3|lease4|speed|tiles [--device cpu]}
device=cuda
if [[ ${2:-} == --device ]]; then device=${3:?--device cpu|cuda}; fi
OUT=${OUT:-/tmp/idemrt_out}
mkdir -p "$OUT" /tmp/site /tmp/pkg
PY=python3
if [[ $device == cpu ]]; then  # a try on this machine: the checkout's .venv as it is
    PY=${PYTHON:-.venv/bin/python}
    # one intra-op thread: on a shared small CPU a second one is often descheduled, and every
    # parallel op then waits for it (benchmarks/engine_overhead.py's --threads says by how much)
    export PYTHONUNBUFFERED=1 TRITON_INTERPRET=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
else
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    # idemrt as its wheel lays it out (kernels/ and export/ as sub-packages), without building the C++
    # extension: the native rANS coder is optional and nothing timed here uses it.
    rm -rf /tmp/pkg/idemrt && cp -r python/idemrt /tmp/pkg/ && cp -r kernels /tmp/pkg/idemrt/kernels && cp -r export /tmp/pkg/idemrt/export
    export PYTHONPATH=/tmp/pkg:/tmp/site:${PYTHONPATH:-} PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
fi
limit=${PART_SECONDS:-540}
# $res: the folder of one lease's results, named by date and GPU (cpu for a try here)
result_dir() {
    local gpu=cpu
    if [[ $device != cpu ]]; then
        gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | grep -oE '[A-Z][0-9]{2,4}' | head -1 | tr A-Z a-z)
    fi
    res="$OUT/gpu_$(date -u +%F)_${gpu:-gpu}"
    mkdir -p "$res"
}
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    $PY -c "import torch, triton, compressai; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'triton', triton.__version__, 'compressai', compressai.__version__)"
    date -u +%FT%TZ
} 2>&1 | tee "$OUT/env_$part.txt"
torch_modes=reference,eager,fast,fast-triton,fast-compile
case $part in
    check)
        timeout $((limit * 2 / 3)) python3 -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tee "$OUT/gpu_tests.log"
        timeout $((limit / 3)) python3 benchmarks/kernels.py --device cuda --json "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.log" ;;
    ffhq|imagenet)
        preset=${part}256
        timeout "$limit" python3 benchmarks/latency.py --preset "$preset" --modes "$torch_modes" --max-decode-seconds 20 \
            --json "$OUT/latency_$preset.json" 2>&1 | tee "$OUT/latency_$preset.log" ;;
    psc)
        for backend in fast eager; do
            timeout $((limit / 2)) python3 benchmarks/psc.py --device cuda --preset ffhq256 --bpp 0.05 0.1 0.2 \
                --backend "$backend" --max-rounds 4 --json "$OUT/psc_$backend.json" 2>&1 | tee "$OUT/psc_$backend.log"
        done ;;
    lease)
        # One call of about 9 minutes, most wanted first; every file lands directly in $OUT (at most 8
        # come back), every step has its own time limit, and the JSON files are written as rows arrive.
        lat="python3 benchmarks/latency.py --warmup 2 --repeats 5 --decode-steps 100,1000"
        { timeout 200 $lat --preset ffhq256 --codec hyperprior --batch 1,8 --modes reference,eager,fast,fast-triton \
              --max-decode-seconds 12 --json "$OUT/latency_ffhq256.json"
          timeout 100 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_backend_fast.py tests/test_guidance.py \
              tests/test_psc_fast.py tests/test_backend_trt.py tests/test_kernels_gdn.py tests/test_kernels_groupnorm_silu.py \
              tests/test_kernels_loss_seed.py tests/test_kernels_sampler_update.py
          timeout 45 python3 benchmarks/kernels.py --device cuda --no-compile --json "$OUT/kernels.json"
          timeout 60 $lat --preset imagenet256 --codec hyperprior --batch 1 --modes eager,fast --max-decode-seconds 6 \
              --json "$OUT/latency_imagenet256.json"
          timeout 50 python3 benchmarks/psc.py --device cuda --preset ffhq256 --bpp 0.1 --backend fast --max-rounds 2 \
              --warmup 1 --repeats 2 --json "$OUT/psc_fast.json"
          timeout 70 $lat --preset ffhq256 --codec hyperprior,elic --batch 1 --modes fast-compile --max-decode-seconds 6 \
              --json "$OUT/latency_ffhq256_compile.json"
        } 2>&1 | tee "$OUT/lease.log" ;;
    lease2)
        # About 9 minutes: every -m gpu test (8 processes: the Triton compiles dominate), the load study of
        # issue 18 on the GPU, the compiled fast path, ELIC and ImageNet batch 8.
        lat="python3 benchmarks/latency.py --warmup 2 --repeats 5 --decode-steps 100,1000"
        { timeout 150 python3 -m pytest -q -p no:cacheprovider -n 8 -m gpu tests/test_backend_fast.py \
              tests/test_guidance.py tests/test_psc_fast.py tests/test_backend_trt.py tests/test_kernels_gdn.py \
              tests/test_kernels_groupnorm_silu.py tests/test_kernels_loss_seed.py tests/test_kernels_sampler_update.py
          timeout 170 python3 benchmarks/serve_load.py --device cuda --rates 2,6,18 --requests 40 --max-slots 8 \
              --json "$OUT/serve_load_cuda.json"
          timeout 110 $lat --preset ffhq256 --codec hyperprior --batch 1 --modes fast-compile --max-decode-seconds 6 \
              --json "$OUT/latency_ffhq256_compile.json"
          timeout 60 $lat --preset ffhq256 --codec elic --batch 1 --modes eager,fast-triton --max-decode-seconds 6 \
              --json "$OUT/latency_ffhq256_elic.json"
          timeout 60 $lat --preset imagenet256 --codec hyperprior --batch 8 --modes eager,fast-triton --max-decode-seconds 6 \
              --json "$OUT/latency_imagenet256_b8.json"
        } 2>&1 | tee "$OUT/lease2.log" ;;
    lease3)
        # About 9 minutes. lease2's -m gpu run printed two F and no names (-q, cut before its summary):
        # -v names every result as it comes, and a per-test timeout keeps the summary inside the slice.
        { timeout 60 python3 benchmarks/nonfinite_probe.py --device cuda
          timeout 200 python3 -m pytest -v -p no:cacheprovider -p no:benchmark -n 8 --timeout 90 -rfE --tb=short \
              -m gpu tests/test_backend_fast.py tests/test_guidance.py tests/test_psc_fast.py tests/test_backend_trt.py \
              tests/test_kernels_gdn.py tests/test_kernels_groupnorm_silu.py tests/test_kernels_loss_seed.py \
              tests/test_kernels_sampler_update.py
          timeout 170 python3 benchmarks/serve_load.py --device cuda --rates 2,4,8 --requests 40 --max-slots 8 \
              --json "$OUT/serve_load_cuda.json"
          timeout 100 python3 benchmarks/latency.py --warmup 2 --repeats 5 --decode-steps 100 --preset ffhq256 \
              --codec hyperprior --batch 1 --modes fast-compile --max-decode-seconds 6 --json "$OUT/latency_compile.json"
        } 2>&1 | tee "$OUT/lease3.log" ;;
    lease4)
        # Issue 27 item 6, at most 9 minutes: the four parts in its order, each in its own time
        # slice (a part that hangs cannot eat the next). Everything lands in $res, one folder under $OUT
        # (a lease returns at most 8 files: env_lease4.txt and the 6 below). With --device cpu (no GPU
        # here) each part runs shrunk, the -m gpu tests are skipped, and the Triton variants of the probe
        # are left out (interpreted, they take far longer than the slice).
        result_dir
        # every test file that holds a -m gpu test (marked directly, or through tests/kernel_devices.py)
        gpu_tests=$(grep -lE 'mark\.gpu|kernel_devices' tests/test_*.py)
        per_test=() xdist=()
        $PY -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout 90)
        [[ $device != cpu ]] && $PY -c "import xdist" 2>/dev/null && xdist=(-n 8)  # the Triton compiles dominate
        if [[ $device == cpu ]]; then
            probe=(--variants eager-fp32,fast-bf16-torch,engine-load-study,engine-paper-only --paper-steps 4)
            numerics=(--images 1 --configs speed-fast) load=(--smoke)
        else
            probe=() numerics=(--full128 --configs dps100 speed-balanced speed-fast)
            load=(--rates 2,4,8 --requests 32 --max-slots 8)
        fi
        {
            echo "== (1) every -m gpu test, by name $(date -u +%T)"
            # SIGINT at the slice's end: pytest stops as on ^C and still writes its summary and the XML
            timeout -s INT -k 15 130 $PY -m pytest -v -p no:cacheprovider -p no:benchmark "${xdist[@]}" "${per_test[@]}" -rfE \
                --tb=short -m gpu --junitxml "$res/gpu_tests.xml" $gpu_tests
            echo "== (2) the non-finite decode (request 29 of the load study) $(date -u +%T)"
            timeout 75 $PY benchmarks/nonfinite_probe.py --device "$device" "${probe[@]}" --json "$res/nonfinite_probe.json"
            echo "== (3) the default backend (fast) against eager fp32 on real decodes $(date -u +%T)"
            timeout 140 $PY benchmarks/modes.py --device "$device" --backend eager,fast "${numerics[@]}" \
                --json "$res/modes.json"
            $PY benchmarks/modes.py --compare "$res/modes.json" --json "$res/numerics.json"
            echo "== (4) the load study: continuous, static, none $(date -u +%T)"
            timeout 150 $PY benchmarks/serve_load.py --device "$device" "${load[@]}" --json "$res/serve_load.json"
            echo "== done $(date -u +%T)"
        } 2>&1 | tee "$res/lease4.log" ;;
    speed)
        # Issue 30, at most 9 minutes: benchmarks/gpu_variants.py — the floor of each case, then every
        # fast-backend variant's precision against eager fp32 and its step time (FFHQ/ImageNet-256 x
        # hyperprior/ELIC x batch 1/8/16/32, in order of value), whole fast/balanced decodes, the
        # compile variants last. It slices its own time (--budget-s, what does not fit is recorded as
        # skipped) and writes its JSON as rows arrive. --device cpu: the tiny models, a dry run.
        result_dir
        export IDEMRT_COMPILE_CACHE=/tmp/idemrt_compile_cache  # the compile variants' cache, this call only
        if [[ $device == cpu ]]; then
            variants=(--preset tiny --codec tiny --batch 1,2 --variants eager,bf16,fp16 --speeds fast
                      --decode-variants bf16 --warmup 0 --repeats 1 --budget-s 240)
        else
            variants=(--budget-s 450)
        fi
        timeout -k 15 490 $PY benchmarks/gpu_variants.py --device "$device" "${variants[@]}" --out-dir "$res" \
            2>&1 | tee "$res/speed.log" ;;
    tiles)
        # Issue 28 item 6, a few minutes: a 1024x768 FFHQ-256 image's DPS step in 20 windows (one UNet
        # call of 20) against 20 native 256x256 images in one batched step: ms a step, % of peak.
        result_dir
        tiles=()
        [[ $device == cpu ]] && tiles=(--preset tiny --codec tiny --size 64x80 --warmup 0 --repeats 1)
        timeout -k 15 300 $PY benchmarks/tiled_gpu.py --device "$device" "${tiles[@]}" --json "$res/tiled_gpu.json" \
            2>&1 | tee "$res/tiles.log" ;;
    *) echo "unknown part $part" >&2; exit 2 ;;
esac
