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
#
# Results (JSON and logs) go to $OUT, for benchmarks/RESULTS.md. Each part stops itself before the
# call's limit (PART_SECONDS, default 540), so what it measured so far still comes back.
set -uo pipefail
part=${1:?usage: gpu_session.sh check|ffhq|imagenet|psc|lease|lease2|lease3}
OUT=${OUT:-/tmp/idemrt_out}
mkdir -p "$OUT" /tmp/site /tmp/pkg
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
# idemrt as its wheel lays it out (kernels/ and export/ as sub-packages), without building the C++
# extension: the native rANS coder is optional and nothing timed here uses it.
rm -rf /tmp/pkg/idemrt && cp -r python/idemrt /tmp/pkg/ && cp -r kernels /tmp/pkg/idemrt/kernels && cp -r export /tmp/pkg/idemrt/export
export PYTHONPATH=/tmp/pkg:/tmp/site:${PYTHONPATH:-} PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
limit=${PART_SECONDS:-540}
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    python3 -c "import torch, triton, compressai; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'triton', triton.__version__, 'compressai', compressai.__version__)"
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
    *) echo "unknown part $part" >&2; exit 2 ;;
esac
