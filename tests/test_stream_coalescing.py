"""A consumer that lags behind the engine gets fewer outputs, never different ones.

The I/O thread queues a streaming request's state in its stream once; the consumer builds
the output when it takes it (vLLM's output collector merges pending outputs likewise). So
a slow consumer wakes once per output it takes, not once per step, and gets: CUMULATIVE,
the latest state (a subsequence of the step-by-step outputs, the same last one); DELTA,
pieces whose concatenation (text, token ids, logprobs, per completion index) equals the
step-by-step one, with the finish and the prompt logprobs where they were; FINAL_ONLY, the
one output. First the real delivery path fed by hand (exact comparisons with the old
one-output-per-step shaping, n = 1 and n = 2, stop strings, logprobs, aborts, errors), then
end to end through `AsyncLLM` on a tiny model with a consumer that sleeps between outputs.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time

import pytest

from zllm import RequestOutputKind, SamplingParams
from zllm.frontend.errors import EngineDeadError
from zllm.frontend.output_delivery import deliver, fail, finish_aborted
from zllm.frontend.output_processor import RequestState
from zllm.frontend.parallel_sampling import fan_out
from zllm.frontend.request_registry import EngineRequest, RequestRegistry
from zllm.frontend.stream import ConsumerGone, RequestStream
from zllm.protocol.messages import Logprobs, RequestUpdate

KINDS = list(RequestOutputKind)
TEXT = "Hello 日本語のテキスト 🎉🚀 café naïve, done. " * 3 + "THE END, then some more text."
STOP = "E EN"  # spans tokens, near the end: a long stream that a stop string cuts
PROMPT = [1, 2, 3, 4, 5]


@pytest.fixture(scope="module")
def tokenizer(default_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_path)


def _logprobs(tokens: list[int], salt: int) -> Logprobs:
    return Logprobs(
        token_ids=[[t, t + 1, t + 2] for t in tokens],
        logprobs=[[-0.25 - (t + salt) % 7 / 10, -3.0, -4.0] for t in tokens],
        ranks=[1 + (t + salt) % 3 for t in tokens],
    )


def _steps(tokenizer, n: int, finish: str = "length") -> list[list[RequestUpdate]]:
    """One update per child per step: child i gets the text's tokens from offset 3 * i; its
    last ends it (child i ends i steps early); child 0's first carries prompt logprobs."""
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    lengths = [len(ids) - 3 * n - i for i in range(n)]
    steps = []
    for step in range(max(lengths)):
        updates = []
        for i, length in enumerate(lengths):
            if step >= length:
                continue
            token = ids[3 * i + step]
            last = step == length - 1
            updates.append(
                RequestUpdate(
                    request_id=f"{i}_r" if n > 1 else "r",
                    new_token_ids=[token],
                    new_logprobs=_logprobs([token], i),
                    prompt_logprobs=_logprobs(PROMPT[1:], 0) if step == 0 and i == 0 else None,
                    finish_reason=finish if last else None,
                )
            )
        steps.append(updates)
    return steps


def _register(params: SamplingParams, tokenizer) -> tuple[RequestRegistry, RequestStream]:
    registry, stream = RequestRegistry(), RequestStream()
    _, engine_requests = fan_out("r", None, PROMPT, params, tokenizer)
    entries = [EngineRequest("r", eid, state, stream) for eid, _, state in engine_requests]
    registry.add(entries, lambda: None)
    return registry, stream


def _one_per_step(params: SamplingParams, tokenizer, steps) -> list:
    """The outputs as shaped before coalescing: one per update that shows something."""
    _, engine_requests = fan_out("r", None, PROMPT, params, tokenizer)
    states = {eid: state for eid, _, state in engine_requests}
    outputs = []
    for updates in steps:
        for update in updates:
            state = states[update.request_id]
            if state.finished:  # forgotten by the registry: later updates are dropped
                continue
            state.apply(update, 1.0)
            if update.new_token_ids or state.finished:
                output = state.output()
                if output is not None:
                    outputs.append(output)
    return outputs


def _drain(stream: RequestStream) -> list:
    items = []
    while True:
        try:
            items.append(stream.get_blocking(timeout=0))
        except TimeoutError:
            return items


def _coalesced(params: SamplingParams, tokenizer, steps, read_every: int) -> list:
    """The outputs a consumer gets that reads only after every `read_every` updates."""
    registry, stream = _register(params, tokenizer)
    outputs = []
    for i, update in enumerate(u for updates in steps for u in updates):
        deliver(registry, [update], 1.0)
        if i % read_every == read_every - 1:
            outputs += _drain(stream)
    return outputs + _drain(stream)


def _view(output) -> tuple:
    return (
        output.request_id,
        output.finished,
        output.prompt_logprobs,
        [
            (c.index, c.text, c.token_ids, c.cumulative_logprob, c.logprobs, c.finish_reason)
            + (c.stop_reason,)
            for c in output.outputs
        ],
    )


def _merged(outputs) -> dict:
    """DELTA pieces joined per completion index, checking where the finish and the prompt
    logprobs come: the finish in each index's last piece and the last output only."""
    assert outputs[-1].finished and not any(o.finished for o in outputs[:-1])
    assert all(o.prompt_logprobs is None for o in outputs[1:])
    merged: dict[int, dict] = {}
    for output in outputs:
        for c in output.outputs:
            m = merged.setdefault(c.index, dict(text="", tokens=[], logprobs=[], finish=None))
            assert m["finish"] is None, "a piece after the finishing one"
            m["text"] += c.text
            m["tokens"] += c.token_ids
            m["logprobs"] += c.logprobs or []
            m["cumulative_logprob"] = c.cumulative_logprob
            m["finish"] = (c.finish_reason, c.stop_reason) if c.finish_reason else None
    return dict(prompt_logprobs=outputs[0].prompt_logprobs, completions=merged)


def _check_same_stream(kind, before: list, after: list) -> None:
    """`after` is what a consumer may see instead of `before` (the one-per-step outputs)."""
    views, old = [_view(o) for o in after], [_view(o) for o in before]
    if kind == RequestOutputKind.FINAL_ONLY:
        assert views == old and len(views) == 1
    elif kind == RequestOutputKind.CUMULATIVE:  # states shown step by step, in order
        assert views[-1] == old[-1]
        at = 0
        for view in views:
            at = old.index(view, at) + 1
    else:
        assert _merged(after) == _merged(before)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("stop", [None, [STOP]])
def test_a_lagging_consumer_gets_fewer_outputs_with_the_same_content(tokenizer, kind, n, stop):
    params = SamplingParams(n=n, seed=0, output_kind=kind, logprobs=2, prompt_logprobs=2, stop=stop)
    steps = _steps(tokenizer, n)
    before = _one_per_step(params, tokenizer, steps)
    if kind != RequestOutputKind.FINAL_ONLY:
        assert len(before) >= len(steps) - 12
    updates = sum(len(step) for step in steps)
    for read_every in (1, 3, 10, updates):
        after = _coalesced(params, tokenizer, steps, read_every)
        _check_same_stream(kind, before, after)
        if kind != RequestOutputKind.FINAL_ONLY:
            # one output per read (and one for the end), whatever the number of updates
            assert len(after) <= updates // read_every + 1
        if read_every == 1:  # a consumer that keeps up sees exactly what it saw before
            assert [_view(o) for o in after] == [_view(o) for o in before]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [1, 2])
def test_a_consumer_racing_the_io_thread(tokenizer, kind, n):
    """The I/O thread delivers while an asyncio consumer takes outputs at random moments:
    never a duplicate or an older CUMULATIVE state, never a DELTA piece lost or twice."""
    params = SamplingParams(n=n, seed=0, output_kind=kind, logprobs=2, prompt_logprobs=2)
    steps = _steps(tokenizer, n)
    before = _one_per_step(params, tokenizer, steps)
    registry, stream = _register(params, tokenizer)
    pause, produce_pause = random.Random(n), random.Random(-n)

    def produce():
        for update in (u for updates in steps for u in updates):
            deliver(registry, [update], 1.0)
            time.sleep(produce_pause.random() / 2000)

    async def consume():
        outputs = []
        while not (outputs and outputs[-1].finished):
            outputs.append(await stream.get())
            await asyncio.sleep(pause.random() / 500)
        return outputs

    producer = threading.Thread(target=produce)
    producer.start()
    after = asyncio.run(consume())
    producer.join()
    _check_same_stream(kind, before, after)


def test_an_update_folded_in_while_the_consumer_waits_is_shown_once(tokenizer):
    """The consumer takes a queued state under the state's lock: an update that comes while
    it waits for the lock is in the output it builds, and is not queued again (which would
    show the same CUMULATIVE state twice)."""
    steps = _steps(tokenizer, 1)
    registry, stream = _register(SamplingParams(), tokenizer)
    deliver(registry, steps[0], 1.0)
    taken = []
    with registry.get("r").state.lock:
        consumer = threading.Thread(target=lambda: taken.append(stream.get_blocking(5)))
        consumer.start()
        time.sleep(0.2)  # the consumer now waits for the state's lock
        deliver(registry, steps[1], 1.0)
    consumer.join()
    assert taken[0].outputs[0].token_ids == [s[0].new_token_ids[0] for s in steps[:2]]
    assert _drain(stream) == []


@pytest.mark.parametrize("kind", [RequestOutputKind.CUMULATIVE, RequestOutputKind.DELTA])
def test_outputs_nobody_reads_are_never_built(tokenizer, monkeypatch, kind):
    built = []
    original = RequestState.completion
    monkeypatch.setattr(RequestState, "completion", lambda s: built.append(1) or original(s))
    params = SamplingParams(output_kind=kind)
    steps = _steps(tokenizer, 1)
    registry, stream = _register(params, tokenizer)
    for updates in steps:
        deliver(registry, updates, 1.0)
    assert not built and len(stream._items) == 1
    outputs = _drain(stream)
    assert len(outputs) == 1 and outputs[0].finished and len(built) == 1
    assert outputs[0].outputs[0].token_ids == [u[0].new_token_ids[0] for u in steps]


@pytest.mark.parametrize("kind", [RequestOutputKind.CUMULATIVE, RequestOutputKind.DELTA])
def test_abort_and_errors_come_after_the_pending_output(tokenizer, kind):
    params = SamplingParams(output_kind=kind)
    steps = _steps(tokenizer, 1)[:10]
    registry, stream = _register(params, tokenizer)
    for updates in steps:
        deliver(registry, updates, 1.0)
    entries = registry.pop_all()[0]
    finish_aborted(entries)
    deliver(registry, [RequestUpdate(request_id="r", new_token_ids=[9])], 1.0)  # too late
    stream.put_final(RuntimeError("after the end"))
    outputs = _drain(stream)
    # The abort built everything new into its last output; the queued state shows nothing.
    assert [type(o).__name__ for o in outputs] == ["RequestOutput", "RuntimeError"]
    last = outputs[0].outputs[0]
    assert last.finish_reason == "abort" and outputs[0].finished
    assert last.token_ids == [u[0].new_token_ids[0] for u in steps]

    # The engine dies behind a pending output: the output first, then the error.
    registry, stream = _register(params, tokenizer)
    for updates in steps:
        deliver(registry, updates, 1.0)
    fail(registry.pop_all()[0], "engine died")
    first, second = _drain(stream)
    assert not first.finished and len(first.outputs[0].token_ids) == len(steps)
    assert isinstance(second, EngineDeadError)


def test_a_closed_reading_loop_still_stops_the_request(tokenizer):
    params = SamplingParams(output_kind=RequestOutputKind.DELTA)
    steps = _steps(tokenizer, 1)
    registry, stream = _register(params, tokenizer)
    deliver(registry, steps[0], 1.0)

    loop = asyncio.new_event_loop()  # held: a stream's own reference to it is weak
    assert loop.run_until_complete(stream.get()).outputs[0].token_ids == [
        steps[0][0].new_token_ids[0]
    ]
    loop.close()
    # The loop that read is closed: the next step's output finds nobody, the request stops.
    assert deliver(registry, steps[1], 1.0) == ["r"]
    assert "r" not in registry
    with pytest.raises(ConsumerGone):  # and a state queued already says so too
        stream.put_pending(stream._items[0].source)


# ---- end to end: a consumer that sleeps between outputs ------------------------------------


@pytest.fixture(scope="module")
def engine(tiny_checkpoints):
    from scripts.scenario_process import tiny_async_engine

    engine = tiny_async_engine(tiny_checkpoints["llama"])
    yield engine
    engine.shutdown()


async def _consume(engine, params: SamplingParams, request_id: str, pause: float) -> list:
    outputs = []
    async for output in engine.generate({"prompt_token_ids": PROMPT * 4}, params, request_id):
        outputs.append(output)
        await asyncio.sleep(pause)
    return outputs


def _texts(outputs, kind) -> list[tuple]:
    """Per completion index: (index, text, token ids, finish reason), however it streamed."""
    if kind != RequestOutputKind.DELTA:
        completions = outputs[-1].outputs
        return sorted((c.index, c.text, c.token_ids, c.finish_reason) for c in completions)
    merged = _merged(outputs)["completions"]
    return sorted((i, m["text"], m["tokens"], m["finish"][0]) for i, m in merged.items())


@pytest.mark.timeout(180)
@pytest.mark.parametrize("n", [1, 2])
def test_a_sleeping_consumer_gets_the_same_text_and_tokens(engine, n):
    """Seeded sampling gives both consumers the same tokens; the slow one reads a few
    outputs while the engine makes dozens of steps."""
    tokens = 48

    async def run():
        runs = {}
        for kind in KINDS:
            params = SamplingParams(
                n=n, seed=5, temperature=1.0, max_tokens=tokens, ignore_eos=True, logprobs=1
            )
            params = params.clone(output_kind=kind)
            runs[kind] = await asyncio.gather(
                _consume(engine, params, f"fast-{kind.name}-{n}", 0),
                _consume(engine, params, f"slow-{kind.name}-{n}", 0.2),
            )
        return runs

    runs = asyncio.run(run())
    texts = [_texts(outputs, kind) for kind, pair in runs.items() for outputs in pair]
    assert all(t == texts[0] for t in texts), texts  # every kind, fast or slow
    assert len(texts[0]) == n and all(len(ids) == tokens for _, _, ids, _ in texts[0])
    for kind, (fast, slow) in runs.items():
        if kind != RequestOutputKind.FINAL_ONLY:  # without coalescing: `tokens` outputs
            assert len(slow) < tokens / 2, len(slow)
        for outputs in (fast, slow):
            if kind == RequestOutputKind.DELTA:
                counts = [len(m["logprobs"]) for m in _merged(outputs)["completions"].values()]
            else:
                counts = [len(c.logprobs) for c in outputs[-1].outputs]
            assert counts == [tokens] * n
