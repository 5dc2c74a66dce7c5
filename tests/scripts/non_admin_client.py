"""A client of an ipc daemon running as another user: `python non_admin_client.py ADDRESS UID
GID`, started as root. It loads what it needs, becomes UID (in group GID) before it connects
(the daemon sees the uid of the connecting process), then runs a request and asks the engine
to sleep. Prints one JSON line: the tokens it got and the answer to its `sleep` call.

A raw client: after the switch, the interpreter's own files (under root's home here) may be
out of reach, so nothing may be imported late."""

from __future__ import annotations

import json
import os
import sys

from raw_client import RawClient

from zllm.protocol import messages as m
from zllm.protocol.process import core_addresses
from zllm.protocol.sampling_params import SamplingParams

if __name__ == "__main__":
    address, uid, gid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    os.setgroups([gid])
    os.setgid(gid)
    os.setuid(uid)
    client = RawClient(*core_addresses(address))
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    client.send(m.AddRequest(request_id="r", prompt_token_ids=[5, 6, 7], sampling_params=params))
    updates = client.updates_until_finished({"r"}, 60)["r"]
    client.send(m.UtilityCall(call_id=1, method="sleep"))
    while not isinstance(reply := client.recv(60), m.UtilityReply):
        pass
    tokens = [t for u in updates for t in u.new_token_ids]
    print(json.dumps({"tokens": tokens, "sleep_error": reply.error, "kind": reply.error_kind}))
    client.close()
