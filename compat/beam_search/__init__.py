"""`vllm.beam_search` -> `zllm.beam_search`: what `LLM.beam_search` returns."""

from zllm.frontend.beam_search import BeamSearchOutput, BeamSearchSequence

__all__ = ["BeamSearchOutput", "BeamSearchSequence"]
