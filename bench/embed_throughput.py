"""Offline embedding throughput: zllm's `LLM.embed` against sentence-transformers' `encode`,
same model, same sentences, same dtype, in one run.

    python bench/embed_throughput.py --num-sentences 10000 --device cuda
    python bench/embed_throughput.py --num-sentences 256 --device cpu

Sentences are random words of the model's vocabulary, 32-128 tokens each (both engines
tokenize the same text themselves). The model is all-MiniLM-L6-v2 (the packaged default
embedding model), or `--model DIR`. Prints one JSON line per engine (embeddings/s, seconds)
and one comparing them (speed-up, min cosine between the two engines' vectors).
"""

from __future__ import annotations

import argparse
import json
import random
import time


def make_sentences(tokenizer, n: int, seed: int) -> list[str]:
    """n texts of 32-128 tokens (special tokens included), random whole words of the vocab."""
    rng = random.Random(seed)
    words = [w for w in tokenizer.get_vocab() if w.isalpha() and w.isascii() and len(w) > 2]
    words.sort()
    sentences = []
    for _ in range(n):
        target = rng.randint(32, 128)
        text = " ".join(rng.choice(words) for _ in range(target))
        ids = tokenizer.encode(text)
        while len(ids) > target:  # a few words split into pieces: trim to the target length
            text = text.rsplit(" ", 1)[0]
            ids = tokenizer.encode(text)
        sentences.append(text)
    return sentences


def run_zllm(model: str, sentences: list[str], device: str, dtype: str, **engine_kwargs) -> dict:
    import torch

    from zllm import LLM

    start = time.perf_counter()
    llm = LLM(model, device=device, dtype=dtype, **engine_kwargs)
    load_s = time.perf_counter() - start
    llm.embed(sentences[:8])  # warm-up
    start = time.perf_counter()
    outputs = llm.embed(sentences)
    seconds = time.perf_counter() - start
    llm.shutdown()
    return {
        "engine": "zllm",
        "seconds": seconds,
        "load_s": load_s,
        "vectors": torch.tensor([o.outputs.embedding for o in outputs]),
    }


def run_sentence_transformers(
    model: str, sentences: list[str], device: str, dtype: str, batch_size: int
) -> dict:
    import torch
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(model, device=device)
    st.to(getattr(torch, dtype))
    st.encode(sentences[:8], batch_size=batch_size)  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    vectors = st.encode(sentences, batch_size=batch_size, convert_to_tensor=True)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return {
        "engine": f"sentence-transformers (batch {batch_size})",
        "seconds": time.perf_counter() - start,
        "vectors": vectors.float().cpu(),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-sentences", type=int, default=10000)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="", help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--model", default="", help="a checkpoint dir (default: all-MiniLM-L6-v2)")
    parser.add_argument("--st-batch-size", type=int, default=32, help="sentence-transformers'")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer

    from zllm.frontend.default_embedding_model import download_default_embedding

    model = args.model or str(download_default_embedding())
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    sentences = make_sentences(AutoTokenizer.from_pretrained(model), args.num_sentences, args.seed)
    lengths = [len(ids) for ids in AutoTokenizer.from_pretrained(model)(sentences)["input_ids"]]
    workload = {
        "sentences": len(sentences),
        "tokens_min_mean_max": [min(lengths), round(sum(lengths) / len(lengths), 1), max(lengths)],
        "device": args.device,
        "dtype": dtype,
        "model": model,
    }
    peer = run_sentence_transformers(model, sentences, args.device, dtype, args.st_batch_size)
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    ours = run_zllm(
        model,
        sentences,
        args.device,
        dtype,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_num_seqs=args.max_num_seqs,
    )
    for r in (peer, ours):
        r["embeddings_per_s"] = round(len(sentences) / r["seconds"], 1)
        print(json.dumps({k: v for k, v in r.items() if k != "vectors"} | workload), flush=True)
    cosine = torch.nn.functional.cosine_similarity(ours["vectors"], peer["vectors"], dim=-1)
    print(
        json.dumps(
            {
                "speedup": round(peer["seconds"] / ours["seconds"], 2),
                "min_cosine_zllm_vs_peer": round(cosine.min().item(), 7),
            }
        )
    )


if __name__ == "__main__":
    main()
