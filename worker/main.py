"""Worker process entry point: `python -m zllm.worker.main` (started by engine-core).

Subscribes to the core's step broadcast, connects a DEALER to the core's worker socket for
its answers, loads the model, reports how many KV blocks fit, then serves `ExecuteModel` and
`WorkerCall` frames until told to stop or the core goes away. Any failure is reported as
`WorkerFailed` with the real traceback.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback

import msgspec
import zmq

from zllm.protocol.config import EngineArgs, ModelConfig
from zllm.protocol.process import die_with_parent, freeze_startup_heap, remove_at_exit
from zllm.protocol.worker_messages import (
    ExecuteModel,
    WorkerFailed,
    WorkerHello,
    WorkerReply,
    decode_for_worker,
    encode,
)

logger = logging.getLogger("zllm.worker")


def serve_steps(worker, steps: zmq.Socket, sock: zmq.Socket, rank: int) -> None:
    """Run steps and calls until told to stop.

    A step is launched, then its output waits on the device while the next message is read:
    when engine-core already sent step N+1 (it schedules ahead), N+1 is prepared and launched
    before N's output goes back, so the device never waits for the host between steps.
    """
    pending = None  # a launched step whose output is not sent yet

    def finish() -> None:
        nonlocal pending
        output = worker.finish_step(pending)
        pending = None
        if rank == 0:
            sock.send(encode(output))

    while True:
        if pending is not None and not _message_before(steps, pending):
            finish()  # it ended before the next message came: nothing to overlap
            continue
        message = decode_for_worker(steps.recv())
        if isinstance(message, ExecuteModel):
            if pending is not None and worker.must_finish_first(message, pending):
                finish()
            launched = worker.launch_step(message)
            if pending is not None:
                finish()
            pending = launched
            continue
        if pending is not None:
            finish()
        if message.method == "shutdown":
            worker.shutdown()
            sock.send(encode(WorkerReply(rank=rank, call_id=message.call_id)))
            return
        try:
            result = worker.call(message.method, message.args, message.kwargs)
            reply = WorkerReply(rank=rank, call_id=message.call_id, result=result)
        except Exception as e:  # a failed call is an answer, not a crash
            reply = WorkerReply(
                rank=rank, call_id=message.call_id, error=f"{type(e).__name__}: {e}"
            )
        sock.send(encode(reply))


def _message_before(steps: zmq.Socket, pending) -> bool:
    """Spin until a message waits (True) or the pending step's device work ended (False)."""
    while not steps.poll(0):
        if pending.done():
            return bool(steps.poll(0))
    return True


def run_worker(
    address: str,
    broadcast_address: str,
    rank: int,
    world_size: int,
    dist_init_method: str | None,
    config_json: bytes,
) -> None:
    engine_args, model_config = msgspec.json.decode(
        config_json, type=tuple[EngineArgs, ModelConfig]
    )
    ctx = zmq.Context()
    steps = ctx.socket(zmq.SUB)
    steps.setsockopt(zmq.LINGER, 0)
    steps.setsockopt(zmq.RCVHWM, 0)  # never drop a step
    steps.setsockopt(zmq.SUBSCRIBE, b"")
    steps.connect(broadcast_address)
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, rank.to_bytes(2, "little"))
    sock.setsockopt(zmq.LINGER, 2000)
    # The default high-water mark stays: a DEALER blocks at it (never drops), and engine-core
    # reads each step's output and each reply (at most the steps in flight wait unread).
    sock.connect(address)
    try:
        from zllm.worker.worker import Worker

        worker = Worker(engine_args, model_config, rank, world_size, dist_init_method)
        hello = WorkerHello(rank=rank, pid=os.getpid(), num_kv_blocks=worker.available_kv_blocks())
        sock.send(encode(hello))
        freeze_startup_heap()  # the model is loaded: what is alive now stays for good
        serve_steps(worker, steps, sock, rank)
    except BaseException as e:
        if not isinstance(e, KeyboardInterrupt | SystemExit):
            detail = "".join(traceback.format_exception(e))
            logger.error("worker rank %d failed:\n%s", rank, detail)
            sock.send(encode(WorkerFailed(rank=rank, error=f"{type(e).__name__}: {e}\n{detail}")))
        raise
    finally:
        steps.close()
        sock.close()
        ctx.term()


def main() -> None:
    logging.basicConfig(
        level=os.environ.get("ZLLM_LOG_LEVEL", "INFO"),
        format="%(asctime)s worker %(levelname)s %(message)s",
    )
    address, broadcast_address, rank, world_size, dist_init = (
        sys.argv[1],
        sys.argv[2],
        int(sys.argv[3]),
        int(sys.argv[4]),
        sys.argv[5],
    )
    die_with_parent()
    # engine-core's private sockets: gone with whichever of us is last
    remove_at_exit(address)
    remove_at_exit(broadcast_address)
    config_json = sys.stdin.buffer.read()
    try:
        run_worker(address, broadcast_address, rank, world_size, dist_init or None, config_json)
    except Exception:
        sys.exit(1)


if __name__ == "__main__":
    main()
