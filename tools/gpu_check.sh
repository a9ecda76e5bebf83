#!/usr/bin/env bash
# GPU checks in one call on a lent machine (Python 3.12 with torch, triton, transformers, pyarrow, typer there):
# installs the carried wheels, runs the GPU tests (the `gpu` marker and the kernel tests natively on CUDA), the
# kernel and cache benchmarks, and prints short tables last. Sized to finish in about 8 minutes.
#   here, once:   tools/gpu_check.sh prepare          (downloads what the machine lacks into .whl/)
#   device run:   command "tools/gpu_check.sh", carry [".whl"]
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS="zarr==3.1.6 numcodecs==0.16.5 google-crc32c==1.9.0 donfig==0.8.1.post1 liger-kernel==0.8.5 peft==0.21.2
        accelerate==1.15.0 psutil==7.2.2"

if [ "${1:-}" = prepare ]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl $WHEELS
    ls -l .whl
    exit
fi

OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed: run 'tools/gpu_check.sh prepare' here and carry .whl"; exit 1; }
ln -sfn "$PWD/kernels" /tmp/site/genrecal_kernels  # the import name pyproject.toml maps kernels/ onto
export PYTHONPATH=/tmp/site:$PWD:$PWD/tools PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
python3 - <<'PY'
import genrecal_cache, torch, transformers, zarr
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-",
      "| transformers", transformers.__version__, "| zarr", zarr.__version__)
PY
{ timeout 150 python3 -m pytest -q -m "gpu or not slow" -p no:cacheprovider tests/test_gpu.py tests/kernels
  timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests/train; } 2>&1 | tee "$OUT/gpu-tests.log" | tail -20
timeout 240 python3 tools/bench_kernels.py --n 1024 4096 --v 32000 152064 --d 3584 --repeats 5 --timeout 60 \
    --out "$OUT/bench-kernels-gpu.csv" > "$OUT/bench-kernels.log" 2>&1
timeout 120 python3 tools/bench_cache.py --model llava --scale 8 16 --rows 128 --dtype bfloat16 \
    --feature-dtype bfloat16 --batch-tokens 32768 --out "$OUT/bench-cache-gpu.csv" > "$OUT/bench.log" 2>&1
echo "== kernel benchmark (CUDA; tflops counts 6*N*V*D per forward+backward) =="
python3 -c "import csv,sys; r=list(csv.DictReader(open(sys.argv[1])));
k=['impl','n','v','d','ms','peak_extra_mib','tflops','matmul_tflops','error'];
print(' '.join(f'{x:>14}' for x in k)); [print(' '.join(f'{row[x][:14]:>14}' for x in k)) for row in r]" \
    "$OUT/bench-kernels-gpu.csv" || tail -20 "$OUT/bench-kernels.log"
echo "== cache benchmark (CUDA) =="
python3 -c "import csv,sys; r=list(csv.DictReader(open(sys.argv[1])));
k=['model','scale','params','samples','t_forward_s','t_render_s','t_job_s','job_over_forward','bytes_per_label_token','compression_ratio'];
print(' '.join(f'{x:>14}' for x in k)); [print(' '.join(f'{row[x]:>14}' for x in k)) for row in r]" "$OUT/bench-cache-gpu.csv" \
    || tail -20 "$OUT/bench.log"
