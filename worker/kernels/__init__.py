"""Triton kernels for the GPU fast path (one file per kernel family).

Importing any module here needs `triton`. The torch implementations in `worker/layers/`
stay the CPU default and the tests' oracle; CI runs these kernels through Triton's
interpreter (`TRITON_INTERPRET=1`) on CPU tensors.
"""
