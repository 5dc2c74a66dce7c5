"""`vllm.utils` -> `zllm.utils` (docs/vllm-compat.md)."""

from zllm.frontend.argparse_utils import FlexibleArgumentParser

__all__ = ["FlexibleArgumentParser"]
