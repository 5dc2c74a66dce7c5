"""Greedy parity on the GPU: zllm vs transformers on tiny random Llama / Qwen2 / Qwen3 checkpoints,
float32 (token-identical expected) and bfloat16 (reported: agreement over the first tokens).

    python bench/gpu_parity.py
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
import transformers

SHAPES = {
    "llama": ("LlamaConfig", dict(tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(head_dim=32, tie_word_embeddings=False)),
}


def main() -> None:
    from zllm import LLM, SamplingParams

    g = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(3, 1000, (n,), generator=g).tolist() for n in (5, 17, 33, 64, 100, 3, 250, 12)
    ]
    for kind, (cls, extra) in SHAPES.items():
        for dtype in ("float32", "bfloat16"):
            path = Path(tempfile.mkdtemp()) / kind
            config = getattr(transformers, cls)(
                vocab_size=1000,
                hidden_size=128,
                intermediate_size=256,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=1024,
                bos_token_id=1,
                eos_token_id=2,
                **extra,
            )
            torch.manual_seed(0)
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            with torch.no_grad():
                for p in model.parameters():
                    if p.dim() > 1:
                        p.normal_(0, 0.08)
            model.save_pretrained(path)
            model = model.to("cuda", getattr(torch, dtype))
            refs = []
            for p in prompts:
                out = model.generate(
                    torch.tensor([p], device="cuda"),
                    max_new_tokens=32,
                    min_new_tokens=32,
                    do_sample=False,
                )
                refs.append(out[0, len(p) :].tolist())
            llm = LLM(str(path), skip_tokenizer_init=True, dtype=dtype)
            outs = llm.generate(
                [{"prompt_token_ids": p} for p in prompts],
                SamplingParams(max_tokens=32, min_tokens=32, temperature=0, detokenize=False),
            )
            llm.shutdown()
            same = [o.outputs[0].token_ids == r for o, r in zip(outs, refs)]
            prefix = [
                next((i for i, (a, b) in enumerate(zip(o.outputs[0].token_ids, r)) if a != b), 32)
                for o, r in zip(outs, refs)
            ]
            print(
                json.dumps(
                    {
                        "model": kind,
                        "dtype": dtype,
                        "identical": sum(same),
                        "of": len(same),
                        "first_divergence": prefix,
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
