"""`vllm.utils.argparse_utils` (vLLM's newer home of the parser) -> `zllm.utils.argparse_utils`."""

from zllm.frontend.argparse_utils import FlexibleArgumentParser

__all__ = ["FlexibleArgumentParser"]
