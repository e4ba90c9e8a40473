#!/usr/bin/env bash
# Every GPU benchmark of issue 7, in parts that each fit one 10-minute call on a lent GPU machine:
#
#   bash benchmarks/gpu_suite.sh step            # training step side by side, big batch, CUDA graphs (estimated ~7 min)
#   bash benchmarks/gpu_suite.sh extract loader demo  # extraction speed and bf16/fp16 drift, loader, and
#                                                # the whole demo on the GPU: CLIs end to end, learning (estimated ~6 min)
#   bash benchmarks/gpu_suite.sh downstream      # retrieval scoring (Flickr30k 1k x 5k projected), VQA fine-tuning step
#   bash benchmarks/gpu_suite.sh                 # all parts (longer than one call allows)
#
# Writes into $OUT/gpu_suite-<parts>/ as it goes (so a call cut at its limit still returns what
# finished): summary.txt (every printed table), each benchmark's log and JSON. OUT defaults to
# benchmarks/results (the device tool sets it to the folder that comes back). Each benchmark is cut
# at $BENCH_TIMEOUT seconds (default 400) so one hang cannot eat the call.
#
# Needs: python3 with torch (the device image has it); webdataset + braceexpand wheels in .wheels/
# if the image lacks them; the official vilbert-multi-task checkout in .official/vilbert-multi-task
# for the side-by-side rows (both folders are git-ignored: carry them). See benchmarks/README.md.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
PARTS=${*:-step extract loader demo downstream}
LIMIT=${BENCH_TIMEOUT:-400}
PYTHON=${PYTHON:-python3}
WORK="$OUT/gpu_suite-$(echo "$PARTS" | tr ' ' '-')"
mkdir -p "$WORK"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1  # a benchmark cut at its limit keeps what it printed
if ! $PYTHON -c "import webdataset" 2>/dev/null && ls .wheels/*.whl >/dev/null 2>&1; then
  # the device image lacks webdataset/braceexpand (pure-Python wheels); a private target, not its venv
  $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .wheels/*.whl
  export PYTHONPATH=$PWD:/tmp/site
fi
$PYTHON -c "import torch, torchvision, webdataset; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
OFFICIAL=()
[ -f .official/vilbert-multi-task/vilbert/vilbert.py ] && OFFICIAL=(--official-repo .official/vilbert-multi-task)
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>&1 | tee "$WORK/gpu.txt"
run() {  # name, command...: keep going when one benchmark fails or runs out of time
  local name=$1; shift
  echo "== $name: $*"
  timeout "$LIMIT" "$@" > "$WORK/$name.log" 2>&1
  echo "== $name (exit $?): $*" >> "$WORK/summary.txt"
  grep -v "^ *\(W[0-9]\|warnings.warn\)" "$WORK/$name.log" | tail -25 | tee -a "$WORK/summary.txt"
}
for part in $PARTS; do
  case $part in
    step)
      run peak $PYTHON benchmarks/peak.py --dtypes fp32,bf16,fp16 --out "$WORK/peak.json"
      run step $PYTHON benchmarks/train_step_benchmark.py "${OFFICIAL[@]}" --check --profile 25 --out "$WORK/train_step.json"
      run step-b512 $PYTHON benchmarks/train_step_benchmark.py --variants static,compile --batch-size 512 --out "$WORK/train_step_b512.json"
      run step-graphs $PYTHON benchmarks/train_step_benchmark.py --variants compile --compile-mode reduce-overhead --out "$WORK/train_step_graphs.json"
      ;;
    extract)
      run extract $PYTHON benchmarks/extract_benchmark.py --configs r101 --device cuda --batch-sizes 1,8,16 --precisions fp32,bf16 --memory-formats contiguous,channels_last --images 64 --size 1000x600 --out "$WORK"
      run extract-profile $PYTHON benchmarks/extract_benchmark.py --configs r101 --device cuda --batch-sizes 8 --precisions bf16 --images 16 --size 1000x600 --profile 30 --out "$WORK"
      run extract-precision $PYTHON benchmarks/extract_benchmark.py --configs r101 --device cuda --compare-precision bf16,fp16 --images 16 --size 1000x600 --out "$WORK"
      ;;
    downstream)  # retrieval scoring (Flickr30k 1k x 5k projection) and the VQA fine-tuning step
      run retrieval-eval $PYTHON benchmarks/retrieval_eval_benchmark.py --out "$WORK/retrieval_eval.json"
      run retrieval-eval-b128 $PYTHON benchmarks/retrieval_eval_benchmark.py --batch-size 128 --captions 20 \
        --images 1000 --full-captions 2 --out "$WORK/retrieval_eval_b128.json"
      ;;
    loader)
      run loader $PYTHON benchmarks/loader_benchmark.py --workers 1 4 8 12 --batches 100 --out "$WORK"
      ;;
    demo)  # every stage's CLI on CUDA (extract, train, eval); its bulky outputs stay on the machine
      run demo $PYTHON -c "import sys; from pipelines.demo import main; sys.exit(main())" \
        --device cuda --out /tmp/gpu_suite_demo --visualize 2
      cp /tmp/gpu_suite_demo/summary.json /tmp/gpu_suite_demo/demo.log /tmp/gpu_suite_demo/train/metrics.csv "$WORK/" 2>/dev/null
      ;;
    *)
      echo "unknown part: $part (step, extract, loader, demo, downstream)" >&2
      exit 2
      ;;
  esac
done
ls -la "$WORK"
