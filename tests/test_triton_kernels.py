"""The Triton kernels equal the torch path, through Triton's interpreter on the CPU
(`TRITON_INTERPRET=1`, tiny shapes) or natively on a GPU.

Outputs and caches start as NaN, so an element a kernel forgets to write fails the test.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":  # before triton is imported: its own @jit helpers read it then
    os.environ["TRITON_INTERPRET"] = "1"

from kernel_cases import Case, random_case, run_case  # noqa: E402

from zllm.worker.layers.rotary import RotaryEmbedding  # noqa: E402

TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}
SMALL_BLOCKS = dict(block_m=16, block_n=16)  # several tiles and key blocks at tiny sizes


def check(result: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    tol = TOL[dtype]
    out, expected = result["out"], result["expected"]
    assert not out.isnan().any(), "attention left rows unwritten"
    torch.testing.assert_close(out, expected, atol=tol, rtol=tol)
    cache, expected_cache = result["cache"], result["expected_cache"]
    written = result["written"]
    # Every slot of every context holds its K/V; nothing outside them was touched.
    assert torch.equal(~cache.isnan(), written)
    torch.testing.assert_close(cache[written], expected_cache[written], atol=tol, rtol=tol)


# (query heads, KV heads): GQA ratios 1, 4, 7, 8.
GQA = [(4, 4), (8, 2), (7, 1), (16, 2)]


@pytest.mark.parametrize(
    "heads,head_dim,dtype",
    [
        (GQA[0], 64, torch.float32),
        (GQA[1], 128, torch.bfloat16),
        (GQA[2], 64, torch.float16),
        (GQA[3], 128, torch.float32),
        (GQA[0], 128, torch.bfloat16),
        (GQA[1], 64, torch.float32),
        (GQA[2], 128, torch.bfloat16),
        (GQA[3], 64, torch.float16),
    ],
)
def test_mixed_batch(heads, head_dim, dtype):
    """Decodes, fresh prompts, prefix hits and chunked-prefill chunks in one step."""
    seed = heads[0] * 1000 + head_dim
    case = random_case(seed, *heads, head_dim, dtype, kinds="dpxcdd")
    check(run_case(case, DEVICE, **SMALL_BLOCKS), dtype)


@pytest.mark.parametrize("seed", range(3))
def test_split_decode(seed):
    """Long contexts split across programs and merged; some splits of short ones are empty."""
    case = random_case(seed, 8, 2, 64, torch.float32, kinds="dddd", max_len=150)
    result = run_case(case, DEVICE, split_min_tokens=16, target_programs=1024, **SMALL_BLOCKS)
    assert result["num_splits"] > 1
    check(result, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_single_split_decode_writes_directly(dtype):
    """Enough decodes to fill the device: one split each, written without a merge."""
    case = random_case(11, 8, 2, 64, dtype, kinds="ddddd", max_len=150)
    result = run_case(case, DEVICE, target_programs=1, **SMALL_BLOCKS)
    assert result["num_splits"] == 1
    check(result, dtype)


@pytest.mark.parametrize("block_size", [1, 8, 32])
def test_page_sizes(block_size):
    case = random_case(7, 4, 2, 64, torch.bfloat16, kinds="pxd", block_size=block_size)
    check(run_case(case, DEVICE, **SMALL_BLOCKS), torch.bfloat16)


def test_default_blocks_and_single_kinds():
    """The GPU block shapes (64 x 64), and steps of only one kind (the other launches empty)."""
    for kinds in ("p", "d", "x"):
        case = random_case(3, 8, 2, 128, torch.bfloat16, kinds=kinds * 2, max_len=100)
        check(run_case(case, DEVICE), torch.bfloat16)


def test_one_token_prompt_and_exact_block_edges():
    case = Case([(0, 1), (0, 16), (16, 16), (31, 1)], 4, 2, 64, torch.float32)
    check(run_case(case, DEVICE, **SMALL_BLOCKS), torch.float32)


# ---- fused layers --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("size", [64, 96])
def test_rms_norm(dtype, size):
    from zllm.worker.kernels.rms_norm import rms_norm
    from zllm.worker.layers.norm import RMSNorm

    g = torch.Generator().manual_seed(size)
    norm = RMSNorm(size, 1e-6).to(dtype)
    norm.weight.data = torch.randn(size, generator=g).to(dtype)
    x = torch.randn(5, size, generator=g).to(dtype)
    residual = torch.randn(5, size, generator=g).to(dtype)
    expected_sum = x + residual
    tol = TOL[dtype]
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    torch.testing.assert_close(
        rms_norm(dev(x), dev(norm.weight), 1e-6).cpu(), norm(x), atol=tol, rtol=tol
    )
    r = dev(residual.clone())
    out = rms_norm(dev(x), dev(norm.weight), 1e-6, residual=r)
    torch.testing.assert_close(r.cpu(), expected_sum, atol=tol, rtol=tol)
    torch.testing.assert_close(out.cpu(), norm(expected_sum), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_write_rotates_q_and_k(dtype):
    """q rotated in place; rotated k and v in their slots; a padded row (-1) stores nothing;
    k and v themselves are left as they were (strided views of one qkv row, as in a layer)."""
    from zllm.worker.kernels.kv_cache import store_kv_cache

    g = torch.Generator().manual_seed(2)
    rotary = RotaryEmbedding(64, 256, 10000.0, None)
    hq, hk, d, t, page = 7, 1, 64, 5, 4
    qkv = torch.randn(t, (hq + 2 * hk) * d, generator=g).to(dtype)
    q, k, v = (x.view(t, -1, d) for x in qkv.split([hq * d, hk * d, hk * d], dim=-1))
    positions = torch.tensor([0, 9, 130, 255, 4])
    slots = torch.tensor([3, 17, 8, -1, 0], dtype=torch.int32)
    expected_q, expected_k = rotary(positions, q.float(), k.float())
    qkv_dev = qkv.to(DEVICE)
    q2, k2, v2 = (x.view(t, -1, d) for x in qkv_dev.split([hq * d, hk * d, hk * d], dim=-1))
    k_cache = torch.full((6, page, hk, d), float("nan"), dtype=dtype, device=DEVICE)
    v_cache = k_cache.clone()
    tables = (positions.to(DEVICE), rotary.cos.to(DEVICE), rotary.sin.to(DEVICE))
    store_kv_cache(q2, k2, v2, k_cache, v_cache, slots.to(DEVICE), tables)
    tol = TOL[dtype]
    torch.testing.assert_close(q2.cpu().float(), expected_q, atol=tol, rtol=tol)
    assert torch.equal(k2.cpu(), k) and torch.equal(v2.cpu(), v)
    flat_k, flat_v = k_cache.view(-1, hk, d).cpu(), v_cache.view(-1, hk, d).cpu()
    kept = slots >= 0
    rows = slots[kept].long()
    written = torch.zeros(len(flat_k), dtype=torch.bool)
    written[rows] = True
    assert flat_k[~written].isnan().all() and flat_v[~written].isnan().all()
    torch.testing.assert_close(flat_k[rows].float(), expected_k[kept], atol=tol, rtol=tol)
    assert torch.equal(flat_v[rows], v[kept])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul(dtype):
    from zllm.worker.kernels.activation import silu_and_mul

    x = torch.randn(3, 2 * 1100, generator=torch.Generator().manual_seed(2)).to(dtype)
    gate, up = x.chunk(2, dim=-1)
    expected = torch.nn.functional.silu(gate) * up
    tol = TOL[dtype]
    torch.testing.assert_close(silu_and_mul(x.to(DEVICE)).cpu(), expected, atol=tol, rtol=tol)


def test_argmax():
    from zllm.worker.kernels.argmax import argmax

    g = torch.Generator().manual_seed(3)
    for vocab in (1000, 4097, 9000):
        logits = torch.randn(4, vocab, generator=g)
        logits[1, 7] = logits[1, vocab - 5] = 50.0  # a tie across chunks: the first index wins
        logits[2, -1] = 60.0  # alone in the last chunk when vocab = 4097
        if vocab > 4096:
            logits[3, 4095] = logits[3, 4096] = 70.0  # a tie across a chunk's edge
        assert torch.equal(argmax(logits.to(DEVICE)).cpu(), logits.argmax(dim=-1))
    assert argmax(torch.zeros(0, 10, device=DEVICE)).shape == (0,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k,wide", [(37, 1024, False), (90, 96, True), (64, 2100, False)])
def test_gemv(dtype, n, k, wide):
    """One row times a weight in both configurations `config_for` picks (`wide`: many rows
    over a short K), K a multiple of the slice or not, N not a multiple of the rows per
    program; with and without a bias."""
    from zllm.worker.kernels.gemv import config_for, gemv

    config = config_for(9000 if wide else n, k)
    assert (config.block_k == 512) == wide
    g = torch.Generator().manual_seed(n + k)
    x = torch.randn(1, k, generator=g).to(dtype)
    weight = (torch.randn(n, k, generator=g) / k**0.5).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    tol = TOL[dtype]
    for b in (None, bias):
        expected = torch.nn.functional.linear(
            x.float(), weight.float(), None if b is None else b.float()
        )
        out = gemv(x.to(DEVICE), weight.to(DEVICE), None if b is None else b.to(DEVICE), config)
        assert out.dtype == dtype and out.shape == (1, n)
        torch.testing.assert_close(out.cpu().float(), expected, atol=tol, rtol=tol)
