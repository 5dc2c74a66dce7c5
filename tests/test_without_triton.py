"""A CPU-only install has no triton (CPU builds of torch do not bring it; zllm lists it only
for tests): generation must not import it. Every process of the run below finds a `triton`
that refuses to import, as on such a machine."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import sys
    try:
        import triton  # noqa: F401
        sys.exit("triton imported: the stub did not hide it")
    except ImportError:
        pass
    from zllm import LLM, SamplingParams
    llm = LLM(sys.argv[1], skip_tokenizer_init=True, dtype="float32", max_model_len=128)
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, detokenize=False)
    out = llm.generate([{"prompt_token_ids": [5, 6, 7]}], params, use_tqdm=False)
    print("tokens", len(out[0].outputs[0].token_ids))
    llm.shutdown()
    """
)


def test_generation_runs_without_triton(tiny_checkpoints, tmp_path) -> None:
    stub = tmp_path / "stub" / "triton"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text('raise ImportError("no triton on this machine")\n')
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(stub.parent), os.environ.get("PYTHONPATH", "")])
    )
    env.pop("TRITON_INTERPRET", None)
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT, tiny_checkpoints["llama"]],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "tokens 3" in run.stdout
