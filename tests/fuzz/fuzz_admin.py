"""Coverage-guided fuzzing (atheris, libFuzzer) of the admin API: a real lb (Daemon: the
admin server, a controller, one service) runs on this process's event loop, which runs
for each input until its answer is in (so the coverage an input reaches is its own).
Each input goes over a fresh TCP connection, either as raw bytes (input starting with
`R`: the HTTP parser's side) or as a well-formed request built from the input (method,
path, token, JSON body: the handlers' side). Whatever arrives, the answer is an HTTP
status below 500 with, for an error, a JSON body saying that status; and the admin API
keeps answering. Anything else is a bug.

    python -m tests.fuzz.fuzz_admin NEW_DIR tests/fuzz/corpus/admin -dict=tests/fuzz/admin.dict

(from the repository root). tests/fuzz/test_fuzz.py runs it for a bounded time."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import atheris
import uvloop

with atheris.instrument_imports(include=["lb"]):
    from lb.config import load_config
    from lb.daemon import Daemon
    from tests.support.net import free_port

TOKEN = "fuzz-token"
METHODS = ["GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "PATCH"]
PATHS = [
    "/healthz",
    "/readyz",
    "/metrics",
    "/api/v1/services",
    "/api/v1/services/web",
    "/api/v1/services/web/backends/127.0.0.1:9",
    "/api/v1/services/web/backends/",
    "/api/v1/services/nope/backends/127.0.0.1:9",
    "/",
]
KEYS = ["state", "weight", "reset"]
VALUES: list[Any] = ["ready", "drain", "maint", "up", 0, 1, 65535, 65536, -1, True, None, 1.5]


def start_lb() -> tuple[asyncio.AbstractEventLoop, tuple[str, int]]:
    """A real lb with its admin API (a token file) and one service: its loop, the admin
    API's address."""
    tmp = Path(tempfile.mkdtemp(prefix="lb-fuzz-admin-"))
    (tmp / "token").write_text(TOKEN + "\n")
    admin, port = free_port(), free_port()
    cfg = tmp / "lb.yaml"
    cfg.write_text(
        f"shutdown_grace: 0\nadmin: {{listen: 127.0.0.1:{admin}, token_file: {tmp / 'token'}}}\n"
        f"services:\n- name: web\n  listen: 127.0.0.1:{port}\n"
        "  backends: [{address: '127.0.0.1:9'}, {address: '127.0.0.1:10'}]\n"
    )
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    loop.run_until_complete(Daemon(cfg, None).start(load_config(cfg)))
    return loop, ("127.0.0.1", admin)


async def exchange(admin: tuple[str, int], request: bytes) -> bytes:
    """Send `request`, half-close, read the answer to its end (what came before a reset)."""
    reader, writer = await asyncio.open_connection(*admin)
    try:
        with contextlib.suppress(ConnectionError):  # it may refuse before reading it all
            writer.write(request)
            writer.write_eof()
            await writer.drain()
        answer = b""
        with contextlib.suppress(ConnectionError):
            while data := await asyncio.wait_for(reader.read(65536), 15):
                answer += data
        return answer
    finally:
        writer.close()


def structured(fdp: atheris.FuzzedDataProvider) -> bytes:
    """A well-formed request: the handlers decide, not the HTTP parser."""
    method = fdp.PickValueInList(METHODS)
    path = fdp.PickValueInList(PATHS)
    if fdp.ConsumeBool():
        path += fdp.ConsumeUnicodeNoSurrogates(12).replace("\r", "").replace("\n", "")
    headers = ["Host: lb", "Connection: close"]
    if fdp.ConsumeBool():
        headers.append(f"Authorization: Bearer {TOKEN if fdp.ConsumeBool() else 'x'}")
    if fdp.ConsumeBool():
        body: dict[str, Any] = {}
        for _ in range(fdp.ConsumeIntInRange(0, 3)):
            key = fdp.PickValueInList(KEYS) if fdp.ConsumeBool() else fdp.ConsumeUnicode(6)
            body[key] = fdp.PickValueInList(VALUES) if fdp.ConsumeBool() else fdp.ConsumeInt(4)
        raw = json.dumps(body).encode()
    else:
        raw = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64))
    if fdp.ConsumeBool():
        headers.append("Content-Type: application/json")
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(h + "\r\n" for h in headers)
    return head.encode("utf-8", "replace") + f"Content-Length: {len(raw)}\r\n\r\n".encode() + raw


def one_input(lb: tuple[asyncio.AbstractEventLoop, tuple[str, int]], data: bytes) -> None:
    if data[:1] == b"R":
        request, method = data[1:], data[1:8]
    else:
        request = structured(atheris.FuzzedDataProvider(data))
        method = request[:8]
    loop, admin = lb
    answer = loop.run_until_complete(exchange(admin, request))
    if not answer:
        return  # nothing complete arrived: the server may close without a word
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0]
    assert status_line.startswith(b"HTTP/"), answer[:200]  # aiohttp answers 0.9 in kind
    status = int(status_line.split()[1])
    assert status < 500, (request[:300], answer[:300])
    if status >= 400 and not method.startswith(b"HEAD"):
        assert json.loads(body)["status"] == status, (request[:300], answer[:300])


def main() -> None:
    atheris.Setup(sys.argv, functools.partial(one_input, start_lb()))
    atheris.Fuzz()


if __name__ == "__main__":
    main()
