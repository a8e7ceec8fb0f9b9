"""`lb run --dataplane nftables` (and `auto`, which falls back to nftables on a kernel
without IPVS, like this one) in the balancer's namespace: the kernel serves, `lb list`
says so, UDP conntrack hygiene, promote/demote under load, crash recovery and clean-up
(needs root)."""

from __future__ import annotations

import asyncio
import signal
import socket
from pathlib import Path

import pytest

from tests.support.netns import LB_SIDE, Topology, run_in, socket_in
from tests.support.proc import LbProcess, run_cli
from tests.support.traffic import (
    START,
    Backends,
    admin,
    ask,
    client_conn,
    config_yaml,
    connects,
    promote_and_demote_under_load,
    running_lb,
    service_yaml,
)

pytestmark = pytest.mark.netns

# The topology's default shape: no VIP anywhere, lb puts it on its own device.


def lb_table(topo: Topology) -> str:
    """lb's tables (the only ones in the balancer's namespace), without counter values."""
    return run_in(topo, "nft", "-s", "list", "ruleset")


WEB = service_yaml(
    "web",
    80,
    ["{address: 10.99.2.2:8080}", "{address: 10.99.2.3:8080}", "{address: 10.99.2.4:8080}"],
    "    scheduler: rr\n    retries: 0\n",
)
LC = service_yaml("lc", 81, ["{address: 10.99.2.2:8080}"], "    scheduler: lc\n    retries: 0\n")
SH = service_yaml(
    "sticky",
    82,
    ["{address: 10.99.2.3:8080}", "{address: 10.99.2.4:8080}"],
    "    scheduler: sh\n    retries: 0\n",
)


def dns(backends: list[str]) -> str:
    entries = [f"{{address: {b}:5353}}" for b in backends]
    return service_yaml("dns", 53, entries, "    scheduler: rr\n", proto="udp")


async def test_lb_run_nftables_serves_from_the_kernel_and_lb_list_says_so(
    topo: Topology, backends: Backends, tmp_path: Path
) -> None:
    cfg = tmp_path / "lb.yaml"
    cfg.write_text(config_yaml([WEB, LC, SH], "nftables"))
    async with running_lb(topo, cfg) as lb:
        table = lb_table(topo)
        assert "10.99.0.10 . tcp . 80 : goto svc_tcp_10_99_0_10_80" in table
        assert "tcp . 81" not in table  # lc is not expressible: userspace
        answers = [await ask(topo, "10.99.1.2") for _ in range(6)]
        # the kernel's rr order (newest first); the backend sees the client: NAT, not a proxy
        assert answers == [
            f"{ip} saw 10.99.1.2" for ip in ["10.99.2.4", "10.99.2.3", "10.99.2.2"] * 2
        ]
        assert await ask(topo, "10.99.1.2", port=81) == f"10.99.2.2 saw {LB_SIDE}"
        sticky = {await ask(topo, "10.99.1.3", port=82) for _ in range(4)}
        assert len(sticky) == 1 and sticky.pop().endswith("saw 10.99.1.3")
        # a connection held open shows as active on its backend once lb re-reads conntrack
        reader, writer = await client_conn(topo, "10.99.1.4")
        held = (await reader.readline()).decode().split()[0]
        for _ in range(50):
            services = await admin(topo, lb, "GET", "/api/v1/services")
            web = next(s for s in services["services"] if s["name"] == "web")
            active = {b["address"]: b["active"] for b in web["backends"]}
            if active.get(f"{held}:8080") == 1:
                break
            await asyncio.sleep(0.2)
        writer.close()
        assert web["dataplane"] == "nftables" and active[f"{held}:8080"] == 1, web
        assert web["connections"]["total"] == 7
        started = next(e for e in lb.events if e.get("event") == "lb.started")
        code, out, err = await run_cli(
            "list", "-n", "--admin", started["admin"], prefix=["ip", "netns", "exec", topo.lb]
        )
        assert code == 0, err
        assert "TCP  10.99.0.10:80 rr" in out and "nftables" in out and "Masq" in out
        assert "Not offloaded:" in out and "scheduler lc is not expressible in nftables" in out
        assert "sticky (tcp 10.99.0.10:82): sh in nftables hashes with jhash" in out
        # this kernel has no flowtables: lb says so, and runs without
        kernel = out.splitlines()[-1]
        assert kernel.startswith("Kernel dataplane: nftables on "), out
        assert "; no flowtable: this kernel has no flowtables" in kernel, out
        lb.signal(signal.SIGTERM)
        assert await lb.wait() == 0
    assert lb_table(topo) == ""  # stopped: table lb and the device are gone
    assert "lb0" not in run_in(topo, "ip", "-br", "link")


def fenced(sources: str) -> str:
    return service_yaml(
        "fenced",
        80,
        ["{address: 10.99.2.2:8080}", "{address: 10.99.2.3:8080}"],
        f"    scheduler: rr\n    retries: 0\n    allowed_sources: [{sources}]\n",
    )


async def test_allowed_sources_are_enforced_in_the_kernel(
    topo: Topology, backends: Backends, tmp_path: Path
) -> None:
    """A service with `allowed_sources` (Kubernetes' loadBalancerSourceRanges) goes to the
    kernel: a client outside them gets no answer, one inside is NATed (the backend sees
    it); a reload that moves the ranges takes effect as a change to that service."""
    cfg = tmp_path / "lb.yaml"
    cfg.write_text(config_yaml([fenced("10.99.1.2/31, '2001:db8::/32'")], "nftables"))
    async with running_lb(topo, cfg) as lb:
        table = lb_table(topo)
        assert "10.99.0.10 . tcp . 80 : goto fw_tcp_10_99_0_10_80" in table
        assert "10.99.0.10 . tcp . 80 : goto svc_tcp_10_99_0_10_80" in table
        assert (await ask(topo, "10.99.1.2")).endswith("saw 10.99.1.2")
        assert (await ask(topo, "10.99.1.3")).endswith("saw 10.99.1.3")
        assert not await connects(topo, "10.99.1.5")
        started = next(e for e in lb.events if e.get("event") == "lb.started")
        code, out, err = await run_cli(
            "list", "-n", "--admin", started["admin"], prefix=["ip", "netns", "exec", topo.lb]
        )
        assert code == 0, err
        assert "TCP  10.99.0.10:80 rr" in out and "nftables" in out, out
        assert "Not offloaded:" not in out, out
        n = len(lb.events)
        cfg.write_text(config_yaml([fenced("10.99.1.4/30")], "nftables"))
        lb.signal(signal.SIGHUP)
        await lb.wait_event("config.reloaded", after=n)
        for _ in range(50):
            if await connects(topo, "10.99.1.5"):
                break
        assert (await ask(topo, "10.99.1.5")).endswith("saw 10.99.1.5")
        assert not await connects(topo, "10.99.1.2")
        assert "10.99.1.4/30" in lb_table(topo)
        services = await admin(topo, lb, "GET", "/api/v1/services")
        (svc,) = services["services"]
        assert svc["dataplane"] == "nftables", svc
        lb.signal(signal.SIGTERM)
        assert await lb.wait() == 0
    assert lb_table(topo) == ""  # the filter went with table lb


async def set_state(topo: Topology, lb: LbProcess, backend: str, state: str) -> None:
    path = f"/api/v1/services/dns/backends/{backend}:5353"
    await admin(topo, lb, "POST", path, {"state": state})


async def test_udp_flows_of_removed_and_down_backends_are_forgotten(
    topo: Topology, backends: Backends, tmp_path: Path
) -> None:
    cfg = tmp_path / "lb.yaml"
    cfg.write_text(config_yaml([dns(["10.99.2.2", "10.99.2.3"])], "nftables"))
    loop = asyncio.get_running_loop()
    async with running_lb(topo, cfg) as lb:
        sock = socket_in(topo.client, socket.SOCK_DGRAM)
        sock.bind(("10.99.1.2", 40000))  # one flow: the same 5-tuple for every datagram
        answers: asyncio.Queue[bytes] = asyncio.Queue()

        class Client(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                answers.put_nowait(data)

        transport, _ = await loop.create_datagram_endpoint(Client, sock=sock)

        async def query() -> str:
            transport.sendto(b"q", (topo.vip, 53))
            data = await asyncio.wait_for(answers.get(), 10)
            return data.decode().split()[0]

        first = await query()
        assert {await query() for _ in range(3)} == {first}  # conntrack keeps the flow
        other = "10.99.2.3" if first == "10.99.2.2" else "10.99.2.2"
        # the flow's backend leaves the config: its conntrack entry goes with it
        n = len(lb.events)
        cfg.write_text(config_yaml([dns([other])], "nftables"))
        lb.signal(signal.SIGHUP)
        await lb.wait_event("config.reloaded", after=n)
        assert await query() == other
        event = await lb.wait_event("nft.conntrack_cleared", after=n)
        assert event["flows"] == 1 and event["backends"] == [f"{first}:5353"]
        # the same for a backend in maintenance (or DOWN): the next datagram is rescheduled
        cfg.write_text(config_yaml([dns(["10.99.2.2", "10.99.2.3"])], "nftables"))
        n = len(lb.events)
        lb.signal(signal.SIGHUP)
        await lb.wait_event("config.reloaded", after=n)
        assert await query() == other  # its flow stays where it is
        await set_state(topo, lb, other, "maint")
        assert await query() == first
        # a drained backend keeps its flows
        await set_state(topo, lb, first, "drain")
        await set_state(topo, lb, other, "ready")
        await asyncio.sleep(1.5)
        assert await query() == first
        transport.close()


async def test_promote_and_demote_under_load_lose_nothing(
    topo: Topology, backends: Backends, tmp_path: Path
) -> None:
    await promote_and_demote_under_load(topo, tmp_path)


async def test_a_persistent_client_keeps_its_backend_through_every_move(
    topo: Topology, backends: Backends, tmp_path: Path
) -> None:
    """Promote (userspace's templates into the kernel's affinity sets, before it takes
    the service), demote (the kernel's back into userspace) and promote again, under load."""
    await promote_and_demote_under_load(topo, tmp_path, persistent=True)


async def test_crash_recovery_and_cleanup(
    topo: Topology, backends: Backends, tmp_path: Path
) -> None:
    cfg = tmp_path / "lb.yaml"
    cfg.write_text(config_yaml([WEB], "nftables"))
    lb = await LbProcess.start(cfg, prefix=["ip", "netns", "exec", topo.lb])
    await lb.wait_event("lb.started", timeout=START)
    reader, writer = await client_conn(topo, "10.99.1.5")  # through the kernel
    assert (await reader.readline()).decode().endswith("saw 10.99.1.5\n")
    before = lb_table(topo)
    lb.proc.send_signal(signal.SIGKILL)  # no chance to clean up
    await lb.proc.wait()
    assert lb_table(topo) == before  # the kernel keeps forwarding meanwhile
    assert (await ask(topo, "10.99.1.2")).endswith("saw 10.99.1.2")
    async with running_lb(topo, cfg):
        assert lb_table(topo) == before  # adopted: replaced by the same, nothing leaked
        assert (await ask(topo, "10.99.1.2")).endswith("saw 10.99.1.2")
        writer.write(b"still there")  # the connection from before the crash lives on
        assert await asyncio.wait_for(reader.readexactly(11), 10) == b"still there"
    writer.close()
    # a config without the service: the restarted lb removes the leftover
    lb = await LbProcess.start(cfg, prefix=["ip", "netns", "exec", topo.lb])
    await lb.wait_event("lb.started", timeout=START)
    lb.proc.send_signal(signal.SIGKILL)
    await lb.proc.wait()
    cfg.write_text(config_yaml([], "nftables"))
    async with running_lb(topo, cfg):
        assert "svc_" not in lb_table(topo)
    # and `lb cleanup` after a crash leaves nothing behind
    cfg.write_text(config_yaml([WEB], "nftables"))
    lb = await LbProcess.start(cfg, prefix=["ip", "netns", "exec", topo.lb])
    await lb.wait_event("lb.started", timeout=START)
    lb.proc.send_signal(signal.SIGKILL)
    await lb.proc.wait()
    code, out, err = await run_cli("cleanup", prefix=["ip", "netns", "exec", topo.lb])
    assert code == 0, err
    assert "deleted nftables tables ip lb, lb_0..lb_15" in out
    assert lb_table(topo) == ""
    assert "lb0" not in run_in(topo, "ip", "-br", "link")


async def test_auto_without_ipvs_takes_nftables(
    topo: Topology, backends: Backends, tmp_path: Path
) -> None:
    cfg = tmp_path / "lb.yaml"
    cfg.write_text(config_yaml([WEB], "auto", "offload: {hold_down: 1s}\n"))
    async with running_lb(topo, cfg) as lb:
        enabled = await lb.wait_event("offload.enabled")
        assert enabled["kernel"] == "nftables"
        assert (await ask(topo, "10.99.1.2")).endswith(f"saw {LB_SIDE}")  # userspace first
        await lb.wait_event("offload.promote", timeout=30)
        for _ in range(50):
            if "svc_tcp_10_99_0_10_80" in lb_table(topo):
                break
            await asyncio.sleep(0.1)
        assert (await ask(topo, "10.99.1.2")).endswith("saw 10.99.1.2")
