"""One worker process per rank: steps and calls go out on one XPUB socket (one send reaches
every rank), answers come back on a ROUTER socket (only rank 0 answers a step; every rank
answers a call).

The XPUB sees each rank's subscription arrive, so nothing is published before every rank
listens (PUB/SUB's "slow joiner"), and no high-water mark drops a frame. While waiting, the
core polls in short slices and checks that every worker is alive, so a dead worker becomes an
error within a fraction of a second instead of a hang; a stopped or stuck one becomes an error
after `step_timeout`. A step's results that arrive while a call waits are kept for
`get_output`.
"""

from __future__ import annotations

import itertools
import logging
import socket
import subprocess
import sys
import time
from collections import deque
from typing import Any

import msgspec
import zmq

from zllm.core.executor import Executor, WorkerDiedError
from zllm.protocol.config import EngineArgs, ModelConfig
from zllm.protocol.process import (
    describe_exit,
    private_ipc_address,
    process_state,
    remove_socket_file,
    restrict_socket_file,
    spawn_env,
)
from zllm.protocol.worker_messages import (
    ExecuteModel,
    ModelOutput,
    WorkerCall,
    WorkerFailed,
    WorkerHello,
    WorkerReply,
    WorkerToCore,
    decode_for_core,
    encode,
)

logger = logging.getLogger(__name__)

POLL_MS = 100


class MultiprocExecutor(Executor):
    def __init__(self, engine_args: EngineArgs, model_config: ModelConfig) -> None:
        self.world_size = engine_args.tensor_parallel_size
        self.step_timeout = engine_args.step_timeout
        self.address, directory = private_ipc_address("workers")
        self.broadcast_address = self.address.replace("/workers-", "/steps-")
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        # It only receives, so its high-water mark never drops anything: at the default one a
        # worker's DEALER would block (not drop), and a rank has at most the outputs of the
        # steps in flight and its replies to calls unread.
        self.sock.bind(self.address)
        restrict_socket_file(self.address)
        self.pub = self.ctx.socket(zmq.XPUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.setsockopt(zmq.SNDHWM, 0)  # never drop a step
        self.pub.setsockopt(zmq.XPUB_VERBOSE, 1)  # every rank's subscription, to count them
        self.pub.bind(self.broadcast_address)
        restrict_socket_file(self.broadcast_address)
        self.outputs: deque[ModelOutput] = deque()  # results that arrived while a call waited
        self.submitted: deque[float] = deque()  # when each step in flight was sent
        self.call_ids = itertools.count()
        self.procs: list[subprocess.Popen] = []
        self._closed = False
        try:
            self._start_workers(engine_args, model_config)
        except BaseException:
            self.shutdown()
            raise

    def _start_workers(self, engine_args: EngineArgs, model_config: ModelConfig) -> None:
        dist_init = ""
        if self.world_size > 1:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                dist_init = f"tcp://127.0.0.1:{s.getsockname()[1]}"
        config_json = msgspec.json.encode((engine_args, model_config))
        for rank in range(self.world_size):
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "zllm.worker.main",
                    self.address,
                    self.broadcast_address,
                    str(rank),
                    str(self.world_size),
                    dist_init,
                ],
                stdin=subprocess.PIPE,
                env=spawn_env(),
            )
            proc.stdin.write(config_json)
            proc.stdin.close()
            self.procs.append(proc)
        hellos: dict[int, WorkerHello] = {}
        while len(hellos) < self.world_size:
            message = self._recv(None)
            if isinstance(message, WorkerHello):
                hellos[message.rank] = message
        self._await_subscribers()
        self.pids = [hellos[r].pid for r in range(self.world_size)]
        self.num_kv_blocks = min(h.num_kv_blocks for h in hellos.values())
        if self.num_kv_blocks <= 0:
            raise RuntimeError("no memory left for the KV cache after loading the model")
        self.collective_rpc("init_kv_cache", self.num_kv_blocks)

    def _await_subscribers(self) -> None:
        """Wait until every rank's subscription reached the XPUB (each rank subscribes before
        it loads its model, so this is immediate after the hellos)."""
        subscribed = 0
        deadline = time.monotonic() + self.step_timeout
        while subscribed < self.world_size:
            if self.pub.poll(POLL_MS):
                subscribed += self.pub.recv()[:1] == b"\x01"
                continue
            self.check_health()
            if time.monotonic() > deadline:
                raise WorkerDiedError(
                    f"{self.world_size - subscribed} worker(s) never subscribed to the steps"
                )

    def _recv(self, timeout_s: float | None, waiting_for: str = "") -> WorkerToCore:
        """Next message from any worker; raises if a worker died, failed or did not answer."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            if self.sock.poll(POLL_MS):
                _, frame = self.sock.recv_multipart()
                try:
                    message = decode_for_core(frame)
                except msgspec.MsgspecError as e:
                    logger.error("dropping an undecodable frame from a worker: %s", e)
                    continue
                if isinstance(message, WorkerFailed):
                    raise self._failure(message)
                return message
            self.check_health()
            if deadline is not None and time.monotonic() > deadline:
                states = ", ".join(
                    f"rank {rank} (pid {proc.pid}) is {process_state(proc.pid)}"
                    for rank, proc in enumerate(self.procs)
                )
                raise WorkerDiedError(
                    f"the workers did not answer {waiting_for} within {timeout_s:g} s "
                    f"(step_timeout): {states}"
                )

    def _failure(self, failed: WorkerFailed, grace_s: float = 0.5) -> WorkerDiedError:
        """A rank's failure may be the echo of another's death (a collective that lost its
        peer): name a rank that exited meanwhile as the cause."""
        deadline = time.monotonic() + (grace_s if self.world_size > 1 else 0.0)
        while True:
            for rank, proc in enumerate(self.procs):
                code = proc.poll()
                if code is not None and rank != failed.rank:
                    first_line = failed.error.splitlines()[0] if failed.error else ""
                    return WorkerDiedError(
                        f"worker rank {rank} {describe_exit(proc.pid, code)} "
                        f"(then rank {failed.rank} failed: {first_line})"
                    )
            if time.monotonic() >= deadline:
                return WorkerDiedError(f"worker rank {failed.rank} failed: {failed.error}")
            time.sleep(0.02)

    def _send_all(self, message: msgspec.Struct) -> None:
        self.pub.send(encode(message), copy=False)

    def submit(self, step: ExecuteModel) -> None:
        self._send_all(step)
        self.submitted.append(time.monotonic())

    def get_output(self) -> ModelOutput:
        deadline = self.submitted.popleft() + self.step_timeout
        while not self.outputs:
            message = self._recv(max(0.0, deadline - time.monotonic()), "a step")
            if isinstance(message, ModelOutput):
                return message
            logger.warning("unexpected %s while waiting for a step", type(message).__name__)
        return self.outputs.popleft()

    def collective_rpc(
        self,
        method: str,
        *args: Any,
        kwargs: dict[str, Any] | None = None,
        timeout_s: float | None = None,
    ) -> list[Any]:
        call_id = next(self.call_ids)
        self._send_all(
            WorkerCall(call_id=call_id, method=method, args=list(args), kwargs=kwargs or {})
        )
        replies: dict[int, WorkerReply] = {}
        deadline = time.monotonic() + (timeout_s or self.step_timeout)
        while len(replies) < self.world_size:
            message = self._recv(max(0.0, deadline - time.monotonic()), f"{method!r}")
            if isinstance(message, WorkerReply) and message.call_id == call_id:
                replies[message.rank] = message
            elif isinstance(message, ModelOutput):  # a step in flight: its caller takes it later
                self.outputs.append(message)
        errors = [r.error for r in replies.values() if r.error]
        if errors:
            raise RuntimeError(errors[0])
        return [replies[r].result for r in range(self.world_size)]

    def ping(self, timeout_s: float) -> None:
        self.collective_rpc("ping", timeout_s=timeout_s)

    def check_health(self) -> None:
        for rank, proc in enumerate(self.procs):
            code = proc.poll()
            if code is not None:
                raise WorkerDiedError(f"worker rank {rank} {describe_exit(proc.pid, code)}")

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        grace = 0.0  # a rank is gone: the others wait in a collective that cannot end
        if all(p.poll() is None for p in self.procs) and self.procs:
            grace = 5.0
            try:
                self._send_all(WorkerCall(call_id=next(self.call_ids), method="shutdown"))
            except zmq.ZMQError:
                pass
        deadline = time.monotonic() + grace
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.sock.close(0)
        self.pub.close(0)
        self.ctx.term()
        remove_socket_file(self.address)
        remove_socket_file(self.broadcast_address)
