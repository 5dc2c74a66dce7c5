"""`EngineRouter`: one `AsyncLLM`-like client over several engines, serving several models,
each with any number of replicas (engine-cores spawned here or daemons attached by address).

A request names its model; within the model, `ReplicaPolicy` picks the replica from the
prompt's tokens and each replica's load (requests this router has in flight on it). A replica
whose engine dies fails its in-flight requests with `EngineDeadError` naming it, and leaves the
pool; new requests go to the survivors."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from zllm.frontend.async_llm import AsyncLLM
from zllm.frontend.errors import EngineDeadError
from zllm.frontend.input_processor import PromptType
from zllm.frontend.outputs import RequestOutput
from zllm.frontend.pooling_outputs import PoolingRequestOutput
from zllm.frontend.replica_policy import ReplicaPolicy
from zllm.protocol.config import EngineArgs
from zllm.protocol.pooling_params import PoolingParams
from zllm.protocol.sampling_params import SamplingParams

logger = logging.getLogger("zllm")


@dataclass
class Replica:
    """One engine of a model, and the requests this router has in flight on it."""

    label: str  # "llama#0" or the daemon's address: what an error names
    engine: AsyncLLM
    in_flight: set[str] = field(default_factory=set)  # engine request ids

    @property
    def alive(self) -> bool:
        """False once its engine is dead for good (a spawned core exited, or shut down)."""
        return not self.engine.errored

    @property
    def connected(self) -> bool:
        """Taking requests now: False while the client reconnects to a daemon that died or
        restarted (it rejoins by itself once the daemon answers again)."""
        return self.engine.is_running


@dataclass
class ServedModel:
    """A served name and its replicas (same checkpoint, same tokenizer)."""

    name: str
    replicas: list[Replica]
    policy: ReplicaPolicy
    dead: dict[str, str] = field(default_factory=dict)  # replicas that left: label -> cause
    away: set[str] = field(default_factory=set)  # daemons reconnecting: out of the pool

    def live(self) -> list[Replica]:
        """The replicas serving now. A dead one leaves for good the first time it is seen; a
        daemon being reconnected to is skipped, and back in the pool once it answers."""
        for replica in [r for r in self.replicas if not r.alive]:
            self.replicas.remove(replica)
            self.policy.forget(replica.label)
            self.away.discard(replica.label)
            self.dead[replica.label] = str(replica.engine.dead_error)
            logger.warning("replica %s of %s died and left the pool", replica.label, self.name)
        away = {r.label for r in self.replicas if not r.connected}
        for label in away - self.away:
            logger.warning("replica %s of %s is unreachable: out of the pool", label, self.name)
        for label in self.away - away:
            logger.info("replica %s of %s is back in the pool", label, self.name)
        self.away = away
        return [r for r in self.replicas if r.label not in away]

    def require_live(self) -> list[Replica]:
        live = self.live()
        if not live:
            causes = [f"{label}: {cause}" for label, cause in self.dead.items()]
            causes += [f"{label}: reconnecting" for label in sorted(self.away)]
            raise EngineDeadError(
                f"no replica of model {self.name!r} is serving ({'; '.join(causes)})"
            )
        return live

    @property
    def engine(self) -> AsyncLLM:
        """A replica not dead for good, for what all replicas share (tokenizer, config)."""
        self.live()
        if not self.replicas:
            return self.require_live()[0].engine  # raises, naming every cause
        return self.replicas[0].engine


@dataclass
class EngineSpec:
    """How to reach one model: `replicas` engines spawned from `engine_args`, or (with
    `engine_args.engine_core_address`) one daemon attached. `name` None: the model's own
    name (the default model's, or the daemon's)."""

    name: str | None
    engine_args: EngineArgs
    replicas: int = 1

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {self.replicas}")
        if self.replicas > 1 and self.engine_args.engine_core_address is not None:
            raise ValueError(
                "replicas: a daemon attached by address is one replica; give each daemon's "
                "address as its own engine"
            )

    def replica_args(self, index: int) -> EngineArgs:
        """Replica `index` runs on its own GPUs (the next `tensor_parallel_size` of them)."""
        rank = self.engine_args.data_parallel_rank + index
        return msgspec.structs.replace(self.engine_args, data_parallel_rank=rank)


class EngineRouter:
    """Several models and replicas behind `generate()` / `encode()` with a `model` keyword.

    `EngineRouter.start(specs)` spawns or attaches every engine (specs with the same name
    are replicas of one model); `EngineRouter({name: [AsyncLLM, ...]})` wraps engines
    already started. The router owns its engines: `shutdown()` stops them."""

    def __init__(
        self,
        engines: dict[str, list[AsyncLLM]],
        policy: Callable[[], ReplicaPolicy] | None = None,
    ) -> None:
        if not engines or any(not group for group in engines.values()):
            raise ValueError("an EngineRouter needs at least one engine per model")
        self._policy = policy
        self.models: dict[str, ServedModel] = {
            name: self._served(name, group) for name, group in engines.items()
        }
        self._owner: dict[str, Replica] = {}  # engine request id -> its replica

    def _served(self, name: str, group: list[AsyncLLM]) -> ServedModel:
        replicas = [
            Replica(e.engine_args.engine_core_address or f"{name}#{i}", e)
            for i, e in enumerate(group)
        ]
        block_size = group[0].engine_args.block_size
        policy = self._policy() if self._policy else ReplicaPolicy(block_size=block_size)
        return ServedModel(name, replicas, policy)

    @staticmethod
    def start_engines(specs: list[EngineSpec]) -> dict[str, list[AsyncLLM]]:
        """Spawn or attach every spec's engines (blocking until each is ready), by name; on
        any failure the ones already started are stopped."""
        engines: dict[str, list[AsyncLLM]] = {}
        started: list[AsyncLLM] = []
        try:
            for spec in specs:
                for index in range(spec.replicas):
                    started.append(AsyncLLM(spec.replica_args(index)))
                    name = spec.name or started[-1].model_config.model
                    engines.setdefault(name, []).append(started[-1])
        except BaseException:
            for engine in started:
                engine.shutdown()
            raise
        return engines

    @classmethod
    def start(
        cls, specs: list[EngineSpec], policy: Callable[[], ReplicaPolicy] | None = None
    ) -> EngineRouter:
        return cls(cls.start_engines(specs), policy)

    def add_model(self, name: str, engines: list[AsyncLLM]) -> ServedModel:
        """Serve `name` from engines already started (at run time: a model just loaded)."""
        if name in self.models:
            raise ValueError(f"model {name!r} is already served")
        if not engines:
            raise ValueError(f"model {name!r} needs at least one engine")
        self.models[name] = self._served(name, engines)
        return self.models[name]

    async def remove_model(self, name: str, timeout: float) -> None:
        """Stop routing to `name` now, let its in-flight requests finish for `timeout`
        seconds, abort the rest, then stop its engines."""
        served = self.models.pop(name)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        in_flight = lambda: [rid for r in served.replicas for rid in r.in_flight]  # noqa: E731
        while in_flight() and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if in_flight():
            logger.warning("unloading %s: aborting %d requests", name, len(in_flight()))
            await self.abort(in_flight())
            while in_flight() and loop.time() < deadline + 5.0:
                await asyncio.sleep(0.05)
        await asyncio.to_thread(_shutdown_all, served)

    @property
    def model_names(self) -> list[str]:
        return list(self.models)

    def model(self, name: str | None) -> ServedModel:
        """A served model by name (None: the first); KeyError names what is served."""
        if name is None:
            return next(iter(self.models.values()))
        try:
            return self.models[name]
        except KeyError:
            raise KeyError(f"model {name!r} is not served (served: {self.model_names})") from None

    def _pick(self, served: ServedModel, prompt_token_ids: list[int]) -> Replica:
        by_label = {r.label: r for r in served.require_live()}
        loads = {label: len(r.in_flight) for label, r in by_label.items()}
        return by_label[served.policy.choose(prompt_token_ids, loads)]

    async def _routed(
        self, model: str | None, prepare: Callable[[AsyncLLM], Any], run
    ) -> AsyncGenerator[Any, None]:
        """Prepare the request once on the model's engines (tokens, checks: a generator, so a
        bad request fails where iterating starts), pick its replica, relay `run`'s outputs."""
        served = self.model(model)
        request = prepare(served.engine)
        replica = self._pick(served, request.prompt_token_ids)
        replica.in_flight.add(request.request_id)
        self._owner[request.request_id] = replica
        try:
            async with contextlib.aclosing(run(replica.engine, lambda: request)) as outputs:
                async for output in outputs:
                    yield output
        except EngineDeadError as e:
            served.live()  # the dead replica leaves the pool now
            raise EngineDeadError(
                f"replica {replica.label} of model {served.name!r} died: {e}"
            ) from e
        finally:
            replica.in_flight.discard(request.request_id)
            self._owner.pop(request.request_id, None)

    def generate(
        self,
        prompt: PromptType,
        sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
        *,
        model: str | None = None,
        priority: int = 0,
    ) -> AsyncGenerator[RequestOutput, None]:
        """`AsyncLLM.generate` on a replica of `model` (None: the first model)."""
        return self._routed(
            model,
            lambda engine: engine._prepare(prompt, sampling_params, request_id, priority),
            AsyncLLM._generation,
        )

    def encode(
        self,
        prompt: PromptType,
        pooling_params: PoolingParams | None = None,
        request_id: str | None = None,
        *,
        model: str | None = None,
        priority: int = 0,
    ) -> AsyncGenerator[PoolingRequestOutput, None]:
        """`AsyncLLM.encode` on a replica of `model` (None: the first model)."""
        return self._routed(
            model,
            lambda engine: engine._prepare_pooling(
                prompt, pooling_params, request_id, None, priority
            ),
            AsyncLLM._pooling,
        )

    async def abort(self, request_id: str | list[str]) -> None:
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        for rid in ids:
            replica = self._owner.get(rid)
            if replica is not None and replica.alive:
                await replica.engine.abort(rid)

    def health(self) -> dict[str, dict[str, Any]]:
        """Per model: serving, reconnecting and dead replicas (a model is healthy while one
        replica serves)."""
        return {
            name: {
                "healthy": bool(live := served.live()),
                "replicas": [r.label for r in live],
                "reconnecting": sorted(served.away),
                "dead": list(served.dead),
            }
            for name, served in self.models.items()
        }

    async def check_health(self, model: str | None = None) -> None:
        """Raise `EngineDeadError` unless every named model (None: all) has a live replica
        that answers."""
        names = self.model_names if model is None else [self.model(model).name]
        for name in names:
            live = self.models[name].require_live()
            await asyncio.gather(*(r.engine.check_health() for r in live))

    async def get_stats(self, model: str | None = None) -> list[Any]:
        """Every live replica's `SchedulerStats` for `model` (None: all models)."""
        names = self.model_names if model is None else [self.model(model).name]
        engines = [r.engine for n in names for r in self.models[n].live()]
        return list(await asyncio.gather(*(e.get_stats() for e in engines)))

    def shutdown(self) -> None:
        for served in self.models.values():
            _shutdown_all(served)

    async def __aenter__(self) -> EngineRouter:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.shutdown()


def _shutdown_all(served: ServedModel) -> None:
    for replica in served.replicas:
        replica.engine.shutdown()
