"""vLLM's API beyond `generate`: `LLMEngine`, `beam_search`, `collective_rpc`, the profiler,
`get_metrics`, the config views, `get_default_sampling_params`, `LLM.chat`'s template options,
and the `SamplingParams` fields the frontend and the sampler resolve.

One `LLM` and one `AsyncLLM` on the tiny llama checkpoint, shared by the module.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
from pathlib import Path

import msgspec
import pytest
import torch

from zllm import LLM, AsyncLLM, EngineArgs, SamplingParams
from zllm.config import ModelConfig, VllmConfig
from zllm.frontend.blocking import check_blocking_call
from zllm.frontend.seeding import seed_everything
from zllm.protocol import config as protocol_config
from zllm.sampling_params import BeamSearchParams
from zllm.v1.metrics.reader import Counter, Gauge

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
SMALL = dict(distributed_executor_backend="uni", kv_cache_memory_bytes=2**24)


@pytest.fixture(scope="module")
def profiler_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("traces")


@pytest.fixture(scope="module")
def llm(tiny_checkpoints, profiler_dir):
    with pytest.MonkeyPatch.context() as mp:  # read by the worker when it starts
        mp.setenv("ZLLM_TORCH_PROFILER_DIR", str(profiler_dir))
        engine = LLM(tiny_checkpoints["llama"], **SMALL)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def async_llm(tiny_checkpoints):
    engine = AsyncLLM(EngineArgs(model=tiny_checkpoints["llama"], **SMALL, disable_log_stats=False))
    yield engine
    engine.shutdown()


def _tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


# ---- LLMEngine --------------------------------------------------------------------------------


def test_llm_engine_steps_over_the_same_engine(llm: LLM) -> None:
    engine = llm.llm_engine
    assert engine is llm.llm_engine and engine.model_config.model == llm.get_model_config().model
    prompts = ["The capital of France is", "One, two, three,"]
    expected = _tokens(llm.generate(prompts, GREEDY, use_tqdm=False))
    before = llm.get_stats().num_steps
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, GREEDY)
    assert engine.get_num_unfinished_requests() == 2
    finals, steps = {}, 0
    while engine.has_unfinished_requests():
        outputs = engine.step()
        steps += 1
        assert len({o.request_id for o in outputs}) == len(outputs)  # latest per request
        finals.update({o.request_id: o for o in outputs if o.finished})
    assert [finals[f"r{i}"].outputs[0].token_ids for i in range(2)] == expected
    assert 1 <= steps <= 12  # each step() returns at least one output
    assert llm.get_stats().num_steps - before in (6, 7)  # ran on the LLM's engine: not a second
    assert engine.step() == []


def test_llm_engine_abort_and_bad_requests(llm: LLM) -> None:
    engine = llm.llm_engine
    engine.add_request("long", "Once upon a time", SamplingParams(max_tokens=200, ignore_eos=True))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("long", "again", GREEDY)
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("empty", {"prompt_token_ids": []}, GREEDY)
    engine.abort_request("long")
    outputs = engine.step()
    assert [(o.request_id, o.outputs[0].finish_reason) for o in outputs] == [("long", "abort")]
    assert not engine.has_unfinished_requests()


# ---- beam search ------------------------------------------------------------------------------


def test_beam_search_matches_transformers(llm: LLM, tiny_checkpoints) -> None:
    """Without EOS every beam has the same length, so Hugging Face's ranking is vLLM's."""
    from transformers import AutoModelForCausalLM

    prompt = llm.get_tokenizer()("The capital of France is").input_ids
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], dtype=torch.float32)
    reference = model.generate(
        torch.tensor([prompt]),
        num_beams=3,
        num_return_sequences=3,
        max_new_tokens=5,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
        output_scores=True,
        return_dict_in_generate=True,
    )
    params = BeamSearchParams(beam_width=3, max_tokens=5, ignore_eos=True)
    [result] = llm.beam_search([{"prompt_token_ids": prompt}], params)
    assert [s.tokens[len(prompt) :] for s in result.sequences] == [
        seq[len(prompt) :] for seq in reference.sequences.tolist()
    ]
    for sequence, score in zip(result.sequences, reference.sequences_scores.tolist()):
        assert sequence.cum_logprob / 5 == pytest.approx(score, abs=1e-4)
        assert len(sequence.logprobs) == 5 and sequence.finish_reason == "length"
        assert sequence.text == llm.get_tokenizer().decode(sequence.tokens)
    with pytest.raises(ValueError, match="beam_width"):
        BeamSearchParams(beam_width=0, max_tokens=5)


# ---- collective_rpc, profiler, metrics ---------------------------------------------------------


def test_collective_rpc_calls_worker_methods_by_name(llm: LLM) -> None:
    [info] = llm.collective_rpc("device_info")
    assert info["rank"] == 0 and info["device"] == "cpu" and info["dtype"] == "float32"
    assert info["num_kv_blocks"] == llm.get_vllm_config().cache_config.num_gpu_blocks
    assert llm.collective_rpc("ping", timeout=10) == [info["pid"]]
    with pytest.raises(TypeError, match="no pickle"):
        llm.collective_rpc("ping", args=(object(),))
    with pytest.raises(ValueError, match="init_kv_cache"):
        llm.collective_rpc("init_kv_cache", args=(1,))
    assert _tokens(llm.generate(["Hi"], GREEDY, use_tqdm=False))  # the engine is unharmed


def test_profiler_writes_a_trace(llm: LLM, profiler_dir: Path) -> None:
    llm.start_profile()
    with pytest.raises(RuntimeError, match="already running"):
        llm.start_profile()
    llm.generate(["Profile me"], GREEDY, use_tqdm=False)
    llm.stop_profile()
    [trace] = list(profiler_dir.glob("*.trace.json"))
    names = {event.get("name") for event in json.loads(trace.read_text())["traceEvents"]}
    assert "aten::mm" in names or "aten::addmm" in names


def test_get_metrics_reads_the_engine_stats(llm: LLM) -> None:
    llm.generate(["The same prompt, twice over: " * 3] * 2, GREEDY, use_tqdm=False)
    metrics = {m.name: m for m in llm.get_metrics()}
    stats = llm.get_stats()
    assert isinstance(metrics["vllm:num_requests_running"], Gauge)
    assert metrics["vllm:num_requests_running"].value == 0
    assert isinstance(metrics["vllm:prefix_cache_hits"], Counter)
    assert metrics["vllm:prefix_cache_hits"].value == stats.prefix_cache_hits > 0
    assert metrics["zllm:engine_steps"].value == stats.num_steps
    assert metrics["vllm:kv_cache_usage_perc"].labels["model_name"] == llm.get_model_config().model


# ---- config views ------------------------------------------------------------------------------


def test_model_config_has_vllm_attributes(llm: LLM, tiny_checkpoints) -> None:
    config = llm.get_model_config()
    assert isinstance(config, ModelConfig)
    assert config.model == tiny_checkpoints["llama"] and config.max_model_len == 1024
    assert config.dtype is torch.float32 and config.get_vocab_size() == config.vocab_size
    assert type(config.hf_config).__name__ == "LlamaConfig"
    assert config.hf_config.hidden_size == config.get_hidden_size() == 64
    assert config.max_logprobs == 20 and config.architectures == ["LlamaForCausalLM"]
    assert config.eos_token_ids == [2]  # the engine's own fields read through
    vllm_config = llm.get_vllm_config()
    assert isinstance(vllm_config, VllmConfig) and vllm_config.model_config is config
    assert vllm_config.cache_config.block_size == 16
    assert vllm_config.scheduler_config.max_model_len == 1024


def _config_view(path: str, **engine_args) -> ModelConfig:
    return ModelConfig(
        protocol_config.ModelConfig.from_path(path), EngineArgs(model=path, **engine_args), path
    )


def test_default_sampling_params_follow_generation_config(tmp_path, tiny_checkpoints) -> None:
    import shutil

    model = Path(shutil.copytree(tiny_checkpoints["llama"], tmp_path / "model"))
    recommended = {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "max_new_tokens": 64}
    (model / "generation_config.json").write_text(json.dumps(recommended))
    other = tmp_path / "other"
    other.mkdir()
    (other / "generation_config.json").write_text(json.dumps({"repetition_penalty": 1.2}))

    assert _config_view(str(model)).get_diff_sampling_param() == {
        "temperature": 0.6,
        "top_p": 0.9,
        "top_k": 20,
        "max_tokens": 64,
    }
    assert _config_view(str(model), generation_config="vllm").get_diff_sampling_param() == {}
    assert _config_view(str(model), generation_config=str(other)).get_diff_sampling_param() == {
        "repetition_penalty": 1.2
    }
    overridden = _config_view(str(model), override_generation_config={"temperature": 0.1})
    assert overridden.get_diff_sampling_param()["temperature"] == 0.1


def test_get_default_sampling_params(llm: LLM) -> None:
    # the tiny checkpoint's generation_config.json recommends nothing: vLLM's defaults
    assert llm.get_default_sampling_params() == SamplingParams()


# ---- chat --------------------------------------------------------------------------------------

TEMPLATE = (
    "{% for t in tools or [] %}TOOL {{ t.function.name }}\n{% endfor %}"
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}"
    "{% if not (continue_final_message and loop.last) %}</{{ m.role }}>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]


def test_chat_template_options(llm: LLM) -> None:
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, I"}]
    params = SamplingParams(max_tokens=2, temperature=0)
    [closed] = llm.chat(messages, params, chat_template=TEMPLATE, use_tqdm=False)
    assert closed.prompt == "<user>Hi</user><assistant>Hello, I</assistant><assistant>"
    [continued] = llm.chat(
        messages,
        params,
        chat_template=TEMPLATE,
        add_generation_prompt=False,
        continue_final_message=True,
        tools=TOOLS,
        use_tqdm=False,
    )
    assert continued.prompt == "TOOL get_weather\n<user>Hi</user><assistant>Hello, I"
    assert continued.prompt_token_ids == llm.get_tokenizer().encode(
        continued.prompt, add_special_tokens=False
    )
    with pytest.raises(ValueError, match="add_generation_prompt"):
        llm.chat(messages, params, continue_final_message=True)


# ---- SamplingParams fields resolved by the frontend and the sampler ---------------------------


def test_bad_words_allowed_token_ids_and_truncation(llm: LLM) -> None:
    tokenizer = llm.get_tokenizer()
    prompt = "The capital of France is"
    params = GREEDY.clone(max_tokens=16)
    [free] = llm.generate([prompt], params, use_tqdm=False)

    def one_token_word(token: int) -> bool:  # bare and spaced forms are one token each
        word = tokenizer.decode([token]).strip()
        return bool(word) and len(tokenizer.encode(word, add_special_tokens=False)) == 1

    token = next(t for t in free.outputs[0].token_ids if one_token_word(t))
    word = tokenizer.decode([token]).strip()
    [banned] = llm.generate([prompt], params.clone(bad_words=[word]), use_tqdm=False)
    assert token not in banned.outputs[0].token_ids
    assert banned.outputs[0].token_ids != free.outputs[0].token_ids

    allowed = [100, 200, 300]
    [only] = llm.generate([prompt], GREEDY.clone(allowed_token_ids=allowed), use_tqdm=False)
    assert set(only.outputs[0].token_ids) <= set(allowed)
    with pytest.raises(ValueError, match="allowed_token_ids"):
        llm.generate([prompt], GREEDY.clone(allowed_token_ids=[10**9]), use_tqdm=False)

    ids = tokenizer(prompt).input_ids
    [cut] = llm.generate([prompt], GREEDY.clone(truncate_prompt_tokens=3), use_tqdm=False)
    [same] = llm.generate([{"prompt_token_ids": ids[-3:]}], GREEDY, use_tqdm=False)
    assert (
        cut.prompt_token_ids == ids[-3:] and cut.outputs[0].token_ids == same.outputs[0].token_ids
    )


def test_new_sampling_fields_are_validated() -> None:
    for field, value in [
        ("truncate_prompt_tokens", 0),
        ("bad_words", [""]),
        ("allowed_token_ids", []),
        ("allowed_token_ids", [-1]),
    ]:
        with pytest.raises(ValueError, match=field):
            SamplingParams(**{field: value})
    assert SamplingParams.from_optional(temperature=None, max_tokens=None, n=None) == (
        SamplingParams(max_tokens=None)
    )
    assert SamplingParams.from_optional(logit_bias={"7": 500}).logit_bias == {7: 100.0}


def test_bad_word_token_sequences(llm: LLM) -> None:
    from zllm.frontend.sampling_inputs import bad_words_token_ids

    tokenizer = llm.get_tokenizer()
    sequences = bad_words_token_ids(["Paris"], tokenizer)
    assert tokenizer.encode("Paris", add_special_tokens=False) in sequences
    assert tokenizer.encode(" Paris", add_special_tokens=False) in sequences


# ---- AsyncLLM --------------------------------------------------------------------------------


def test_async_llm_vllm_config_log_stats_and_rpc(async_llm: AsyncLLM, caplog) -> None:
    async def run():
        config = await async_llm.get_vllm_config()
        with caplog.at_level(logging.INFO, logger="zllm"):
            await async_llm.do_log_stats()
        ranks = await async_llm.collective_rpc("device_info")
        with pytest.raises(NotImplementedError, match="lora_request"):
            async for _ in async_llm.generate("Hi", GREEDY, lora_request=object()):
                pass
        return config, ranks

    config, ranks = asyncio.run(run())
    assert config.parallel_config.tensor_parallel_size == 1 and len(ranks) == 1
    assert config.model_config.get_vocab_size() == config.model_config.vocab_size
    assert any("KV cache usage" in r.getMessage() for r in caplog.records)


# ---- process-side helpers --------------------------------------------------------------------


def test_seed_everything_seeds_random_numpy_and_torch() -> None:
    import random

    import numpy

    draws = []
    for _ in range(2):
        seed_everything(7)
        draws.append((random.random(), numpy.random.rand(), torch.rand(1).item()))
    assert draws[0] == draws[1]


def test_blocking_calls_are_refused_only_on_the_io_thread(llm: LLM) -> None:
    errors = []

    def on_io_thread() -> None:
        try:
            check_blocking_call("LLM.generate", threading.current_thread())
        except RuntimeError as e:
            errors.append(str(e))

    thread = threading.Thread(target=on_io_thread)
    thread.start()
    thread.join()
    assert "I/O thread" in errors[0]
    check_blocking_call("LLM.generate", llm.client.io_thread)  # any other thread: fine


def test_engine_args_normalise_vllm_spellings() -> None:
    assert EngineArgs(dtype=torch.float16).dtype == "float16"
    assert EngineArgs(dtype="half").dtype == "float16"
    assert EngineArgs(compilation_config={"level": 0}).compilation_config == {"level": 0}
    assert EngineArgs(task="generate", runner="generate", swap_space=0).swap_space == 0
    with pytest.raises(ValueError, match="swap_space"):
        EngineArgs(swap_space=-1)
    with pytest.raises(ValueError, match="dtype"):
        EngineArgs(dtype="float8")
    assert EngineArgs(enforce_eager=True).enforce_eager
    assert not EngineArgs().enforce_eager  # vLLM's default: CUDA graphs where there are some
    sizes = {"cudagraph_capture_sizes": [1, 2, 4]}
    assert EngineArgs(compilation_config=sizes).compilation_config == sizes
    with pytest.raises(NotImplementedError, match="compilation_config"):
        EngineArgs(compilation_config={"level": 3})
    args = EngineArgs(revision="v2", enable_sleep_mode=True)
    assert msgspec.json.decode(msgspec.json.encode(args), type=EngineArgs) == args


def test_profiler_refuses_without_its_directory() -> None:
    from zllm.worker.profiler import WorkerProfiler

    assert "ZLLM_TORCH_PROFILER_DIR" not in os.environ
    with pytest.raises(RuntimeError, match="ZLLM_TORCH_PROFILER_DIR"):
        WorkerProfiler(0, torch.device("cpu")).start()
