"""The `zllm bench` subcommands: throughput, latency, profile, busy, serve (the `zllm` CLI only
dispatches here). Each prints a table, or one JSON document with `--json`."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

from zllm.bench.shapes import SHAPES
from zllm.protocol.process import set_openmp_waits

# Before torch loads (OpenMP reads it then): the peer and the in-process profile wait between
# ops as the engine's processes do (`protocol/process.py`).
set_openmp_waits(os.environ)

# Engine options a benchmark decides itself.
_FIXED = ("model", "tokenizer", "load_format", "skip_tokenizer_init", "seed", "engine_core_address")


def _common(parser: argparse.ArgumentParser) -> None:
    from zllm.frontend.cli import add_engine_args

    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--shape", choices=sorted(SHAPES), help="random weights of a named shape")
    what.add_argument("--model", help="a checkpoint directory")
    parser.add_argument("--seed", type=int, default=0, help="weights and prompts")
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout")
    add_engine_args(parser, exclude=_FIXED)


def _peer(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--peer",
        action="append",
        default=[],
        choices=["transformers"],
        help="also run the workload on this engine, in the same process run",
    )


def add_bench_parser(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks: throughput, latency, profile, busy, serve")
    kinds = bench.add_subparsers(dest="bench_command", required=True)

    tp = kinds.add_parser("throughput", help="N random prompts at once (offline throughput)")
    _common(tp)
    _peer(tp)
    tp.add_argument("--num-prompts", type=int, default=256)
    tp.add_argument("--input-len", default="32:128", help="N or LOW:HIGH (uniform)")
    tp.add_argument("--output-len", default="128", help="N or LOW:HIGH (uniform)")
    tp.add_argument("--peer-batch", type=int, default=64, help="transformers generate batch")
    tp.set_defaults(func=cmd_throughput)

    lat = kinds.add_parser("latency", help="time to first token and decode speed per batch size")
    _common(lat)
    _peer(lat)
    lat.add_argument("--batch-sizes", default="1,4,16", help="comma-separated")
    lat.add_argument("--input-len", type=int, default=128)
    lat.add_argument("--output-len", type=int, default=128)
    lat.set_defaults(func=cmd_latency)

    prof = kinds.add_parser("profile", help="one steady decode step: wall vs kernel time")
    _common(prof)
    prof.add_argument("--batch", type=int, default=1)
    prof.add_argument("--context-len", type=int, default=128)
    prof.add_argument("--steps", type=int, default=20)
    prof.add_argument(
        "--top-kernels", type=int, default=0, metavar="N", help="list the N costliest kernels"
    )
    prof.set_defaults(func=cmd_profile)

    busy = kinds.add_parser(
        "busy", help="N requests decoding through the engine: the device's busy share"
    )
    _common(busy)
    busy.add_argument("--num-requests", type=int, default=256)
    busy.add_argument("--input-len", type=int, default=256)
    busy.add_argument("--warmup", type=int, default=32, help="decode steps before the window")
    busy.add_argument("--window", type=int, default=128, help="decode steps profiled")
    busy.set_defaults(func=cmd_busy)

    srv = kinds.add_parser("serve", help="load a running server: TTFT, TPOT, ITL, throughput")
    srv.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server's URL")
    srv.add_argument("--model", help="the served model name (default: the server's first)")
    srv.add_argument(
        "--api-key", default=os.environ.get("ZLLM_API_KEY"), help="default: $ZLLM_API_KEY"
    )
    srv.add_argument("--dataset", choices=["random", "sharegpt"], default="random")
    srv.add_argument("--dataset-path", help="ShareGPT JSON (--dataset sharegpt)")
    srv.add_argument("--num-prompts", type=int, default=100)
    srv.add_argument("--input-len", default="1024", help="random: N or LOW:HIGH tokens")
    srv.add_argument("--output-len", default="128", help="random: N or LOW:HIGH tokens")
    srv.add_argument("--vocab-size", type=int, default=1000, help="random: prompt ids from [10, N)")
    srv.add_argument(
        "--request-rate",
        type=float,
        default=float("inf"),
        help="requests per second, Poisson arrivals (default: inf, all at once)",
    )
    srv.add_argument("--max-concurrency", type=int, help="at most this many requests in flight")
    srv.add_argument(
        "--no-stream",
        dest="stream",
        action="store_false",
        help="whole completions: throughput and end-to-end latency, no TTFT/TPOT/ITL",
    )
    srv.add_argument("--seed", type=int, default=0, help="prompts and arrival times")
    srv.add_argument("--timeout", type=float, default=600.0, help="seconds a stream may stall")
    srv.add_argument("--json", action="store_true", help="one JSON document on stdout")
    srv.set_defaults(func=cmd_serve)


def _engine_kwargs(ns: argparse.Namespace) -> dict:
    import msgspec

    from zllm.protocol.config import EngineArgs

    names = {f.name for f in msgspec.structs.fields(EngineArgs)} - set(_FIXED)
    return {k: v for k, v in vars(ns).items() if k in names}


def _source(ns: argparse.Namespace):
    from zllm.bench.model_source import ModelSource

    return ModelSource.from_args(ns.shape, ns.model, ns.seed)


def _header(ns: argparse.Namespace, source) -> dict:
    import torch

    from zllm.bench.model_source import default_device
    from zllm.worker.layers.backend import attention_backend_name

    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = f"CPU ({os.cpu_count()} cores)"
    return {
        "bench": ns.bench_command,
        "date": datetime.date.today().isoformat(),
        "commit": _commit(),
        "command": "zllm " + " ".join(sys.argv[1:]),
        "device": device,
        "model": source.name,
        "attention_backend": attention_backend_name(torch.device(default_device())),
    }


def _commit() -> str | None:
    """The checkout's commit: the package's own, else the working directory's (a copy
    installed elsewhere, as on a GPU machine, is run from its checkout)."""
    for where in (Path(__file__).parent, Path.cwd()):
        try:
            out = subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                cwd=where,
                capture_output=True,
                text=True,
                timeout=5,
            )
        except OSError:
            continue
        if out.stdout.strip():
            return out.stdout.strip()
    return None


def _print(doc: dict, as_json: bool, columns: list[str]) -> None:
    if as_json:
        print(json.dumps(doc), flush=True)
        return
    for key, value in doc.items():
        if key != "results":
            print(f"{key}: {value}")
    rows = [[str(r.get(c, "")) for c in columns] for r in doc["results"]]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)))


def cmd_throughput(ns: argparse.Namespace) -> int:
    from zllm.bench import throughput
    from zllm.bench.workload import parse_length, random_workload

    input_len, output_len = parse_length(ns.input_len), parse_length(ns.output_len)
    source = _source(ns)
    workload = random_workload(ns.num_prompts, input_len, output_len, source.vocab_size(), ns.seed)
    results = throughput.run(source, workload, _engine_kwargs(ns), ns.peer, ns.peer_batch)
    doc = {**_header(ns, source), "workload": workload.describe(), "results": results}
    columns = ["engine", "output_tok_s", "total_tok_s", "requests_s", "seconds", "first_tokens"]
    _print(doc, ns.json, columns)
    return 0


def cmd_latency(ns: argparse.Namespace) -> int:
    from zllm.bench import latency

    try:
        batches = [int(b) for b in ns.batch_sizes.split(",")]
    except ValueError:
        raise ValueError(f"--batch-sizes {ns.batch_sizes!r}: comma-separated integers") from None
    source = _source(ns)
    args = (source, batches, ns.input_len, ns.output_len)
    results = latency.run_zllm(*args, _engine_kwargs(ns))
    if "transformers" in ns.peer:
        results += latency.run_peer(*args)
    doc = {
        **_header(ns, source),
        "workload": {"input_len": ns.input_len, "output_len": ns.output_len},
        "results": results,
    }
    columns = [
        "engine",
        "batch",
        "ttft_ms",
        "ms_per_token",
        "decode_tok_s_per_stream",
        "decode_tok_s",
    ]
    _print(doc, ns.json, columns)
    return 0


def cmd_profile(ns: argparse.Namespace) -> int:
    from zllm.bench import step_profile as profile

    source = _source(ns)
    result = profile.run(
        source, ns.batch, ns.context_len, ns.steps, _engine_kwargs(ns), ns.top_kernels
    )
    doc = {**_header(ns, source), "results": [result]}
    columns = ["wall_ms", "kernel_ms", "kernels_per_step", "busy_share", "measured"]
    _print(doc, ns.json, columns)
    if not ns.json and result.get("top_kernels"):
        print("us/step  per step  kernel")
        for k in result["top_kernels"]:
            print(f"{k['us_per_step']:>7}  {k['per_step']:>8}  {k['name']}")
    return 0


def cmd_busy(ns: argparse.Namespace) -> int:
    from zllm.bench import engine_busy

    source = _source(ns)
    result = engine_busy.run(
        source, ns.num_requests, ns.input_len, ns.warmup, ns.window, _engine_kwargs(ns)
    )
    doc = {**_header(ns, source), "results": [result]}
    columns = ["wall_ms_per_step", "ms_per_step", "busy_share", "decode_steps", "measured"]
    _print(doc, ns.json, columns)
    return 0


def cmd_serve(ns: argparse.Namespace) -> int:
    import asyncio

    from zllm.bench import serve

    if ns.num_prompts < 1:
        raise ValueError(f"--num-prompts must be >= 1, got {ns.num_prompts}")
    if not ns.request_rate > 0:
        raise ValueError(f"--request-rate must be > 0 (inf: all at once), got {ns.request_rate}")
    if ns.max_concurrency is not None and ns.max_concurrency < 1:
        raise ValueError(f"--max-concurrency must be >= 1, got {ns.max_concurrency}")
    result = asyncio.run(serve.bench(ns))
    header = {
        "bench": "serve",
        "date": datetime.date.today().isoformat(),
        "commit": _commit(),
        "command": "zllm " + " ".join(sys.argv[1:]),
    }
    doc = {**header, **result}
    if ns.json:
        print(json.dumps(doc), flush=True)
        return 0
    summary = doc.pop("results")[0]
    for key, value in doc.items():
        print(f"{key}: {value}")
    for key, value in summary.items():
        print(f"{key}: {value}")
    return 0
