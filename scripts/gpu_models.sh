#!/usr/bin/env bash
# Issue 12's GPU runs: the 7B and 32B architectures on one H200 (720p and 448x448, the same table as
# the 3B), a model split between cuda:0 and the CPU on one GPU (the cross-device path), and the 72B
# spread over two or more GPUs. Run from the repository root on the GPU machine:
#
#   bash scripts/gpu_models.sh tests      # pytest -m gpu on the multi-device tests (tiny model, ~1 min)
#   bash scripts/gpu_models.sh 7b         # 7B, 720p 192 frames then 448x448 768 frames
#   bash scripts/gpu_models.sh 32b        # 32B, the same two runs
#   bash scripts/gpu_models.sh 448        # the 448x448 runs only: 7B, then 32B
#   bash scripts/gpu_models.sh split      # 7B with layers 20-27 computing on the CPU, 448x448, 32 frames
#   bash scripts/gpu_models.sh 72b        # 72B over every visible GPU (nvidia-h200-x2 or larger)
#
# Every run writes its JSON, Markdown and printed table under $OUT (default sessions/gpu-models).
# BENCH_ARGS adds options to every bench (e.g. BENCH_ARGS="--decode-seconds 0" where decord is missing).
# --memory exact --gpu-kv-budget 200k: the whole stream stays on the GPU (115k tokens at 720p), so a
# run never silently turns into bounded memory; exact memory that cannot hold it is refused up front.
set -euo pipefail
PY=${PY:-python3}
OUT=${OUT:-sessions/gpu-models}
mkdir -p "$OUT"

run() {  # run NAME ARGS...: one bench, its table on stdout and in $OUT/NAME.txt
    local name=$1; shift
    echo "== $name: streamchat bench $*"
    "$PY" -m streamchat bench "$@" --max-new-tokens 32 --memory exact --gpu-kv-budget 200k \
        --out "$OUT/$name.json" --report "$OUT/$name.md" ${BENCH_ARGS:-} | tee "$OUT/$name.txt"
}

p720=(--frames 192 --width 1288 --height 728)   # 720p resized to multiples of 28: 1,196 tokens a frame pair
p448=(--frames 768 --width 448 --height 448)    # 256 tokens a frame pair

case "${1:-all}" in
  tests)
    "$PY" -m pytest -q -m gpu tests/test_multi_device.py tests/test_gpu_kernels.py ;;
  7b)
    run 7b-720p --model random:qwen2.5-vl-7b "${p720[@]}"
    run 7b-448 --model random:qwen2.5-vl-7b "${p448[@]}" ;;
  32b)
    run 32b-720p --model random:qwen2.5-vl-32b "${p720[@]}"
    run 32b-448 --model random:qwen2.5-vl-32b "${p448[@]}" ;;
  448)
    run 7b-448 --model random:qwen2.5-vl-7b "${p448[@]}"
    run 32b-448 --model random:qwen2.5-vl-32b "${p448[@]}" ;;
  split)
    # layers 0-19 and everything else on cuda:0, layers 20-27 compute on the CPU ("main_device": "cpu";
    # without it accelerate would offload them and run them on the GPU). Slow by design: it checks the
    # cross-device path (hidden states cross devices, each layer's KV on its device, eager everywhere)
    # and that streaming equals the whole-video path there; its timings are not the 7B's.
    "$PY" - "$OUT/split-7b.json" <<'EOF'
import json, sys
layers = {f"model.language_model.layers.{i}": ("cuda:0" if i < 20 else "cpu") for i in range(28)}
parts = {"model.visual": "cuda:0", "model.language_model.embed_tokens": "cuda:0", "model.language_model.norm": "cpu",
         "model.language_model.rotary_emb": "cuda:0", "lm_head": "cuda:0"}
json.dump({"device_map": {**parts, **layers}, "main_device": "cpu"}, open(sys.argv[1], "w"), indent=1)
EOF
    "$PY" -m streamchat bench --model random:qwen2.5-vl-7b --device-map "$OUT/split-7b.json" --frames 32 \
        --width 448 --height 448 --max-new-tokens 8 --no-repeat-questions --memory exact --gpu-kv-budget 200k \
        --out "$OUT/split-7b-448.json" --report "$OUT/split-7b-448.md" | tee "$OUT/split-7b-448.txt" ;;
  72b)
    n=$("$PY" -c "import torch; print(torch.cuda.device_count())")
    if [ "$n" -lt 2 ]; then echo "72b needs two or more GPUs; $n visible" >&2; exit 2; fi
    "$PY" -m pytest -q -m gpu tests/test_multi_device.py
    run 72b-720p --model random:qwen2.5-vl-72b --device-map balanced "${p720[@]}"
    run 72b-448 --model random:qwen2.5-vl-72b --device-map balanced "${p448[@]}" ;;
  all)
    for what in tests 7b 32b split; do bash "$0" "$what"; done ;;
  *)
    echo "usage: $0 tests|7b|32b|448|split|72b|all" >&2; exit 2 ;;
esac
