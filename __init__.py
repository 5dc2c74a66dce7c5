"""zllm: a multi-process LLM inference engine with vLLM's API.

from zllm import AsyncLLM, LLM, AsyncEngineArgs, EngineArgs, SamplingParams, RequestOutputKind
from zllm import PoolingParams  # LLM.embed / LLM.encode / AsyncLLM.encode
"""

from zllm.frontend.async_llm import AsyncLLM
from zllm.frontend.errors import EngineDeadError, EngineStartupError
from zllm.frontend.llm import LLM
from zllm.frontend.llm_engine import LLMEngine
from zllm.frontend.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from zllm.frontend.pooling_outputs import (
    EmbeddingOutput,
    EmbeddingRequestOutput,
    PoolingOutput,
    PoolingRequestOutput,
)
from zllm.frontend.prompts import PromptType, TextPrompt, TokensPrompt
from zllm.protocol.config import AsyncEngineArgs, EngineArgs, ModelConfig
from zllm.protocol.pooling_params import PoolingParams
from zllm.protocol.sampling_params import RequestOutputKind, SamplingParams

__version__ = "0.1.0"

__all__ = [
    "AsyncEngineArgs",
    "AsyncLLM",
    "CompletionOutput",
    "EmbeddingOutput",
    "EmbeddingRequestOutput",
    "EngineArgs",
    "EngineDeadError",
    "EngineStartupError",
    "LLM",
    "LLMEngine",
    "Logprob",
    "ModelConfig",
    "PoolingOutput",
    "PoolingParams",
    "PoolingRequestOutput",
    "PromptType",
    "RequestMetrics",
    "RequestOutput",
    "RequestOutputKind",
    "SamplingParams",
    "TextPrompt",
    "TokensPrompt",
]
