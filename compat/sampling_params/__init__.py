"""`vllm.sampling_params` -> `zllm.sampling_params` (docs/vllm-compat.md)."""

from zllm.frontend.beam_search import BeamSearchParams
from zllm.protocol.sampling_params import RequestOutputKind, SamplingParams

__all__ = ["BeamSearchParams", "RequestOutputKind", "SamplingParams"]
