"""`lb demo`: start three example backends and `lb run` on the bundled config, then show
how new connections are spread (wrr, weights 3:2:1)."""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import sys
from importlib import resources
from pathlib import Path

from lb.config import load_config

LISTEN = ("127.0.0.1", 8080)


async def _backend(name: str, port: int) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(f"{name}\n".encode())
        await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", port)


async def _ask() -> str:
    reader, writer = await asyncio.open_connection(*LISTEN)
    line = await reader.readline()
    writer.close()
    return line.decode().strip()


async def _demo(config: Path, n: int) -> int:
    cfg = load_config(config)
    backends = cfg.services[0].backends
    try:
        servers = [await _backend(f"backend-{b.address.port}", b.address.port) for b in backends]
    except OSError as e:
        print(f"lb demo: cannot start the example backends: {e}", file=sys.stderr)
        return 1
    print(
        f"started {len(servers)} example backends: " + ", ".join(str(b.address) for b in backends)
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "lb",
        "run",
        "-c",
        str(config),
        "--log-format",
        "text",
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        for _ in range(100):
            if proc.returncode is not None:
                print("lb demo: `lb run` exited early (see its message above)", file=sys.stderr)
                return 1
            try:
                _, w = await asyncio.open_connection(*LISTEN)
                w.close()
                break
            except OSError:
                await asyncio.sleep(0.05)
        print(
            f"\n{n} new connections to {LISTEN[0]}:{LISTEN[1]} (wrr, weights "
            + ":".join(str(b.weight) for b in backends)
            + "):"
        )
        await asyncio.sleep(0.1)
        seen: collections.Counter[str] = collections.Counter()
        order = []
        for _ in range(n):
            who = await _ask()
            order.append(who)
            seen[who] += 1
        print("  " + " ".join(order))
        for name, count in sorted(seen.items()):
            print(f"  {name}: {count:3d} {'#' * count}")
        return 0
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            await proc.wait()
        for s in servers:
            s.close()


def main(n: int = 12) -> int:
    with resources.as_file(resources.files("lb") / "examples" / "demo.yaml") as config:
        return asyncio.run(_demo(config, n))
