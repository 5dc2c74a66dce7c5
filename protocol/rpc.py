"""The worker methods a client may call by name (`LLM.collective_rpc`).

vLLM ships a pickled function to its workers; zllm's sockets carry msgspec only, so a client
names one of these methods and passes msgspec-encodable arguments. The methods the engine
itself drives (KV cache set-up, sleep) are not among them: calling them behind the engine's
back would corrupt its state.
"""

from __future__ import annotations

USER_RPC_METHODS = frozenset({"ping", "device_info", "start_profile", "stop_profile"})


def check_user_rpc(method: object, args: object = (), kwargs: object = None) -> None:
    """Raise `TypeError`/`ValueError` naming what is wrong with a `collective_rpc` call."""
    if not isinstance(args, list | tuple) or not isinstance(kwargs, dict | None):
        raise TypeError("collective_rpc: args must be a list and kwargs a dict")
    if not isinstance(method, str):
        raise TypeError(
            "collective_rpc takes the name of a worker method; functions cannot cross zllm's "
            f"sockets (msgspec only, no pickle), got {type(method).__name__}"
        )
    if method not in USER_RPC_METHODS:
        raise ValueError(
            f"collective_rpc: {method!r} is not a worker method clients may call; "
            f"they are {sorted(USER_RPC_METHODS)}"
        )
