"""docs/vllm-compat.md lists every vLLM option and call zllm refuses, with the error it raises:
each line is run here, and must raise that error, naming what it refuses."""

from __future__ import annotations

import ast
import builtins
import re
from pathlib import Path

import pytest

from zllm import LLM, SamplingParams

DOC = Path(__file__).resolve().parents[1] / "docs" / "vllm-compat.md"


def refused_rows() -> list[tuple[str, str]]:
    text = DOC.read_text()
    table = text.split("<!-- refused:begin -->")[1].split("<!-- refused:end -->")[0]
    rows = []
    for line in table.strip().splitlines()[2:]:  # past the header and its rule
        call, error = re.findall(r"`([^`]+)`", line)[:2]
        rows.append((call, error))
    return rows


def named_in_message(call: str) -> list[str]:
    """What the error must name: the first keyword's name, else one of the call's strings or
    the called method."""
    node = ast.parse(call, mode="eval").body
    assert isinstance(node, ast.Call), call
    if node.keywords:
        return [node.keywords[0].arg]
    strings = [
        n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)
    ]
    method = node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id
    return [*strings, method]


@pytest.fixture(scope="module")
def llm(tiny_checkpoints):
    engine = LLM(
        tiny_checkpoints["llama"], distributed_executor_backend="uni", kv_cache_memory_bytes=2**24
    )
    yield engine
    engine.shutdown()


def test_the_doc_lists_refusals() -> None:
    rows = refused_rows()
    assert len(rows) >= 20
    assert all(hasattr(builtins, error) for _, error in rows), rows


@pytest.mark.parametrize("call, error", refused_rows(), ids=lambda v: v if "(" in v else "")
def test_each_listed_refusal_raises_the_listed_error(call: str, error: str, request) -> None:
    namespace = {"LLM": LLM, "SamplingParams": SamplingParams}
    if call.startswith("llm."):
        namespace["llm"] = request.getfixturevalue("llm")
    with pytest.raises(getattr(builtins, error)) as caught:
        eval(call, namespace)
    assert any(word in str(caught.value) for word in named_in_message(call)), (
        call,
        str(caught.value),
    )
