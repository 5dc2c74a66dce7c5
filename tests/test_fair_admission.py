"""Clients take turns at admission: a client that queues many requests cannot starve one that
queues a few (a real scheduler and KV cache, a fake model: `test_scheduler.py`'s helpers)."""

from __future__ import annotations

from test_scheduler import make_request, make_scheduler, run_step

from zllm.core.fair_admission import ClientRoundRobin
from zllm.core.request import Request


def _request(client: bytes, i: int, max_tokens: int = 4) -> Request:
    request = make_request(f"{client.decode()}{i}", num_prompt=4, max_tokens=max_tokens)
    request.client = client
    return request


def test_one_client_is_served_in_arrival_order() -> None:
    waiting = [_request(b"a", i) for i in range(5)]
    assert ClientRoundRobin().order(waiting) == waiting


def test_clients_take_turns_and_the_least_recently_served_goes_first() -> None:
    order = ClientRoundRobin()
    a = [_request(b"a", i) for i in range(4)]
    b = [_request(b"b", i) for i in range(2)]
    c = [_request(b"c", 0)]
    assert order.order(a + b + c) == [a[0], b[0], c[0], a[1], b[1], a[2], a[3]]
    order.admitted(a[0])  # a was served: among first turns now, b and c go before a
    assert order.order(a[1:] + b + c)[:3] == [b[0], c[0], a[1]]


def test_a_flooding_client_does_not_starve_another() -> None:
    """Client a queues 40 requests, then b queues 2; one slot frees at a time. FCFS would run
    every one of a's first; here b's requests are admitted at the next free slots."""
    sched = make_scheduler(num_blocks=256, max_num_seqs=2, max_num_batched_tokens=64)
    for i in range(40):
        sched.add(_request(b"a", i, max_tokens=3))
    first, _ = run_step(sched)  # a0 and a1 run
    for i in range(2):
        sched.add(_request(b"b", i, max_tokens=3))
    admitted: list[str] = []
    for _ in range(200):
        if not sched.has_work():
            break
        step, _ = run_step(sched)
        seen = {r.key for r in first.requests}.union(admitted)
        admitted += [r.key for r in step.requests if r.key not in seen]
    assert admitted.index("b0") <= 1 and admitted.index("b1") <= 3, admitted[:6]
    assert [k for k in admitted if k.startswith("a")] == [f"a{i}" for i in range(2, 40)]


def test_preempted_requests_keep_their_place_at_the_front() -> None:
    order = ClientRoundRobin()
    a, b = _request(b"a", 0), _request(b"b", 0)
    sched = make_scheduler()
    sched.add(a)
    run_step(sched)
    sched.preempt(a)
    sched.add(b)
    order.admitted(a)
    assert order.order(sched.waiting) == [a, b]
