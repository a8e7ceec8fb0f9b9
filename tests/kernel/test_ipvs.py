"""lb with the IPVS dataplane on a real kernel: forwarding, persistence, weights, drain,
DOWN backends, foreign services, clean-up and crash recovery."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from offload.ipvs import RESYNC_PERIOD
from tests.support.netns import LB_SIDE, Topology, ipvs_save, ipvsadm, run_in, socket_in
from tests.support.proc import LbProcess, run_cli
from tests.support.traffic import (
    START,
    Backends,
    admin,
    ask,
    ask_udp,
    client_conn,
    config_yaml,
    connects,
    running_lb,
    service_yaml,
)

WEB = service_yaml(
    "web",
    80,
    ["{address: 10.99.2.2:8080}", "{address: 10.99.2.3:8080}", "{address: 10.99.2.4:8080}"],
    "    scheduler: rr\n    retries: 0\n",
)
DNS = service_yaml("dns", 53, ["{address: 10.99.2.5:5353}"], "    scheduler: rr\n", proto="udp")


async def test_nat_forwarding_with_port_mapping(
    topo: Topology, backends: Backends, tmp_path: Path
) -> None:
    cfg = tmp_path / "lb.yaml"
    cfg.write_text(config_yaml([WEB, DNS], "ipvs"))
    async with running_lb(topo, cfg):
        listing = ipvsadm(topo)
        assert "TCP  10.99.0.10:80 rr" in listing and "UDP  10.99.0.10:53 rr" in listing
        assert "-> 10.99.2.2:8080               Masq    1" in listing
        answers = [await ask(topo, "10.99.1.2") for _ in range(6)]
        # rr over the kernel's list (newest first); the backend sees the client: NAT, not a proxy
        assert answers == [
            f"{ip} saw 10.99.1.2" for ip in ["10.99.2.4", "10.99.2.3", "10.99.2.2"] * 2
        ]
        data, source = await ask_udp(topo, "10.99.1.3", b"query")
        assert data == b"10.99.2.5 saw 10.99.1.3:query" and source == ("10.99.0.10", 53)
        # A client on the balancer itself: its source address is the VIP, so the kernel path
        # needs lb's masquerade; IPVS's connection table shows it carried the connection.
        sock = socket_in(topo.lb)
        sock.setblocking(False)
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (topo.vip, 80)), 10)
        reader, writer = await asyncio.open_connection(sock=sock)
        line = (await asyncio.wait_for(reader.readline(), 10)).decode().split()
        assert line[0] in topo.backend_ips and line[-1] == LB_SIDE
        conns = run_in(topo, "ipvsadm", "-Lnc")
        writer.close()
        assert f"{topo.vip}:{sock.getsockname()[1]}" in conns, conns


async def test_persistence_in_the_kernel(
    topo: Topology, backends: Backends, tmp_path: Path
) -> None:
    web = WEB.replace(
        "    retries: 0\n",
        "    retries: 0\n    persistence: {timeout: 60, netmask: 255.255.255.0}\n",
    )
    cfg = tmp_path / "lb.yaml"
    cfg.write_text(config_yaml([web], "ipvs"))
    async with running_lb(topo, cfg):
        assert "persistent 60 mask 255.255.255.0" in ipvsadm(topo)
        seen = {(await ask(topo, ip)).split()[0] for ip in topo.client_ips[:8] for _ in range(2)}
        assert len(seen) == 1


async def test_weights_drain_and_down_backends(
    topo: Topology, backends: Backends, tmp_path: Path
) -> None:
    web = service_yaml(
        "web",
        80,
        ["{address: 10.99.2.2:8080, weight: 2}", "{address: 10.99.2.3:8080, weight: 1}"],
        "    scheduler: wrr\n    retries: 0\n"
        "    health_check: {type: tcp, interval: 1s, timeout: 1s, rise: 1, fall: 1}\n",
    )
    cfg = tmp_path / "lb.yaml"
    cfg.write_text(config_yaml([web], "ipvs"))
    async with running_lb(topo, cfg) as lb:
        picks = [(await ask(topo, "10.99.1.2")).split()[0] for _ in range(6)]
        assert picks.count("10.99.2.2") == 4 and picks.count("10.99.2.3") == 2
        # drain 10.99.2.2 under a live connection: weight 0 in the kernel, no new connections,
        # the open one carries on
        reader, writer = await client_conn(topo, "10.99.1.4")
        held = (await reader.readline()).decode().split()[0]
        answer = await admin(
            topo, lb, "POST", f"/api/v1/services/web/backends/{held}:8080", {"state": "drain"}
        )
        assert answer["effective_weight"] == 0
        assert f"-> {held}:8080               Masq    0" in ipvsadm(topo)
        other = "10.99.2.3" if held == "10.99.2.2" else "10.99.2.2"
        assert {(await ask(topo, "10.99.1.2")).split()[0] for _ in range(4)} == {other}
        writer.write(b"still there")
        assert await asyncio.wait_for(reader.readexactly(11), 5) == b"still there"
        writer.close()
        await admin(
            topo, lb, "POST", f"/api/v1/services/web/backends/{held}:8080", {"state": "ready"}
        )
        # a backend that fails its check is quiesced in the kernel (weight 0), not removed
        victim = next(s for s in backends.servers if s.sockets[0].getsockname()[0] == other)
        victim.close()
        await lb.wait_event("backend.health", timeout=30)
        for _ in range(50):
            if f"-> {other}:8080               Masq    0" in ipvsadm(topo):
                break
            await asyncio.sleep(0.2)
        assert f"-> {other}:8080               Masq    0" in ipvsadm(topo)
        assert {(await ask(topo, "10.99.1.2")).split()[0] for _ in range(3)} == {held}


async def test_foreign_service_is_never_touched(
    topo: Topology, backends: Backends, tmp_path: Path
) -> None:
    run_in(topo, "ipvsadm", "-A", "-t", "10.99.0.99:80", "-s", "sh")
    run_in(topo, "ipvsadm", "-a", "-t", "10.99.0.99:80", "-r", "10.99.2.2:8080", "-m", "-w", "7")
    foreign = [line for line in ipvs_save(topo) if "10.99.0.99" in line]
    cfg = tmp_path / "lb.yaml"
    cfg.write_text(config_yaml([WEB], "ipvs"))
    async with running_lb(topo, cfg) as lb:
        lb.signal(signal.SIGHUP)
        await lb.wait_event("config.reloaded")
        assert [line for line in ipvs_save(topo) if "10.99.0.99" in line] == foreign
        lb.signal(signal.SIGTERM)
        assert await lb.wait() == 0
    assert ipvs_save(topo) == sorted(foreign)  # lb removed its own, and only its own
    code, out, _ = await run_cli("cleanup", prefix=["ip", "netns", "exec", topo.lb])
    assert code == 0 and "deleted IPVS service" not in out
    assert ipvs_save(topo) == sorted(foreign)


async def test_crash_recovery_and_cleanup(
    topo: Topology, backends: Backends, tmp_path: Path
) -> None:
    cfg = tmp_path / "lb.yaml"
    cfg.write_text(config_yaml([WEB], "ipvs"))
    lb = await LbProcess.start(cfg, prefix=["ip", "netns", "exec", topo.lb])
    await lb.wait_event("lb.started", timeout=START)
    before = ipvs_save(topo)
    lb.proc.send_signal(signal.SIGKILL)  # no chance to clean up
    await lb.proc.wait()
    assert ipvs_save(topo) == before  # the kernel keeps forwarding meanwhile
    assert (await ask(topo, "10.99.1.2")).endswith("saw 10.99.1.2")
    async with running_lb(topo, cfg):
        assert ipvs_save(topo) == before  # adopted: nothing duplicated, nothing leaked
        assert (await ask(topo, "10.99.1.2")).endswith("saw 10.99.1.2")
    # a config without the service: the restarted lb removes the leftover
    lb = await LbProcess.start(cfg, prefix=["ip", "netns", "exec", topo.lb])
    await lb.wait_event("lb.started", timeout=START)
    lb.proc.send_signal(signal.SIGKILL)
    await lb.proc.wait()
    cfg.write_text(config_yaml([], "ipvs"))
    async with running_lb(topo, cfg):
        for _ in range(50):
            if not ipvs_save(topo):
                break
            await asyncio.sleep(0.2)
        assert ipvs_save(topo) == []
    # and `lb cleanup` after a crash leaves nothing behind
    cfg.write_text(config_yaml([WEB], "ipvs"))
    lb = await LbProcess.start(cfg, prefix=["ip", "netns", "exec", topo.lb])
    await lb.wait_event("lb.started", timeout=START)
    lb.proc.send_signal(signal.SIGKILL)
    await lb.proc.wait()
    code, out, err = await run_cli("cleanup", prefix=["ip", "netns", "exec", topo.lb])
    assert code == 0, err
    assert "deleted IPVS service tcp/10.99.0.10:80" in out
    assert ipvs_save(topo) == []
    links = run_in(topo, "ip", "-br", "link")
    assert "lb0" not in links
    assert "lb_ipvs" not in run_in(topo, "nft", "list", "tables")


async def test_userspace_listener_stays_bound_and_lb_list_shows_ipvs(
    topo: Topology, backends: Backends, tmp_path: Path
) -> None:
    cfg = tmp_path / "lb.yaml"
    cfg.write_text(config_yaml([WEB], "ipvs"))
    async with running_lb(topo, cfg) as lb:
        started = next(e for e in lb.events if e.get("event") == "lb.started")
        code, out, err = await run_cli(
            "list", "-n", "--admin", started["admin"], prefix=["ip", "netns", "exec", topo.lb]
        )
        assert code == 0, err
        assert "TCP  10.99.0.10:80 rr" in out and "ipvs" in out and "Masq" in out
        assert "0.0.0.0" not in out
        kernel = out.splitlines()[-1]
        assert kernel.startswith("Kernel dataplane: ipvs on "), out
        assert "no flowtable: IPVS's NAT flows cannot take one" in kernel, out
        listening = run_in(topo, "ss", "-ltn")
        assert "10.99.0.10:80" in listening
        assert LB_SIDE not in (await ask(topo, "10.99.1.2"))


async def test_drift_is_repaired_within_the_resync_period(
    topo: Topology, backends: Backends, tmp_path: Path
) -> None:
    """Someone deletes lb's IPVS service (`ipvsadm -D`) and adds a destination by hand:
    the periodic resync (RESYNC_PERIOD, 30 s) puts back what lb applied, and says so."""
    cfg = tmp_path / "lb.yaml"
    cfg.write_text(config_yaml([WEB], "ipvs"))
    async with running_lb(topo, cfg) as lb:
        applied = ipvs_save(topo)
        assert any("10.99.0.10:80" in line for line in applied)
        run_in(topo, "ipvsadm", "-D", "-t", "10.99.0.10:80")
        assert not any("10.99.0.10:80" in line for line in ipvs_save(topo))
        n = len(lb.events)
        repaired = await lb.wait_event("ipvs.drift_repaired", timeout=RESYNC_PERIOD + 30, after=n)
        assert "tcp/10.99.0.10:80 missing" in repaired["msg"]
        assert ipvs_save(topo) == applied
        assert (await ask(topo, "10.99.1.2")).endswith("saw 10.99.1.2")  # through IPVS again


async def test_allowed_sources_are_enforced_before_ipvs(
    topo: Topology, backends: Backends, tmp_path: Path
) -> None:
    """IPVS cannot filter clients: lb's table `ip lb_ipvs` drops new connections to the
    VIP:port from outside `allowed_sources` before IPVS sees them; a client inside is
    NATed by IPVS. A reload that moves the ranges changes that service's filter only, and
    the filter goes once the service has."""

    def fenced(sources: str) -> str:
        return WEB.replace(
            "    retries: 0\n", f"    retries: 0\n    allowed_sources: [{sources}]\n"
        )

    def lb_ipvs() -> str:
        return run_in(topo, "nft", "list", "table", "ip", "lb_ipvs", check=False)

    cfg = tmp_path / "lb.yaml"
    cfg.write_text(config_yaml([fenced("10.99.1.2/31"), DNS], "ipvs"))
    async with running_lb(topo, cfg) as lb:
        assert "TCP  10.99.0.10:80 rr" in ipvsadm(topo)
        assert "10.99.0.10 . tcp . 80 : goto fw_tcp_10_99_0_10_80" in lb_ipvs()
        assert (await ask(topo, "10.99.1.2")).endswith("saw 10.99.1.2")  # IPVS NAT
        assert not await connects(topo, "10.99.1.5", timeout=3)  # dropped: no answer
        data, _ = await ask_udp(topo, "10.99.1.5", b"q")  # another service: not filtered
        assert data == b"10.99.2.5 saw 10.99.1.5:q"
        n = len(lb.events)
        cfg.write_text(config_yaml([fenced("10.99.1.4/30"), DNS], "ipvs"))
        lb.signal(signal.SIGHUP)
        await lb.wait_event("config.reloaded", after=n)
        for _ in range(20):
            if await connects(topo, "10.99.1.5", timeout=3):
                break
        assert (await ask(topo, "10.99.1.5")).endswith("saw 10.99.1.5")
        assert not await connects(topo, "10.99.1.2", timeout=3)
        assert "10.99.1.4/30" in lb_ipvs() and "10.99.1.2/31" not in lb_ipvs()
        n = len(lb.events)
        cfg.write_text(config_yaml([DNS], "ipvs"))
        lb.signal(signal.SIGHUP)
        await lb.wait_event("config.reloaded", after=n)
        for _ in range(100):
            if "fw_" not in lb_ipvs():
                break
            await asyncio.sleep(0.5)
        assert "fw_" not in lb_ipvs() and "TCP  10.99.0.10:80" not in ipvsadm(topo)
