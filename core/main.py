"""engine-core entry points: spawned by a frontend (`python -m zllm.core.main`), or as a daemon
(`zllm engine-core`, see `frontend/cli.py`)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

import msgspec

from zllm.core.server import EngineCoreServer
from zllm.protocol.config import EngineArgs
from zllm.protocol.process import die_with_parent


def configure_logging() -> None:
    logging.basicConfig(
        level=os.environ.get("ZLLM_LOG_LEVEL", "INFO"),
        format="%(asctime)s engine-core %(levelname)s %(message)s",
    )


def main() -> None:
    """Spawned mode: addresses on the command line, EngineArgs as JSON on stdin; dies with its parent."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    ns = parser.parse_args()
    configure_logging()
    engine_args = msgspec.json.decode(sys.stdin.buffer.read(), type=EngineArgs)

    die_with_parent()
    server = EngineCoreServer(engine_args, ns.input, ns.output)
    sys.exit(server.serve())


if __name__ == "__main__":
    main()
