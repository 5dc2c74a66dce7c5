#!/usr/bin/env bash
# Everything about the GPU fast path that only a GPU can check, logs under $OUT (default
# ./gpu-check-logs). Run from the repository root on the GPU machine, after carrying the
# wheels bench/device_setup.sh installs (.whl/: msgspec, pyzmq for its Python):
#
#   bash bench/gpu_check.sh                 # every stage, in order (about 10-15 minutes)
#   bash bench/gpu_check.sh tests parity    # some stages (one device call is 10 minutes at most)
#
# Stages:
#   tests    the kernel tests natively on CUDA (tests/test_triton_kernels.py: attention vs
#            the torch path, bf16/fp16/fp32, GQA 1/4/7/8, holes, prefix hits, chunked
#            prefill, split decode; fused layers), a whole model, torch path vs Triton
#            path, token for token in float32 (tests/test_triton_model.py), and CUDA graphs
#            vs eager, token for token (tests/test_cuda_graphs.py)
#   parity   float32 greedy parity with transformers on CUDA (bench/gpu_parity.py), Triton
#            path (the CUDA default), then the torch path
#   graphs   the GPU tests of CUDA graphs and of steps launched ahead (a quick subset)
#   latency  Llama-3.1-8B, batch 1, 128 in / 512 out (bar: >= 160 output tok/s)
#   eager    the same without CUDA graphs (--enforce-eager)
#   8b       Llama-3.1-8B, 1000 prompts x 256 in / 256 out (bar: >= 22,700 total tok/s)
#   qwen     Qwen2.5-0.5B, 256 prompts, 64-512 in / 256 out, with transformers generate and
#            generate_batch in the same run (bar: >= 20x generate_batch)
#   profile  steady decode: Llama-3.1-8B batch 64 (bar: GPU busy >= 90%), Qwen2.5-0.5B
#            batch 1 (bar: wall <= 1.5x kernel time); each also with the torch backend
#   boundary Qwen2.5-0.5B batch 1, 128 in / 256 out through LLM: worker processes with overlap
#            (the default), without it, and the worker inside engine-core (uni); beside them
#            the worker's own step time (bench profile). Bar: per-token time with worker
#            processes <= 1.1x the worker's step time
#   busy     Qwen2.5-0.5B, 256 requests decoding through the engine's processes: GPU busy
#            share over 256 decode steps (`zllm bench busy`; bar: >= 90%); beside it the
#            worker's step alone (`zllm bench profile`) and 256 x 256/256 through LLM (tok/s)
#   serve    Llama-3.1-8B shape behind `zllm serve` (random weights, no tokenizer): `zllm bench
#            serve`, 1024 in / 128 out, at 4 and 16 requests/s (TTFT/TPOT p50/p99)
#   replicas (2 GPUs) Qwen2.5-0.5B shape behind `zllm serve --replicas N`, one replica a GPU:
#            `zllm bench serve --no-stream` (whole completions: no SSE chunk per token to
#            parse), 2,000 requests x 256 in / 256 out all at once, N = 1 then 2
#            (issue 15's goal: 2 replicas >= 1.8x). REPLICAS_SHAPE / REPLICAS_PROMPTS change
#            the shape and the count (REPLICAS_SHAPE=tiny runs it on a CPU)
#   embed    all-MiniLM-L6-v2, 10,000 sentences: zllm `LLM.embed` vs sentence-transformers
#            `encode` (goal >= 3x); needs the model carried as .models/all-minilm-l6-v2
#            (`python3 bench/carry_model.py` here, then carry .models)
#   tp       (2 GPUs) greedy tokens TP=2 == TP=1 in float32 on tiny shapes and killing a rank
#            (tests/test_tensor_parallel.py, tests/test_faults.py on NCCL); Llama-3.1-8B shape: bs1
#            decode TP=1 vs TP=2 (bar: TP=2 >= 1.3x faster); 1000 x 256/256 at TP=1 and TP=2
# Every figure is a JSON line in $OUT/results.jsonl, the full output in $OUT/<stage>.log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check-logs}
mkdir -p "$OUT"
if ! python3 -c "import msgspec, zmq" 2>/dev/null; then
    source bench/device_setup.sh
else
    python3 -m pip install -q --no-deps --no-build-isolation --no-compile --upgrade --target /tmp/site . \
        && export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
ZLLM=(python3 -m zllm.frontend.cli)
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(tests parity latency 8b qwen profile boundary busy)

run() {  # run STAGE CMD...: output to $OUT/STAGE.log, JSON lines to $OUT/results.jsonl
    local stage=$1; shift
    echo "== $stage: $*" | tee -a "$OUT/$stage.log"
    "$@" 2>&1 | tee -a "$OUT/$stage.log" | grep '^{' >> "$OUT/results.jsonl"
    echo "== $stage exit ${PIPESTATUS[0]}" | tee -a "$OUT/$stage.log"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; git log -1 --oneline; \
  python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"; \
} > "$OUT/env.log" 2>&1

write_shape() {  # write_shape SHAPE: a config-only checkpoint directory; prints its path
    python3 -c "from pathlib import Path; from zllm.bench.shapes import write_shape
print(write_shape('$1', Path('/tmp/shape-$1')))"
}

serve_start() {  # serve_start LOG MODEL_DIR OPTION...: random weights behind zllm serve on 8199
    local log=$1 model=$2; shift 2
    "${ZLLM[@]}" serve "$model" --load-format dummy --skip-tokenizer-init --port 8199 "$@" \
        > "$OUT/$log-server.log" 2>&1 &
    server=$!
    for _ in $(seq 300); do
        curl -sf http://127.0.0.1:8199/health > /dev/null && return
        sleep 1
    done
    echo "zllm serve did not answer /health in 300 s (see $OUT/$log-server.log)" >&2
}

serve_stop() {
    kill -TERM "$server"
    wait "$server"
}

for stage in "${stages[@]}"; do
    case $stage in
    tests)
        run tests python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py \
            tests/test_triton_model.py tests/test_dummy_weights.py tests/test_cuda_graphs.py ;;
    parity)
        run parity python3 bench/gpu_parity.py
        ZLLM_ATTENTION_BACKEND=torch run parity python3 bench/gpu_parity.py ;;
    graphs)
        run graphs python3 -m pytest -q -p no:cacheprovider tests/test_cuda_graphs.py \
            tests/test_worker_pipelining.py tests/test_dummy_weights.py tests/test_triton_model.py ;;
    latency)
        run latency "${ZLLM[@]}" bench latency --shape llama-3.1-8b --batch-sizes 1 \
            --input-len 128 --output-len 512 --json ;;
    eager)
        run eager "${ZLLM[@]}" bench latency --shape llama-3.1-8b --batch-sizes 1 \
            --input-len 128 --output-len 512 --json --enforce-eager ;;
    8b)
        run 8b "${ZLLM[@]}" bench throughput --shape llama-3.1-8b --num-prompts 1000 \
            --input-len 256 --output-len 256 --json ;;
    qwen)
        run qwen "${ZLLM[@]}" bench throughput --shape qwen2.5-0.5b --num-prompts 256 \
            --input-len 64:512 --output-len 256 --peer transformers --json ;;
    profile)
        for backend in triton torch; do
            ZLLM_ATTENTION_BACKEND=$backend run profile "${ZLLM[@]}" bench profile \
                --shape llama-3.1-8b --batch 64 --context-len 256 --json
            ZLLM_ATTENTION_BACKEND=$backend run profile "${ZLLM[@]}" bench profile \
                --shape qwen2.5-0.5b --batch 1 --context-len 128 --json
        done ;;
    boundary)
        for opts in "" "--no-async-scheduling" "--distributed-executor-backend uni"; do
            # shellcheck disable=SC2086
            run boundary "${ZLLM[@]}" bench latency --shape qwen2.5-0.5b --batch-sizes 1 \
                --input-len 128 --output-len 256 --json $opts
        done
        run boundary "${ZLLM[@]}" bench profile --shape qwen2.5-0.5b --batch 1 \
            --context-len 256 --json ;;
    busy)
        run busy "${ZLLM[@]}" bench busy --shape qwen2.5-0.5b --num-requests 256 \
            --input-len 256 --window 256 --json
        run busy "${ZLLM[@]}" bench profile --shape qwen2.5-0.5b --batch 256 \
            --context-len 256 --json
        run busy "${ZLLM[@]}" bench throughput --shape qwen2.5-0.5b --num-prompts 256 \
            --input-len 256 --output-len 256 --json ;;
    serve)
        shape_dir=$(write_shape llama-3.1-8b)
        serve_start serve "$shape_dir" --max-model-len 4096
        for rate in 4:200 16:400; do
            run serve "${ZLLM[@]}" bench serve --base-url http://127.0.0.1:8199 \
                --input-len 1024 --output-len 128 --vocab-size 128256 \
                --request-rate "${rate%%:*}" --num-prompts "${rate##*:}" --json
        done
        serve_stop ;;
    replicas)
        shape=${REPLICAS_SHAPE:-qwen2.5-0.5b}
        shape_dir=$(write_shape "$shape")
        vocab=$(python3 -c "import json; print(json.load(open('$shape_dir/config.json'))['vocab_size'])")
        for n in 1 2; do
            serve_start "replicas-$n" "$shape_dir" --replicas $n
            echo "{\"stage\": \"replicas\", \"replicas\": $n, \"shape\": \"$shape\"}" >> "$OUT/results.jsonl"
            run replicas "${ZLLM[@]}" bench serve --base-url http://127.0.0.1:8199 \
                --num-prompts "${REPLICAS_PROMPTS:-2000}" --input-len 256 --output-len 256 \
                --vocab-size "$vocab" --no-stream --json
            serve_stop
        done ;;
    embed)
        run embed python3 bench/embed_throughput.py --model .models/all-minilm-l6-v2 \
            --num-sentences 10000 --device cuda ;;
    tp)
        # token-id checkpoints only: these run where the default model cannot be fetched
        run tp python3 -m pytest -q -p no:cacheprovider tests/test_tensor_parallel.py \
            -k "not embed"
        run tp python3 -m pytest -q -p no:cacheprovider tests/test_faults.py -k tensor_parallel_rank
        for tp in 1 2; do
            run tp "${ZLLM[@]}" bench latency --shape llama-3.1-8b --batch-sizes 1 \
                --input-len 128 --output-len 256 --tensor-parallel-size $tp --json
            run tp "${ZLLM[@]}" bench throughput --shape llama-3.1-8b --num-prompts 1000 \
                --input-len 256 --output-len 256 --tensor-parallel-size $tp --json
        done ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
    esac
done
