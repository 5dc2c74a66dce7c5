"""A hostile client in its own process: `python flood.py INPUT OUTPUT N` sends N requests that
engine-core must refuse (token ids outside the vocabulary) as fast as it can, reads every
answer, and prints one JSON line: how many it sent and how many were answered."""

from __future__ import annotations

import json
import sys
import time

from raw_client import RawClient

from zllm.protocol import messages as m
from zllm.protocol.sampling_params import SamplingParams


def main() -> None:
    input_address, output_address, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    client = RawClient(input_address, output_address)
    params = SamplingParams(max_tokens=4)
    frames = [
        m.encode(
            m.AddRequest(request_id=f"f{i}", prompt_token_ids=[10**6] * 64, sampling_params=params)
        )
        for i in range(n)
    ]
    print(json.dumps({"ready": True}), flush=True)
    start = time.monotonic()
    answered = 0
    for frame in frames:
        client.send(frame)
        while client.from_core.poll(0):
            client.from_core.recv()
            answered += 1
    deadline = time.monotonic() + 60
    while answered < n and time.monotonic() < deadline:
        if client.from_core.poll(100):
            client.from_core.recv()
            answered += 1
    took = time.monotonic() - start
    client.close()
    print(json.dumps({"ok": True, "sent": n, "answered": answered, "seconds": took}), flush=True)


if __name__ == "__main__":
    main()
