"""The public API as vLLM users write it: `AsyncLLM.generate` and `LLM.generate` / `LLM.chat`
signatures, prompt forms, output fields and order, `EngineArgs` keywords, and the command line.

Two engines on the default model, shared by the module: `LLM` on the in-process worker
("uni") and `AsyncLLM` on a worker process ("mp"), which must agree token for token.
"""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from zllm import (
    LLM,
    AsyncEngineArgs,
    AsyncLLM,
    CompletionOutput,
    EngineArgs,
    RequestOutput,
    RequestOutputKind,
    SamplingParams,
)
from zllm.frontend.cli import build_parser, engine_args_from
from zllm.protocol.config import DAEMON_CLIENT_OPTIONS

CLIENT_ONLY = {"engine_core_address", *DAEMON_CLIENT_OPTIONS}

PROMPTS = [
    "The capital of France is",
    "def add(a, b):",
    "Water boils at",
    "My favourite colour is",
]
GREEDY = SamplingParams(max_tokens=8, temperature=0.0)


@pytest.fixture(scope="module")
def llm(default_model_path: str):
    engine = LLM(
        model=default_model_path,
        max_num_seqs=4,
        block_size=16,
        max_model_len=1024,
        distributed_executor_backend="uni",
    )
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def async_engine(default_model_path: str):
    engine = AsyncLLM.from_engine_args(
        AsyncEngineArgs(
            model=default_model_path, max_model_len=1024, distributed_executor_backend="mp"
        )
    )
    yield engine
    engine.shutdown()


async def _final(engine: AsyncLLM, *args, **kwargs) -> RequestOutput:
    last = None
    async for out in engine.generate(*args, **kwargs):
        last = out
    assert last is not None and last.finished
    return last


# ---- AsyncLLM.generate --------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_async_generate_takes_positional_and_keyword_arguments(async_engine: AsyncLLM) -> None:
    prompt = PROMPTS[0]

    async def run() -> list[RequestOutput]:
        return await asyncio.gather(
            _final(async_engine, prompt, GREEDY, "positional"),
            _final(async_engine, prompt=prompt, sampling_params=GREEDY, request_id="keywords"),
            _final(async_engine, request_id="seed-order", prompt=prompt, sampling_params=GREEDY),
            _final(async_engine, prompt, sampling_params=GREEDY),  # request id generated
        )

    outputs = asyncio.run(run())
    assert [o.request_id for o in outputs[:3]] == ["positional", "keywords", "seed-order"]
    assert isinstance(outputs[3].request_id, str) and outputs[3].request_id
    assert len({o.request_id for o in outputs}) == 4
    tokens = [o.outputs[0].token_ids for o in outputs]
    assert all(t == tokens[0] for t in tokens) and len(tokens[0]) > 0


@pytest.mark.timeout(120)
def test_streamed_outputs_have_vllm_fields(async_engine: AsyncLLM) -> None:
    """CUMULATIVE grows to the final output; DELTA pieces add up to it; FINAL_ONLY is one output."""
    prompt = PROMPTS[2]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)

    async def collect(kind: RequestOutputKind) -> list[RequestOutput]:
        return [o async for o in async_engine.generate(prompt, params.clone(output_kind=kind))]

    async def run():
        return await asyncio.gather(*(collect(k) for k in RequestOutputKind))

    cumulative, delta, final_only = asyncio.run(run())
    final = cumulative[-1]
    assert isinstance(final, RequestOutput) and isinstance(final.outputs[0], CompletionOutput)
    assert final.prompt == prompt
    assert final.prompt_token_ids == async_engine.tokenizer(prompt).input_ids
    assert final.finished and final.outputs[0].finish_reason == "length"
    assert final.outputs[0].index == 0 and len(final.outputs[0].token_ids) == 6
    # A consumer that lags a step behind gets the steps merged (tests/test_stream_coalescing.py):
    # at most one output per generated token, each holding more tokens than the last.
    lengths = [len(o.outputs[0].token_ids) for o in cumulative]
    assert lengths == sorted(set(lengths)) and lengths[0] >= 1, lengths
    for out in cumulative[:-1]:
        assert not out.finished and out.outputs[0].finish_reason is None
    for earlier, later in zip(cumulative, cumulative[1:]):
        assert (
            later.outputs[0].token_ids[: len(earlier.outputs[0].token_ids)]
            == earlier.outputs[0].token_ids
        )
    assert sum((o.outputs[0].token_ids for o in delta), []) == final.outputs[0].token_ids
    assert "".join(o.outputs[0].text for o in delta) == final.outputs[0].text
    assert len(final_only) == 1 and final_only[0].outputs[0].text == final.outputs[0].text


# ---- LLM ------------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_prompt_forms_give_the_same_generation(llm: LLM) -> None:
    text = PROMPTS[0]
    ids = llm.get_tokenizer()(text).input_ids
    outputs = llm.generate([text, {"prompt": text}, {"prompt_token_ids": ids}], GREEDY)
    assert [o.prompt for o in outputs] == [text, text, None]
    assert all(o.prompt_token_ids == ids for o in outputs)
    tokens = [o.outputs[0].token_ids for o in outputs]
    assert tokens[0] == tokens[1] == tokens[2]
    assert outputs[0].outputs[0].text == outputs[2].outputs[0].text != ""


@pytest.mark.timeout(120)
def test_llm_generate_keeps_input_order(llm: LLM) -> None:
    # The first prompt runs longest, so it finishes last; outputs still come back in input order.
    lengths = [8, 5, 3, 1]
    per_prompt = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in lengths]
    outputs = llm.generate(PROMPTS, per_prompt)
    assert [o.prompt for o in outputs] == PROMPTS
    assert [len(o.outputs[0].token_ids) for o in outputs] == lengths
    assert all(o.finished and o.outputs[0].finish_reason == "length" for o in outputs)

    shared = llm.generate(PROMPTS, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
    assert [o.prompt for o in shared] == PROMPTS
    assert [len(o.outputs[0].token_ids) for o in shared] == [2] * 4

    single = llm.generate(PROMPTS[1], per_prompt[0])  # one prompt, not in a list
    assert (
        len(single) == 1 and single[0].outputs[0].token_ids[:5] == outputs[1].outputs[0].token_ids
    )

    with pytest.raises(ValueError):
        llm.generate(PROMPTS, per_prompt[:2])


def test_a_batch_reaches_the_engine_together(llm: LLM) -> None:
    # One frame for the whole batch: the first step prefills all four prompts, so the same
    # batch always meets the same batch composition (bf16 tokens depend on it).
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    for _ in range(3):
        before = llm.get_stats().num_steps
        llm.generate(PROMPTS, params)
        assert llm.get_stats().num_steps - before == 6  # one step per token, all in step


def test_a_bad_prompt_in_a_batch_sends_nothing(llm: LLM) -> None:
    too_long = {"prompt_token_ids": [1] * 2000}  # beyond max_model_len=1024
    steps_before = llm.get_stats().num_steps
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate([PROMPTS[0], too_long, PROMPTS[1]], GREEDY)
    stats = llm.get_stats()
    assert stats.num_steps == steps_before  # the good prompts never reached the engine
    assert stats.num_running == stats.num_waiting == stats.kv_blocks_used == 0
    assert [o.prompt for o in llm.generate(PROMPTS[:2], GREEDY)] == PROMPTS[:2]


@pytest.mark.timeout(120)
def test_chat_answers(llm: LLM) -> None:
    params = SamplingParams(max_tokens=30, temperature=0.0)
    france = [{"role": "user", "content": "What is the capital of France?"}]
    [one] = llm.chat(france, params)
    assert "Paris" in one.outputs[0].text
    assert one.prompt.rstrip().endswith("assistant"), "the chat template adds the generation prompt"
    germany = [{"role": "user", "content": "What is the capital of Germany?"}]
    both = llm.chat([france, germany], params)
    assert "Paris" in both[0].outputs[0].text and "Berlin" in both[1].outputs[0].text


def test_engine_args_are_keywords(llm: LLM, default_model_path: str) -> None:
    core_args = llm.client.ready.engine_args  # what engine-core itself runs with
    assert (core_args.max_num_seqs, core_args.block_size, core_args.max_model_len) == (4, 16, 1024)
    assert core_args.distributed_executor_backend == "uni"
    with pytest.raises(TypeError):
        LLM(model=default_model_path, max_num_seq=4)  # misspelt: refused before anything starts
    with pytest.raises(TypeError):
        AsyncLLM(model=default_model_path, no_such_option=True)


@pytest.mark.timeout(120)
def test_uni_and_mp_executors_agree(llm: LLM, async_engine: AsyncLLM) -> None:
    assert async_engine.client.ready.engine_args.distributed_executor_backend == "mp"
    params = SamplingParams(max_tokens=12, temperature=0.0)
    uni = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]

    async def run() -> list[RequestOutput]:
        return await asyncio.gather(*(_final(async_engine, p, params) for p in PROMPTS))

    mp = [o.outputs[0].token_ids for o in asyncio.run(run())]
    assert uni == mp


# ---- the command line -------------------------------------------------------------------------------


def _option_argv(field: msgspec.structs.FieldInfo) -> list[str]:
    """A valid command-line spelling of `field` with some value of its type."""
    flag = "--" + field.name.replace("_", "-")
    if field.type is bool:
        return [flag]
    text = str(field.type)
    if "dict" in text:
        return [flag, "{}"]
    return [flag, "1" if "int" in text else "0.5" if "float" in text else "x"]


@pytest.mark.parametrize(
    "command", [["generate", "hi"], ["chat"], ["engine-core", "--address", "ipc:///tmp/x"]]
)
def test_cli_has_an_option_for_every_engine_arg(command: list[str]) -> None:
    parser = build_parser()
    for field in msgspec.structs.fields(EngineArgs):
        if command[0] == "engine-core" and field.name in CLIENT_ONLY:
            continue  # a daemon's client's options (engine_core_address is --address there)
        ns = parser.parse_args(command + _option_argv(field))
        assert hasattr(ns, field.name), field.name


def test_engine_core_takes_its_model_once(capsys) -> None:
    from zllm.frontend.cli import main

    argv = ["engine-core", "/models/a", "--model", "/models/b", "--address", "ipc:///tmp/x"]
    assert main(argv) == 1
    assert "two models: '/models/a' and --model '/models/b'" in capsys.readouterr().err


def test_cli_options_become_engine_args() -> None:
    parser = build_parser()
    argv = ["generate", "hi", "--max-num-seqs", "3", "--block-size", "32", "--dtype", "bfloat16"]
    argv += ["--gpu-memory-utilization", "0.5", "--max-model-len", "128"]
    argv += [
        "--no-enable-prefix-caching",
        "--enforce-eager",
        "--distributed-executor-backend",
        "uni",
    ]
    args = engine_args_from(parser.parse_args(argv))
    assert args == EngineArgs(
        max_num_seqs=3,
        block_size=32,
        dtype="bfloat16",
        gpu_memory_utilization=0.5,
        max_model_len=128,
        enable_prefix_caching=False,
        enforce_eager=True,
        distributed_executor_backend="uni",
    )
    assert engine_args_from(parser.parse_args(["generate", "hi"])) == EngineArgs()
    with pytest.raises(ValueError):  # EngineArgs' own validation applies
        engine_args_from(parser.parse_args(["chat", "--block-size", "3"]))


@pytest.mark.parametrize("command", [["generate", "hi"], ["chat"]])
def test_cli_has_an_option_for_every_sampling_param(command: list[str]) -> None:
    parser = build_parser()
    for field in msgspec.structs.fields(SamplingParams):
        if field.name in ("seed", "output_kind") or field.name.startswith("_"):
            continue  # --seed is the engine's; the command picks the output kind
        ns = parser.parse_args(command + _option_argv(field))
        assert hasattr(ns, field.name), field.name


def test_cli_sampling_options_become_sampling_params() -> None:
    from zllm.frontend.cli import _sampling_params

    parser = build_parser()
    argv = ["generate", "hi", "--top-k", "5", "--min-p", "0.1", "--temperature", "0.7"]
    argv += ["--stop", "END", "--stop", "STOP", "--stop-token-ids", "[7, 8]", "--seed", "3"]
    argv += ["--logit-bias", '{"5": 2.5}', "--no-skip-special-tokens", "--bad-words", "x"]
    params = _sampling_params(parser.parse_args(argv))
    assert params == SamplingParams(
        max_tokens=256,  # the command line's default
        top_k=5,
        min_p=0.1,
        temperature=0.7,
        stop=["END", "STOP"],
        stop_token_ids=[7, 8],
        seed=3,
        logit_bias={5: 2.5},
        skip_special_tokens=False,
        bad_words=["x"],
        output_kind=RequestOutputKind.DELTA,
    )
    several = _sampling_params(parser.parse_args(["generate", "hi", "--n", "2"]))
    assert several.temperature == 0.0 and several.output_kind == RequestOutputKind.FINAL_ONLY


def test_cli_version(capsys) -> None:
    import zllm

    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"zllm {zllm.__version__}"


def test_engine_args_cli_as_vllm_examples_use_it() -> None:
    """`EngineArgs.add_cli_args` on a parser or on an argument group (vLLM's examples do both),
    underscores or dashes (`FlexibleArgumentParser`), `from_cli_args` on either class."""
    from zllm.utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    group = parser.add_argument_group("Engine arguments")
    assert EngineArgs.add_cli_args(group) is group
    group.set_defaults(model="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--max-tokens", type=int)
    ns = parser.parse_args(["--max_model_len=512", "--max-num-seqs", "4", "--max_tokens", "9"])
    assert vars(ns) == {
        "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "max_model_len": 512,
        "max_num_seqs": 4,
        "max_tokens": 9,
    }
    args = AsyncEngineArgs.from_cli_args(ns)
    assert type(args) is AsyncEngineArgs and (args.max_model_len, args.max_num_seqs) == (512, 4)
    assert type(EngineArgs.from_cli_args(ns)) is EngineArgs
