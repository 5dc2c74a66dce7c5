"""A daemon reachable from other hosts: it refuses to listen without CurveZMQ (unless told
`--insecure`); with Curve, only listed client keys get in, and only admin keys may change
the engine for everyone. The daemon binds 0.0.0.0 (every interface); its clients connect
through 127.0.0.1."""

from __future__ import annotations

import stat
import time
from pathlib import Path

import pytest
from scripts.daemon_process import Daemon, free_port

from zllm import LLM, SamplingParams
from zllm.frontend.cli import main as zllm
from zllm.frontend.errors import EngineStartupError

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, Path]:
    """Key pairs made by `zllm keys generate`: the daemon's, an admin's, a user's, a stranger's."""
    root = tmp_path_factory.mktemp("keys")
    for name, folder in [("server", "server"), ("admin", "admins"), ("user", "clients")]:
        assert zllm(["keys", "generate", str(root / folder), "--name", name]) == 0
    assert zllm(["keys", "generate", str(root / "elsewhere"), "--name", "stranger"]) == 0
    return {
        "server": root / "server" / "server.key_secret",
        "server_public": root / "server" / "server.key",
        "admins": root / "admins",
        "clients": root / "clients",
        **{n: root / d / f"{n}.key_secret" for n, d in [("admin", "admins"), ("user", "clients")]},
        "stranger": root / "elsewhere" / "stranger.key_secret",
    }


def test_keys_generate_writes_a_private_secret_and_never_overwrites(keys, tmp_path) -> None:
    assert stat.S_IMODE(keys["user"].stat().st_mode) == 0o600
    assert "secret-key" in keys["user"].read_text()
    assert "secret-key" not in keys["user"].with_suffix(".key").read_text()
    assert zllm(["keys", "generate", str(keys["clients"]), "--name", "user"]) == 1


@pytest.mark.timeout(120)
def test_a_non_loopback_address_needs_curve_or_insecure(tiny_checkpoints) -> None:
    address = f"tcp://0.0.0.0:{free_port()}"
    refused = Daemon(tiny_checkpoints["llama"], address)
    assert refused.proc.wait(30) != 0
    assert "reachable from other hosts" in refused.output() and "--insecure" in refused.output()

    insecure = Daemon(tiny_checkpoints["llama"], address, "--insecure")
    try:
        insecure.wait_for_log("listening on")
    finally:
        insecure.stop()


@pytest.mark.timeout(180)
def test_curve_admits_listed_keys_and_roles_guard_the_engine(tiny_checkpoints, keys) -> None:
    port = free_port()
    daemon = Daemon(
        tiny_checkpoints["llama"],
        f"tcp://0.0.0.0:{port}",
        *("--curve-secret-key", str(keys["server"]), "--curve-clients", str(keys["clients"])),
        *("--curve-admins", str(keys["admins"])),
    )
    address = f"tcp://127.0.0.1:{port}"

    def client(name: str) -> LLM:
        return LLM(
            engine_core_address=address,
            curve_secret_key=str(keys[name]),
            curve_server_key=str(keys["server_public"]),
        )

    user = admin = None
    try:
        daemon.wait_for_log("engine-core ready", 90)
        user = client("user")
        tokens = user.generate(["Hello"], GREEDY)[0].outputs[0].token_ids
        assert len(tokens) == 6
        for call in (user.sleep, user.reset_prefix_cache, lambda: user.collective_rpc("ping")):
            with pytest.raises(PermissionError, match="needs the admin role"):
                call()
        assert not user.is_sleeping()

        admin = client("admin")
        admin.sleep()
        assert user.is_sleeping()
        admin.wake_up()
        assert admin.generate(["Hello"], GREEDY)[0].outputs[0].token_ids == tokens

        start = time.monotonic()
        with pytest.raises(EngineStartupError, match="refused this client's CurveZMQ key"):
            client("stranger")
        with pytest.raises(EngineStartupError, match="does it require CurveZMQ"):
            LLM(engine_core_address=address)
        with pytest.raises(EngineStartupError, match="is curve_server_key its public key"):
            LLM(
                engine_core_address=address,
                curve_secret_key=str(keys["user"]),
                curve_server_key=str(keys["stranger"].with_suffix(".key")),
            )
        assert time.monotonic() - start < 10
        assert "refused a client with an unlisted Curve key" in daemon.output()

        with pytest.raises(PermissionError):  # stopping the daemon is an admin's call too
            user.client.call("shutdown").result(10)
        assert admin.client.call("shutdown").result(10) is True
        assert daemon.proc.wait(30) == 0, daemon.output()[-3000:]
    finally:
        for llm in (user, admin):
            if llm is not None:
                llm.shutdown()
        daemon.stop()
