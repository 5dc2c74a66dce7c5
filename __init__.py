"""zllm: a multi-process LLM inference engine with vLLM's API.

from zllm import AsyncLLM, LLM, AsyncEngineArgs, EngineArgs, SamplingParams, RequestOutputKind
"""

from zllm.frontend.async_llm import AsyncLLM
from zllm.frontend.errors import EngineDeadError, EngineStartupError
from zllm.frontend.llm import LLM
from zllm.frontend.llm_engine import LLMEngine
from zllm.frontend.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from zllm.frontend.prompts import PromptType, TextPrompt, TokensPrompt
from zllm.protocol.config import AsyncEngineArgs, EngineArgs, ModelConfig
from zllm.protocol.sampling_params import RequestOutputKind, SamplingParams

__version__ = "0.1.0"

__all__ = [
    "AsyncEngineArgs",
    "AsyncLLM",
    "CompletionOutput",
    "EngineArgs",
    "EngineDeadError",
    "EngineStartupError",
    "LLM",
    "LLMEngine",
    "Logprob",
    "ModelConfig",
    "PromptType",
    "RequestMetrics",
    "RequestOutput",
    "RequestOutputKind",
    "SamplingParams",
    "TextPrompt",
    "TokensPrompt",
]
