"""The worker's pooler on its own: every pooling type over a step that mixes whole prompts,
a prompt's first chunk and a prompt's last chunk, against the vectors computed directly.

One batched op per step must give each request exactly what pooling it alone would give,
including prompts split over steps, `dimensions` and per-request `normalize`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from zllm.protocol.pooler_config import PoolerConfig
from zllm.protocol.pooling_params import PoolingParams
from zllm.worker.pooler import Pooler, PoolingChunks

DIM = 8


def reference(pooling_type: str, rows: torch.Tensor, params: PoolingParams) -> torch.Tensor:
    """One prompt's vector from all its rows [n, DIM]."""
    vector = {"MEAN": rows.mean(0), "CLS": rows[0], "LAST": rows[-1]}[pooling_type]
    vector = vector[: params.dimensions]
    return F.normalize(vector, dim=-1) if params.normalize else vector


def chunks(parts: list[tuple[int, int, int, bool]]) -> tuple[PoolingChunks, int]:
    """(slot, start, n, last) per request, laid out one after the other in the batch."""
    first_rows = np.cumsum([0] + [n for _, _, n, _ in parts])
    return (
        PoolingChunks(
            slots=np.array([slot for slot, _, _, _ in parts]),
            first_row=first_rows[:-1],
            n=np.array([n for _, _, n, _ in parts]),
            start=np.array([start for _, start, _, _ in parts]),
            last=np.array([last for _, _, _, last in parts]),
        ),
        int(first_rows[-1]),
    )


@pytest.mark.parametrize("pooling_type", ["MEAN", "CLS", "LAST"])
def test_one_batched_step_pools_each_request_as_if_alone(pooling_type: str) -> None:
    torch.manual_seed(0)
    pooler = Pooler(PoolerConfig(pooling_type=pooling_type, normalize=True), torch.device("cpu"))
    params = {
        0: PoolingParams(normalize=True),
        1: PoolingParams(normalize=False),
        2: PoolingParams(normalize=True, dimensions=3),  # split over both steps
        3: PoolingParams(normalize=False, dimensions=5),
        4: PoolingParams(normalize=True),  # split, ends with a one-row chunk
    }
    lengths = {0: 5, 1: 3, 2: 7, 3: 4, 4: 3}
    prompts = {slot: torch.randn(n, DIM) for slot, n in lengths.items()}
    for slot, p in params.items():
        pooler.add(slot, p, lengths[slot])

    # Step 1: 0 and 1 whole, the first 4 rows of 2, the first 2 of 4.
    step1, total1 = chunks([(0, 0, 5, True), (2, 0, 4, False), (1, 0, 3, True), (4, 0, 2, False)])
    hidden1 = torch.cat([prompts[0], prompts[2][:4], prompts[1], prompts[4][:2]])
    assert hidden1.shape[0] == total1
    out = pooler.pool(hidden1, step1)
    assert sorted(out) == [0, 1]

    # Step 2 (another request's rows first, so the chunks are not the whole batch): 3 whole,
    # the rest of 2 and of 4.
    step2, total2 = chunks([(3, 0, 4, True), (2, 4, 3, True), (4, 2, 1, True)])
    noise = torch.randn(2, DIM)
    step2.first_row = step2.first_row + 2
    hidden2 = torch.cat([noise, prompts[3], prompts[2][4:], prompts[4][2:]])
    out |= pooler.pool(hidden2, step2)
    assert sorted(out) == [0, 1, 2, 3, 4] and not pooler.requests

    for slot, p in params.items():
        got = torch.frombuffer(bytearray(out[slot]), dtype=torch.float32)
        want = reference(pooling_type, prompts[slot], p)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_a_prompt_that_starts_over_forgets_its_earlier_chunks() -> None:
    """A preempted prompt recomputes from position 0: what it pooled before is dropped."""
    pooler = Pooler(PoolerConfig(pooling_type="MEAN", normalize=False), torch.device("cpu"))
    pooler.add(0, PoolingParams(normalize=False), 4)
    first, _ = chunks([(0, 0, 2, False)])
    pooler.pool(torch.full((2, DIM), 100.0), first)
    again, _ = chunks([(0, 0, 4, True)])
    rows = torch.randn(4, DIM)
    got = torch.frombuffer(bytearray(pooler.pool(rows, again)[0]), dtype=torch.float32)
    torch.testing.assert_close(got, rows.mean(0), rtol=1e-6, atol=1e-6)
