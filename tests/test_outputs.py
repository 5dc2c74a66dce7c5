"""Streamed text is exactly the final text cut into pieces, for every output kind, with
multi-byte characters split across tokens and stop strings spanning tokens.

First the output processor alone, fed one token per update (many cases, no model), then
the same promises end to end on the default model (its byte-level BPE splits Japanese and
emoji over several tokens), plus finish reasons and metrics.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from zllm import AsyncLLM, EngineArgs, RequestOutputKind, SamplingParams
from zllm.frontend.output_processor import RequestState
from zllm.protocol.messages import RequestUpdate

KINDS = list(RequestOutputKind)
TEXT = "Hello 日本語のテキスト 🎉🚀 café naïve, done."


@pytest.fixture(scope="module")
def tokenizer(default_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_path)


def _feed(tokenizer, tokens: list[int], params: SamplingParams, finish=("length", None)):
    """Run tokens through a RequestState one update each; the outputs it yields."""
    state = RequestState("r", None, [1, 2, 3], params, tokenizer)
    outputs = []
    for i, token in enumerate(tokens):
        last = i == len(tokens) - 1
        update = RequestUpdate(
            request_id="r",
            new_token_ids=[token],
            finish_reason=finish[0] if last else None,
            stop_reason=finish[1] if last else None,
        )
        state.apply(update, time.time())
        output = state.output()
        if output is not None:
            outputs.append(output)
        if state.finished:
            break
    return outputs


def _final_text(outputs, kind: RequestOutputKind) -> str:
    """The text a user ends up with; checks each kind's streaming promises on the way."""
    assert outputs and outputs[-1].finished and not any(o.finished for o in outputs[:-1])
    texts = [o.outputs[0].text for o in outputs]
    if kind == RequestOutputKind.FINAL_ONLY:
        assert len(outputs) == 1
        return texts[0]
    if kind == RequestOutputKind.DELTA:
        return "".join(texts)
    for before, after in zip(texts, texts[1:]):  # never shows text it later takes back
        assert after.startswith(before)
    return texts[-1]


def _all_kinds(run) -> str:
    """The final text, after checking that every kind gives the same one."""
    finals = {kind: _final_text(run(kind), kind) for kind in KINDS}
    assert len(set(finals.values())) == 1, finals
    return finals[RequestOutputKind.FINAL_ONLY]


def test_split_multibyte_characters_same_text_for_every_kind(tokenizer) -> None:
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    assert any("\ufffd" in tokenizer.decode([t]) for t in ids)  # characters really split
    text = _all_kinds(lambda kind: _feed(tokenizer, ids, SamplingParams(output_kind=kind)))
    assert text == TEXT
    # Nothing ever shows half a character.
    for output in _feed(tokenizer, ids, SamplingParams(output_kind=RequestOutputKind.DELTA)):
        assert "\ufffd" not in output.outputs[0].text


@pytest.mark.parametrize("stop", ["テキ", "🚀 caf", "é na", "ve, d"])
@pytest.mark.parametrize("include", [False, True])
def test_stop_strings_spanning_tokens(tokenizer, stop: str, include: bool) -> None:
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    at = TEXT.find(stop)
    expected = TEXT[: at + len(stop)] if include else TEXT[:at]

    def run(kind):
        params = SamplingParams(stop=[stop], include_stop_str_in_output=include, output_kind=kind)
        outputs = _feed(tokenizer, ids, params)
        last = outputs[-1].outputs[0]
        assert (last.finish_reason, last.stop_reason) == ("stop", stop)
        return outputs

    assert _all_kinds(run) == expected


def test_stop_string_first_in_list_order_and_not_before_min_tokens(tokenizer) -> None:
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    params = SamplingParams(stop=["done", "Hello", "café"], min_tokens=3)  # "Hello" is token 0
    last = _feed(tokenizer, ids, params)[-1].outputs[0]
    assert (last.text, last.stop_reason) == (TEXT[: TEXT.find("café")], "café")


def test_stop_token_text_is_left_out_unless_asked(tokenizer) -> None:
    ids = tokenizer.encode("The end.", add_special_tokens=False) + [tokenizer.eos_token_id]
    stop_id = ids[-2]  # "."
    for include, expected in [(False, "The end"), (True, "The end.")]:
        params = SamplingParams(include_stop_str_in_output=include)
        last = _feed(tokenizer, ids[:-1], params, finish=("stop", stop_id))[-1].outputs[0]
        assert (last.text, last.finish_reason, last.stop_reason) == (expected, "stop", stop_id)
    last = _feed(tokenizer, ids, SamplingParams(), finish=("stop", None))[-1].outputs[0]
    assert (last.text, last.token_ids[-1], last.stop_reason) == ("The end.", ids[-1], None)


# ---- end to end on the default model ------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(default_model_path):
    engine = AsyncLLM(EngineArgs(model=default_model_path, distributed_executor_backend="uni"))
    yield engine
    engine.shutdown()


def _chat(tokenizer, content: str) -> dict:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    return {"prompt": text, "prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)}


def _generate(engine, prompt, params: SamplingParams, abort_after: int | None = None):
    return asyncio.run(_collect(engine, prompt, params, abort_after))


async def _collect(engine, prompt, params: SamplingParams, abort_after: int | None = None):
    outputs = []
    request_id = f"t{time.monotonic_ns()}-{id(params)}"
    async for output in engine.generate(prompt, params, request_id):
        outputs.append(output)
        if len(outputs) == abort_after:
            await engine.abort(request_id)
    return outputs


def _each_kind(engine, prompt, **params) -> dict:
    """One request per output kind, run together (one batch): kind -> its outputs."""

    async def run():
        runs = [_collect(engine, prompt, SamplingParams(**params, output_kind=k)) for k in KINDS]
        return dict(zip(KINDS, await asyncio.gather(*runs)))

    return asyncio.run(run())


def _same_text_for_each_kind(runs: dict) -> str:
    tokens = {kind: outputs[-1].outputs[0].token_ids for kind, outputs in runs.items()}
    tokens[RequestOutputKind.DELTA] = [
        t for o in runs[RequestOutputKind.DELTA] for t in o.outputs[0].token_ids
    ]
    assert all(t == tokens[RequestOutputKind.FINAL_ONLY] for t in tokens.values()), tokens
    return _all_kinds(lambda kind: runs[kind])


@pytest.mark.timeout(180)
def test_engine_streams_japanese_and_stops_inside_it(engine, tokenizer) -> None:
    prompt = _chat(tokenizer, "Repeat exactly: 日本語のテキスト 🎉🚀 café")
    greedy = dict(temperature=0, max_tokens=10)
    runs = _each_kind(engine, prompt, **greedy)
    base = runs[RequestOutputKind.FINAL_ONLY][-1].outputs[0]
    assert any("\ufffd" in tokenizer.decode([t]) for t in base.token_ids)
    assert base.finish_reason == "length" and len(base.text) >= 4
    assert _same_text_for_each_kind(runs) == base.text == tokenizer.decode(base.token_ids)
    # A stop string of whole characters, each split over tokens: it spans several tokens.
    stop = base.text[1:3]
    at = base.text.find(stop)
    runs = _each_kind(engine, prompt, **greedy, stop=[stop])
    assert _same_text_for_each_kind(runs) == base.text[:at]
    runs = _each_kind(engine, prompt, **greedy, stop=[stop], include_stop_str_in_output=True)
    assert _same_text_for_each_kind(runs) == base.text[: at + len(stop)]
    assert runs[RequestOutputKind.DELTA][-1].outputs[0].stop_reason == stop


@pytest.mark.timeout(180)
def test_engine_finish_reasons_and_metrics(engine, tokenizer) -> None:
    prompt = _chat(tokenizer, "What is the capital of France?")
    paris = tokenizer.encode(" Paris", add_special_tokens=False)[0]
    greedy = dict(temperature=0, max_tokens=30)

    async def run():
        return await asyncio.gather(
            _collect(engine, prompt, SamplingParams(**greedy)),
            # across the " Paris" / "." boundary
            _collect(engine, prompt, SamplingParams(**greedy, stop=["is."])),
            _collect(engine, prompt, SamplingParams(**greedy, stop_token_ids=[paris])),
            # min_tokens keeps EOS away; max_tokens then ends it.
            _collect(engine, prompt, SamplingParams(temperature=0, min_tokens=12, max_tokens=12)),
        )

    eos, stop, by_id, longer = (outputs[-1].outputs[0] for outputs in asyncio.run(run()))
    assert (eos.text, eos.finish_reason, eos.stop_reason) == (
        "The capital of France is Paris.",
        "stop",
        None,
    )
    assert paris in eos.token_ids
    assert (stop.text, stop.finish_reason, stop.stop_reason) == (
        "The capital of France is Par",
        "stop",
        "is.",
    )
    assert (by_id.text, by_id.finish_reason, by_id.stop_reason) == (
        "The capital of France is",
        "stop",
        paris,
    )
    assert longer.text.startswith(eos.text) and len(longer.token_ids) == 12
    assert (longer.finish_reason, longer.stop_reason) == ("length", None)

    outputs = _generate(engine, prompt, SamplingParams(temperature=0, max_tokens=4))
    m = outputs[-1].metrics
    assert m.arrival_time <= m.first_token_time < m.last_token_time <= m.finished_time
    assert m.last_token_time - m.arrival_time < 120

    # The user aborts mid-stream: the stream ends with finish_reason "abort".
    for kind in (RequestOutputKind.CUMULATIVE, RequestOutputKind.DELTA):
        params = SamplingParams(max_tokens=200, ignore_eos=True, output_kind=kind)
        outputs = _generate(engine, prompt, params, abort_after=1)
        assert outputs[-1].finished and outputs[-1].outputs[0].finish_reason == "abort"
        assert len(outputs) <= 3
