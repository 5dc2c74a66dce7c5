"""Models by hub id, as vLLM takes them: resolved through `huggingface_hub.snapshot_download`
from a Hugging Face cache built here (the layout the hub client writes), with
`HF_HUB_OFFLINE=1`, so nothing is ever downloaded."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from zllm import LLM, SamplingParams
from zllm.frontend.default_model import DEFAULT_MODEL_HUB_ID, resolve_model

REPO = "zllm-test/tiny-llama"


def add_to_hf_cache(cache: Path, repo_id: str, files: str, ref: str = "main") -> Path:
    """Put the checkpoint in `files` into `cache` as the hub client would: a snapshot folder
    named by its commit, and `refs/<ref>` naming that commit. Returns the snapshot folder."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(f"{repo_id}@{ref}".encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    shutil.copytree(files, snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def hf_cache(tmp_path, tiny_checkpoints, monkeypatch) -> dict:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hf-cache"
    return {
        "dir": cache,
        "main": add_to_hf_cache(cache, REPO, tiny_checkpoints["llama"]),
        "v2": add_to_hf_cache(cache, REPO, tiny_checkpoints["qwen2"], ref="v2"),
    }


def test_hub_id_resolves_from_the_cache_offline(hf_cache: dict) -> None:
    cache = str(hf_cache["dir"])
    assert resolve_model(REPO, download_dir=cache) == str(hf_cache["main"])
    assert resolve_model(REPO, revision="v2", download_dir=cache) == str(hf_cache["v2"])
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
        resolve_model("zllm-test/not-cached", download_dir=cache)
    with pytest.raises(FileNotFoundError, match="revision v3"):
        resolve_model(REPO, revision="v3", download_dir=cache)
    with pytest.raises(FileNotFoundError, match="not found"):
        resolve_model("./no/such/dir")


def test_default_model_answers_to_its_hub_id(default_model_path: str, hf_cache: dict) -> None:
    assert resolve_model(DEFAULT_MODEL_HUB_ID) == default_model_path
    assert resolve_model(DEFAULT_MODEL_HUB_ID.lower()) == default_model_path
    # a revision asks for the hub's own weights: not in this cache, and offline
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
        resolve_model(DEFAULT_MODEL_HUB_ID, revision="main", download_dir=str(hf_cache["dir"]))


def test_llm_from_a_hub_id(hf_cache: dict) -> None:
    llm = LLM(
        REPO,
        revision="v2",
        download_dir=str(hf_cache["dir"]),
        distributed_executor_backend="uni",
        kv_cache_memory_bytes=2**24,
    )
    try:
        config = llm.get_model_config()
        assert config.model == REPO and config.path == str(hf_cache["v2"])
        assert config.architecture == "Qwen2ForCausalLM"  # the v2 ref's checkpoint
        [out] = llm.generate(["Hello"], SamplingParams(max_tokens=3, ignore_eos=True))
        assert len(out.outputs[0].token_ids) == 3
    finally:
        llm.shutdown()


def test_zllm_generate_with_a_hub_id_and_hf_hub_cache(hf_cache: dict) -> None:
    """The command line, with the cache named by `HF_HUB_CACHE` as a user sets it."""
    env = {
        **os.environ,
        "HF_HUB_CACHE": str(hf_cache["dir"]),
        "HF_HUB_OFFLINE": "1",
        "OMP_WAIT_POLICY": "PASSIVE",
    }
    argv = ["generate", "Hello", "--model", REPO, "--max-tokens", "3", "--ignore-eos"]
    argv += ["--distributed-executor-backend", "uni", "--kv-cache-memory-bytes", str(2**24)]
    result = subprocess.run(
        [sys.executable, "-m", "zllm.frontend.cli", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip()
