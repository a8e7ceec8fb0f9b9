"""Byte streams as Envoy's tcp_proxy tests drive them, through `lb run`: half-close in
both directions with every byte checked (SHA-256), the upstream (the backend) writing
first, and large writes to a slow reader under flow control. Figures: bytes lost or
corrupted (none), lb's memory grown while a firehose fills a slow reader (bounded)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from tests.reliability.tier import (
    Payload,
    drain_to_eof,
    figure,
    rss_mb,
    scaled,
    seen_from,
    serve,
)
from tests.support.netns import Topology
from tests.support.traffic import client_conn, config_yaml, running_lb, service_yaml

pytestmark = pytest.mark.netns

DATAPLANES = [pytest.param("userspace", marks=pytest.mark.topology(vip_on="lo")), "nftables"]
MB = 1024 * 1024


def relay(port: int, backend: str) -> str:
    """A service the kernel can carry too (rr, no retries)."""
    extra = "    scheduler: rr\n    retries: 0\n"
    return service_yaml(f"s{port}", port, [f"{{address: {backend}:8080}}"], extra)


@pytest.mark.parametrize("dataplane", DATAPLANES)
async def test_half_close_both_ways_loses_no_byte(
    topo: Topology, tmp_path: Path, dataplane: str
) -> None:
    """Client first (port 80): the client sends everything and half-closes, the backend
    reads to that FIN, then answers and half-closes. Upstream first (port 81): the backend
    sends everything and half-closes as soon as it accepts, before the client has said a
    word; the client reads to that FIN, then sends and half-closes."""
    size = scaled(64 * MB)
    seen: dict[str, tuple[int, str]] = {}
    sent: dict[str, str] = {}
    peers: set[str] = set()

    async def client_first(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peers.add(writer.get_extra_info("peername")[0])
        seen["client"] = await drain_to_eof(reader)
        sent["client"] = await Payload(size, 2).send(writer)
        writer.close()

    async def upstream_first(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peers.add(writer.get_extra_info("peername")[0])
        sent["upstream"] = await Payload(size, 4).send(writer)
        seen["upstream"] = await drain_to_eof(reader)
        writer.close()

    servers = [
        await serve(topo, "10.99.2.2", 8080, client_first),
        await serve(topo, "10.99.2.3", 8080, upstream_first),
    ]
    cfg = tmp_path / "lb.yaml"
    cfg.write_text(config_yaml([relay(80, "10.99.2.2"), relay(81, "10.99.2.3")], dataplane))
    results = []
    async with running_lb(topo, cfg):
        for mode, port in (("client", 80), ("upstream", 81)):
            started = time.monotonic()
            reader, writer = await client_conn(topo, topo.client_ips[0], port)
            if mode == "client":
                ours = await Payload(size, 1).send(writer)
                got = await drain_to_eof(reader)
            else:
                got = await drain_to_eof(reader)
                ours = await Payload(size, 3).send(writer)
            writer.close()
            for _ in range(100):
                if mode in seen:
                    break
                await asyncio.sleep(0.1)
            results.append((mode, ours, got, time.monotonic() - started))
    for server in servers:
        server.close()
    assert peers == {seen_from(dataplane, topo.client_ips[0])}  # the path named carried it
    for mode, ours, got, seconds in results:
        back_ok = got == (size, sent[mode])
        forth_ok = seen.get(mode) == (size, ours)
        figure(
            f"half-close, {mode} first, {dataplane}: {size:,} bytes each way in {seconds:.1f}s, "
            f"SHA-256 equal: client->backend {forth_ok}, backend->client {back_ok}"
        )
        assert forth_ok and back_ok, (mode, seen.get(mode), got)


@pytest.mark.topology(vip_on="lo")
async def test_a_slow_reader_holds_the_firehose_back_not_lbs_memory(
    topo: Topology, tmp_path: Path
) -> None:
    """The backend writes as fast as it can; the client reads 64 KiB every 5 ms. Flow
    control must hold the backend back: lb's memory stays flat, every byte arrives."""
    size = scaled(96 * MB)
    sent: list[str] = []

    async def firehose(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sent.append(await Payload(size, 5).send(writer))
        writer.close()

    server = await serve(topo, "10.99.2.2", 8080, firehose)
    cfg = tmp_path / "lb.yaml"
    cfg.write_text(config_yaml([relay(80, "10.99.2.2")], "userspace"))
    async with running_lb(topo, cfg) as lb:
        pid = lb.proc.pid
        reader, writer = await client_conn(topo, topo.client_ips[0])
        before = peak = rss_mb(pid)
        done = asyncio.get_running_loop().create_task(drain_to_eof(reader, pace=0.005))
        started = time.monotonic()
        while not done.done():
            peak = max(peak, rss_mb(pid))
            await asyncio.sleep(0.05)
        n, digest = done.result()
        seconds = time.monotonic() - started
        writer.close()
    server.close()
    grown = peak - before
    figure(
        f"slow reader, userspace: {n:,} bytes at {n / seconds / MB:.0f} MB/s from a firehose, "
        f"SHA-256 equal: {[digest] == sent}; lb's RSS grew {grown:.1f} MiB (bound 32)"
    )
    assert (n, [digest]) == (size, sent)
    assert grown < 32
