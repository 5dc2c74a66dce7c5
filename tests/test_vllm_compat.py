"""vLLM's example scripts, with `vllm` replaced by `zllm` in their import lines (tests/compat/),
run as their users run them, and what they print checked; and vLLM's quickstart in a real
Jupyter kernel.

The scripts run in this process (`runpy`, as `__main__`, with their own `sys.argv`), except
the reproducibility one, whose point is a fresh process: it runs twice, in two processes.
Each starts its own engine on the default model, as the original does.
"""

from __future__ import annotations

import ast
import os
import random
import re
import runpy
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

import zllm.distributed
from zllm.frontend.cleanup import cleanup_dist_env_and_memory

SCRIPTS = Path(__file__).parent / "compat"
pytestmark = pytest.mark.usefixtures("default_model_path")  # fetched once, before any script


def run_script(name: str, *argv: str, monkeypatch, capsys) -> str:
    """Run tests/compat/`name` as `python name argv...` would, in this process; its stdout."""
    monkeypatch.setattr(sys, "argv", [name, *argv])
    try:
        runpy.run_path(str(SCRIPTS / name), run_name="__main__")
    finally:
        cleanup_dist_env_and_memory()  # the script's dropped engines: their processes are gone
    assert not _engine_processes(), "the script left engine processes behind"
    return capsys.readouterr().out


def _engine_processes() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True) if p.is_running()]


def _pairs(out: str, first: str, second: str) -> list[tuple[str, str]]:
    """(first, second) values of consecutive `first: 'x'` / `second: 'y'` lines."""
    pattern = rf"^{first}:\s*(.+)\n{second}:\s*(.+)$"
    return [(ast.literal_eval(a), ast.literal_eval(b)) for a, b in re.findall(pattern, out, re.M)]


PROMPTS = [
    "Hello, my name is",
    "The president of the United States is",
    "The capital of France is",
    "The future of AI is",
]


def test_basic(monkeypatch, capsys) -> None:
    out = run_script("basic.py", monkeypatch=monkeypatch, capsys=capsys)
    pairs = _pairs(out, "Prompt", "Output")
    assert [p for p, _ in pairs] == PROMPTS
    assert all(text for _, text in pairs)


def test_generate_with_argparse(monkeypatch, capsys) -> None:
    """Engine options from `EngineArgs.add_cli_args` (in vLLM's underscore spelling too), the
    sampling ones set on `get_default_sampling_params()`."""
    argv = ["--max-tokens", "8", "--temperature", "0", "--max_model_len", "512"]
    out = run_script("generate.py", *argv, monkeypatch=monkeypatch, capsys=capsys)
    pairs = dict(_pairs(out, "Prompt", "Generated text"))
    assert list(pairs) == PROMPTS
    assert "Paris" in pairs["The capital of France is"]


TEMPLATE = (
    "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)


def test_chat_single_batched_and_with_a_chat_template(monkeypatch, capsys, tmp_path) -> None:
    template = tmp_path / "template.jinja"
    template.write_text(TEMPLATE)
    argv = ["--max-tokens", "8", "--temperature", "0", "--chat-template-path", str(template)]
    out = run_script("chat.py", *argv, monkeypatch=monkeypatch, capsys=capsys)
    pairs = _pairs(out, "Prompt", "Generated text")
    assert len(pairs) == 1 + 10 + 10
    default, custom = pairs[:11], pairs[11:]
    assert all("<|im_start|>system\nYou are a helpful assistant" in p for p, _ in default)
    assert len(set(default)) == 1, "greedy: the batch answers as the single conversation did"
    assert all(
        p.startswith("[system] You are a helpful assistant\n[user] Hello\n") for p, _ in custom
    )
    assert all(p.endswith("[assistant]") for p, _ in custom)
    assert all(text for _, text in pairs)


def test_async_streaming_through_the_v1_import_path(monkeypatch, capsys) -> None:
    out = run_script("async_llm_streaming.py", monkeypatch=monkeypatch, capsys=capsys)
    assert out.count("Generation complete!") == 3
    answers = re.findall(r"Response: (.*?)\n✅ Generation complete!", out, re.S)
    assert len(answers) == 3 and all(a.strip() for a in answers)
    assert "All streaming examples completed!" in out and "Shutting down engine..." in out


def test_llm_engine_loop(monkeypatch, capsys) -> None:
    out = run_script(
        "llm_engine_example.py", "--max-model-len", "512", monkeypatch=monkeypatch, capsys=capsys
    )
    finished = re.findall(r"^RequestOutput\(request_id='(\d)'.*finished=True", out, re.M)
    assert finished == sorted(finished) and sorted(finished) == ["0", "1", "2"]
    lines = {m[0]: m for m in re.findall(r"^RequestOutput\(request_id='(\d)'(.*)$", out, re.M)}
    assert lines["2"][1].count("CompletionOutput(index=") == 2  # n=2
    assert "prompt_logprobs=[None, {" in lines["0"][1]  # prompt_logprobs=1
    assert "logprobs=[{" in lines["0"][1]


def test_prefix_caching_with_cleanup(monkeypatch, capsys) -> None:
    """`del llm; cleanup_dist_env_and_memory()` leaves no engine process behind, before the
    second engine starts."""
    left_after_cleanup = []

    def cleanup(*args) -> None:
        cleanup_dist_env_and_memory(*args)
        left_after_cleanup.append(_engine_processes())

    monkeypatch.setattr(zllm.distributed, "cleanup_dist_env_and_memory", cleanup)
    out = run_script("prefix_caching.py", monkeypatch=monkeypatch, capsys=capsys)
    assert left_after_cleanup == [[]]
    assert out.count("Generated text:") == 8
    assert "Generated answers are the same: True" in out


def test_reproducibility_with_random_seeded(default_model_path: str) -> None:
    """Two fresh processes print the same samples, and the same `random.randint` afterwards:
    `LLM(seed=42)` seeded the user's `random`."""
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(SCRIPTS / "reproducibility.py")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(2)
    ]
    runs = []
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err[-3000:]
        runs.append(out)
    assert runs[0] == runs[1]
    pairs = _pairs(runs[0], "Prompt", "Generated text")
    assert [p for p, _ in pairs] == PROMPTS and all(text for _, text in pairs)
    assert runs[0].splitlines()[-1] == str(random.Random(42).randint(0, 100))


def test_token_prompts(monkeypatch, capsys) -> None:
    out = run_script("token_prompts.py", monkeypatch=monkeypatch, capsys=capsys)
    pairs = _pairs(out, "From token ids", "From text")
    assert len(pairs) == 3
    assert all(a == b and a for a, b in pairs)


def test_logprobs(monkeypatch, capsys) -> None:
    out = run_script("logprobs.py", monkeypatch=monkeypatch, capsys=capsys)
    cumulative = float(re.search(r"Cumulative logprob: (\S+)", out)[1])
    tokens = re.findall(r"^Token \d+ .* logprob=(\S+) rank=(\d+) top=(.*)$", out, re.M)
    assert len(tokens) == 6
    for logprob, rank, top in tokens:
        assert rank == "1"  # greedy: the best token
        ranked = [lp for _, lp in ast.literal_eval(top)]
        assert len(ranked) == 3 and ranked == sorted(ranked, reverse=True)
        assert ranked[0] == pytest.approx(float(logprob), abs=1e-5)
    assert cumulative == pytest.approx(sum(float(lp) for lp, _, _ in tokens), abs=1e-4)
    prompt = re.findall(r"^Prompt token \d+ logprob=(\S+)$", out, re.M)
    assert len(prompt) == 4 and all(float(lp) <= 0 for lp in prompt)


# ---- vLLM's quickstart in a real Jupyter kernel --------------------------------------------

QUICKSTART = """
from zllm import LLM, SamplingParams

prompts = ["Hello, my name is", "The capital of France is"]
sampling_params = SamplingParams(temperature=0.8, top_p=0.95)
llm = LLM(model="HuggingFaceTB/SmolLM2-135M-Instruct", max_model_len=512)
outputs = llm.generate(prompts, sampling_params)
for output in outputs:
    prompt = output.prompt
    generated_text = output.outputs[0].text
    print(f"Prompt: {prompt!r}, Generated text: {generated_text!r}")
"""
CHAT_CELL = """
messages = [{"role": "user", "content": "What is the capital of France?"}]
print(llm.chat(messages, SamplingParams(temperature=0, max_tokens=12))[0].outputs[0].text)
"""


@pytest.mark.timeout(300)
def test_quickstart_in_a_jupyter_kernel() -> None:
    """The kernel runs each cell inside its event loop: `LLM.generate` and `LLM.chat` must
    work there (vLLM's quickstart fails in its first cell otherwise)."""
    from jupyter_client.manager import start_new_kernel

    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false"}
    km, kc = start_new_kernel(kernel_name="python3", startup_timeout=120, env=env)
    try:
        outputs = [_run_cell(kc, cell) for cell in (QUICKSTART, CHAT_CELL, "llm.shutdown()")]
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    (quick_out, quick_err), (chat_out, _), _ = outputs
    # repr() quotes a text holding an apostrophe with double quotes (sampling is random).
    generated = r"^Prompt: '(.*?)', Generated text: (?:'.+'|\".+\")$"
    assert re.findall(generated, quick_out, re.M) == [
        "Hello, my name is",
        "The capital of France is",
    ]
    assert "Paris" in chat_out
    assert quick_err.count("blocks this thread's running event loop") == 1


def _run_cell(kc, code: str) -> tuple[str, str]:
    """Execute `code`; its stdout and stderr. Fails on an error in the cell."""
    streams = {"stdout": [], "stderr": []}

    def on_message(msg: dict) -> None:
        if msg["msg_type"] == "stream":
            streams[msg["content"]["name"]].append(msg["content"]["text"])

    reply = kc.execute_interactive(code, timeout=240, output_hook=on_message)
    content = reply["content"]
    assert content["status"] == "ok", "\n".join(content.get("traceback", [])) + "".join(
        streams["stderr"]
    )
    return "".join(streams["stdout"]), "".join(streams["stderr"])
