"""A client that reads slower than the engine steps loses nothing: engine-core sends it one
`StepOutputs` per step whatever its backlog, and every request still finishes. (ZeroMQ's
default high-water mark of 1000 messages per side made a ROUTER drop the rest in silence:
a client ~2000 steps behind never saw its requests finish.) Real engine processes."""

from __future__ import annotations

import time

import pytest
from scripts.raw_client import RawClient
from scripts.scenario_process import single_threaded_engines

from zllm import LLM, SamplingParams
from zllm.protocol import messages as m

DEFAULT_HWM = 1000  # ZeroMQ's default SNDHWM and RCVHWM, in messages
REQUESTS, TOKENS = 3, 1000  # one request at a time: one step, one message per token


@pytest.mark.timeout(120)
def test_a_client_that_stops_reading_gets_every_output_later(tiny_checkpoints) -> None:
    with single_threaded_engines():
        llm = LLM(
            tiny_checkpoints["llama"],
            distributed_executor_backend="uni",
            kv_cache_memory_bytes=2**24,
            max_num_seqs=1,  # the requests run one after another: REQUESTS * TOKENS steps
        )
    raw = None
    try:
        raw = RawClient(llm.client.input_address, llm.client.output_address)
        params = SamplingParams(max_tokens=TOKENS, temperature=0.0, ignore_eos=True)
        ids = [f"slow{i}" for i in range(REQUESTS)]
        raw.send(
            m.AddRequests(
                requests=[
                    m.AddRequest(
                        request_id=rid, prompt_token_ids=[10, 20, 30], sampling_params=params
                    )
                    for rid in ids
                ]
            )
        )
        # The raw client reads nothing until the engine has run every step. Meanwhile the
        # engine answers its other client (the LLM's) at once: a slow reader blocks no one.
        deadline = time.monotonic() + 90
        while True:
            start = time.monotonic()
            stats = llm.get_stats()
            assert time.monotonic() - start < 2.0, "engine-core stalled behind a slow client"
            if stats.num_steps >= REQUESTS * TOKENS and stats.num_running + stats.num_waiting == 0:
                break
            assert time.monotonic() < deadline, stats
            time.sleep(0.1)

        tokens = dict.fromkeys(ids, 0)
        finished: dict[str, str] = {}
        messages = 0
        # Every output is queued by now: a silence of a few seconds means the rest is lost.
        while len(finished) < REQUESTS and raw.from_core.poll(5000):
            message = m.decode_core_message(raw.from_core.recv())
            assert isinstance(message, m.StepOutputs), message
            messages += 1
            for update in message.updates:
                assert update.request_id not in finished, update
                tokens[update.request_id] += len(update.new_token_ids)
                if update.finish_reason is not None:
                    finished[update.request_id] = update.finish_reason
        assert tokens == dict.fromkeys(ids, TOKENS) and finished == dict.fromkeys(ids, "length"), (
            f"after {messages} messages: tokens {tokens}, finished {finished}"
        )
        # The backlog really was beyond both default high-water marks together.
        assert messages > 2 * DEFAULT_HWM + 500, messages
    finally:
        if raw is not None:
            raw.close()
        llm.shutdown()
