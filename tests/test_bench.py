"""`zllm bench` at a tiny size: the commands run end to end and their JSON has the fields
RESULTS.md is built from (the speed is not checked here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ZLLM = [sys.executable, "-m", "zllm.frontend.cli"]
ENGINE = ["--distributed-executor-backend", "uni", "--max-model-len", "256"]
HEADER = {"bench", "date", "commit", "command", "device", "model", "attention_backend"}


def bench(*args: str) -> dict:
    env = {**os.environ, "ZLLM_LOG_LEVEL": "WARNING"}
    out = subprocess.run(
        [*ZLLM, "bench", *args, "--json"], capture_output=True, text=True, timeout=240, env=env
    )
    assert out.returncode == 0, out.stderr[-2000:]
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    assert HEADER <= doc.keys()
    return doc


def test_throughput_with_peers():
    doc = bench(
        "throughput", "--shape", "tiny", "--num-prompts", "6", "--input-len", "8:24",
        "--output-len", "4", "--peer", "transformers", "--peer-batch", "3", *ENGINE,
    )  # fmt: skip
    assert doc["workload"]["requests"] == 6 and doc["workload"]["output_tokens"] == 24
    engines = [r["engine"] for r in doc["results"]]
    assert engines == ["zllm", "transformers generate (batch 3)", "transformers generate_batch"]
    for r in doc["results"]:
        assert r["output_tok_s"] > 0 and r["total_tok_s"] > r["output_tok_s"] and r["seconds"] > 0
    # The same weights and greedy decoding: the first prompt's tokens agree across engines.
    assert len({tuple(r["first_tokens"]) for r in doc["results"]}) == 1


def test_latency():
    doc = bench(
        "latency", "--shape", "tiny", "--batch-sizes", "1,2", "--input-len", "40",
        "--output-len", "4", *ENGINE,
    )  # fmt: skip
    assert [r["batch"] for r in doc["results"]] == [1, 2]
    for r in doc["results"]:
        assert r["ttft_ms"] > 0 and r["decode_tok_s"] > 0 and r["ms_per_token"] > 0
        # 40 tokens fill 2 blocks, but the measured batch of 1 is not the warm-up's prompt:
        # its first token comes from a prefill, not from the prefix cache.
        assert r["cached_prompt_tokens"] == 0, r


def test_profile():
    doc = bench("profile", "--shape", "tiny", "--batch", "2", "--context-len", "16", "--steps", "3")
    (r,) = doc["results"]
    assert r["wall_ms"] > 0 and r["kernels_per_step"] > 0 and 0 < r["busy_share"]
    assert "CPU" in r["measured"] or r["device"].startswith("cuda")


def test_busy():
    doc = bench(
        "busy", "--shape", "tiny", "--num-requests", "4", "--input-len", "8", "--warmup", "2",
        "--window", "4", "--max-model-len", "256",
    )  # fmt: skip
    (r,) = doc["results"]
    assert r["requests"] == 4 and r["window_steps"] == 4 and r["wall_ms_per_step"] > 0
    assert "CPU" in r["measured"] or 0 < r["busy_share"] <= 1


def test_busy_share_of_a_trace(tmp_path):
    """The device's activity over the middle 80% of its span: overlaps count once, a step is
    a CUDA-graph launch, idle gaps split at 20 us into the host's and the device's own."""
    from zllm.bench.engine_busy import device_activity

    kernels = [(0, 400), (200, 600), (600, 800), (805, 850), (900, 1000)]
    events = [{"ph": "X", "cat": "kernel", "name": "k", "ts": a, "dur": b - a} for a, b in kernels]
    events += [{"ph": "X", "cat": "cuda_runtime", "name": "cudaGraphLaunch", "ts": t, "dur": 1}
               for t in (50, 150, 500, 950)]  # fmt: skip
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    activity = device_activity(str(path))
    # Window 100-900: busy 100-800 and 805-850 = 745 of 800; idle 800-805 (short) and
    # 850-900 (long); launches at 150 and 500 fall inside.
    assert activity == {
        "window_ms": 0.8,
        "busy_share": round(745 / 800, 3),
        "decode_steps": 2,
        "ms_per_step": 0.4,
        "idle_share_long_gaps": round(50 / 800, 3),
        "idle_share_short_gaps": round(5 / 800, 3),
        "long_gaps": 1,
    }


def test_bad_arguments_name_the_option():
    out = subprocess.run(
        [*ZLLM, "bench", "throughput", "--shape", "tiny", "--input-len", "9:3"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1 and "9:3" in out.stderr


def test_shape_or_model_is_required():
    out = subprocess.run([*ZLLM, "bench", "latency"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--shape" in out.stderr
