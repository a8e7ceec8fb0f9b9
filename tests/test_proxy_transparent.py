"""`source: transparent` (lb/proxy/transparent.py, lb/proxy/tcp.py's TransparentRelay): a
backend sees the client's address, not lb's.

Without root: the node's plan (nft script, ip commands, families) and the config's checks.
With root (never skipped with CI=true): `lb run` in the balancer's namespace of the test
topology (the backends route the clients' network back through lb), a backend that says
which peer it saw, the policy routing checked in the namespace as lb installs and removes
it, and lb dropped to nobody refusing the service.
"""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from lb.config import ConfigError, parse_config
from lb.model import Service, SourceAddress
from lb.proxy import transparent
from offload.netns import inside
from offload.policy import not_expressible
from tests.support.netns import LB_SIDE, Topology, sh
from tests.support.proc import LbProcess, run_cli
from tests.support.traffic import (
    Backends,
    ask,
    client_conn,
    config_yaml,
    running_lb,
    service_yaml,
)

TOPOLOGY = pytest.mark.topology(
    client_ips=["10.99.1.2", "10.99.1.3", "10.99.1.4"], backend_ips=["10.99.2.2"], vip_on="lo"
)
BACKEND = "10.99.2.2:8080"
PLAIN = service_yaml("plain", 80, [f"{{address: {BACKEND}}}"], "    retries: 0\n")
CLEAR = service_yaml("clear", 81, [f"{{address: {BACKEND}}}"], "    source: transparent\n")
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
#: for lb run as nobody: ports it may bind
HIGH_PLAIN = PLAIN.replace("10.99.0.10:80", "10.99.0.10:8080")
HIGH_CLEAR = CLEAR.replace("10.99.0.10:81", "10.99.0.10:8081")


# --- the plan and the config (no root) ---------------------------------------------------------


def one(extra: str) -> Service:
    return parse_config(f"services:\n  - {{name: a, listen: 10.0.0.1:80{extra}}}\n").services[0]


def test_the_node_plan() -> None:
    script = transparent.nft_install()
    # made again in one transaction: a crashed run's table is replaced, never doubled
    assert script.startswith("table inet lb_transparent {}\ndelete table inet lb_transparent\n")
    assert "type filter hook prerouting priority mangle; policy accept;" in script
    # the mark bit or-ed in: other users' bits of the mark stay
    assert "meta l4proto tcp socket transparent 1 meta mark set meta mark | 0x00400000" in script
    assert transparent.nft_remove() == (
        "table inet lb_transparent {}\ndelete table inet lb_transparent\n"
    )
    rule = ["fwmark", "0x400000/0x400000", "lookup", "27746", "pref", "100"]
    assert transparent.ip_install(4) == [
        ["ip", "-4", "rule", "add", *rule],
        ["ip", "-4", "route", "replace", "local", "0.0.0.0/0", "dev", "lo", "table", "27746"],
    ]
    assert transparent.ip_install(6)[1][5] == "::/0"
    assert transparent.ip_remove(6) == (
        ["ip", "-6", "rule", "del", *rule],
        ["ip", "-6", "route", "flush", "table", "27746"],
    )
    v4, v6 = (
        one(", source: transparent"),
        parse_config(
            "services:\n  - {name: b, listen: '[::1]:80', source: transparent}\n"
        ).services[0],
    )
    udp = parse_config("services:\n  - {name: u, protocol: udp, listen: 10.0.0.1:53}\n")
    assert transparent.wanted_families([v4, one(""), *udp.services]) == {4}
    assert transparent.wanted_families([v4, v6]) == {4, 6}
    assert transparent.wanted_families([one("")]) == frozenset()


def test_source_settings_and_their_errors() -> None:
    assert one("").source_address is SourceAddress.PROXY
    assert one(", source: proxy").source_address is SourceAddress.PROXY
    assert one(", source: transparent").source_address is SourceAddress.TRANSPARENT
    # a udp flow's socket is lb's: proxy is what it is, transparent is refused
    udp = "services:\n  - {name: u, protocol: udp, listen: 10.0.0.1:53, source: SOURCE}\n"
    assert parse_config(udp.replace("SOURCE", "proxy")).services[0].source_address is (
        SourceAddress.PROXY
    )
    for text, message in (
        (
            "services:\n  - {name: a, listen: 10.0.0.1:80, source: client}\n",
            "<config>:2: services[0].source: must be one of 'proxy' or 'transparent' "
            "(got 'client')",
        ),
        (
            "services:\n  - {name: a, listen: 10.0.0.1:80, sorce: transparent}\n",
            "services[0].sorce: unknown field (did you mean 'source'?)",
        ),
        (
            udp.replace("SOURCE", "transparent"),
            "services[0].source: transparent is for tcp services only: a udp flow comes "
            "from lb's address",
        ),
        (
            "services:\n  - name: a\n    listen: 10.0.0.1:80\n    source: transparent\n"
            "    backends: [{address: 10.0.0.2:80}, {address: '[2001:db8::2]:80'}]\n",
            "<config>:5: services[0].backends[1].address: with source: transparent a backend "
            "must be IPv4, as the clients of 10.0.0.1:80 are",
        ),
    ):
        with pytest.raises(ConfigError, match=re.escape(message)):
            parse_config(text)


def test_a_transparent_service_can_be_offloaded() -> None:
    """The kernel NAT paths keep the client's address: a transparent service is what they
    do already, so `source` keeps no service in userspace (unlike the PROXY protocol)."""
    assert not_expressible(one(", retries: 0, source: transparent")) is None


# --- in namespaces (root) ----------------------------------------------------------------------


def routing(topo: Topology) -> dict[str, bool]:
    """Which parts of lb's policy routing the balancer's namespace has."""

    def out(*cmd: str) -> tuple[int, str]:
        p = subprocess.run(["ip", "netns", "exec", topo.lb, *cmd], capture_output=True, text=True)
        return p.returncode, p.stdout

    code, table = out("nft", "list", "table", "inet", "lb_transparent")
    return {
        "nft": code == 0 and "socket transparent 1" in table,
        "rule4": "fwmark 0x400000/0x400000 lookup 27746" in out("ip", "-4", "rule")[1],
        "route4": "local default dev lo" in out("ip", "-4", "route", "show", "table", "27746")[1],
        "rule6": "fwmark 0x400000/0x400000 lookup 27746" in out("ip", "-6", "rule")[1],
        "route6": "local default dev lo" in out("ip", "-6", "route", "show", "table", "27746")[1],
    }


V4_ONLY = {"nft": True, "rule4": True, "route4": True, "rule6": False, "route6": False}
NONE = dict.fromkeys(V4_ONLY, False)


async def reload(lb: LbProcess, cfg: Path, text: str, *wait: str) -> None:
    seen = len(lb.events)
    cfg.write_text(text)
    lb.signal(signal.SIGHUP)
    await lb.wait_event("config.reloaded", after=seen)
    for name in wait:
        await lb.wait_event(name, after=seen)


@pytest.mark.netns
@TOPOLOGY
async def test_backends_see_the_client_through_a_transparent_service_only(
    topo: Topology, backends: Backends, tmp_path: Path
) -> None:
    cfg = tmp_path / "lb.yaml"
    both = config_yaml([PLAIN, CLEAR], "userspace")
    cfg.write_text(both)
    async with running_lb(topo, cfg) as lb:
        assert await ask(topo, "10.99.1.2", 80) == f"10.99.2.2 saw {LB_SIDE}"
        assert await ask(topo, "10.99.1.3", 81) == "10.99.2.2 saw 10.99.1.3"
        assert routing(topo) == V4_ONLY
        # a transparent connection carries data both ways; lb's socket towards the backend
        # has the client's address, and a port of the kernel's (not the client's)
        reader, writer = await client_conn(topo, "10.99.1.4", 81, sport=40404)
        assert await asyncio.wait_for(reader.readline(), 5) == b"10.99.2.2 saw 10.99.1.4\n"
        payload = bytes(range(256)) * 2048
        writer.write(payload)
        assert await asyncio.wait_for(reader.readexactly(len(payload)), 10) == payload
        ss = subprocess.run(
            ["ip", "netns", "exec", topo.lb, "ss", "-tnH", "state", "established", "dst", BACKEND],
            capture_output=True,
            text=True,
        ).stdout.split()
        assert len(ss) == 4  # recv-q send-q local peer: one connection
        local = ss[2]
        assert local.startswith("10.99.1.4:") and local != "10.99.1.4:40404", ss
        writer.close()
        # the last transparent service goes: so does the routing
        await reload(lb, cfg, config_yaml([PLAIN], "userspace"), "transparent.routing_removed")
        assert routing(topo) == NONE
        assert await ask(topo, "10.99.1.2", 80) == f"10.99.2.2 saw {LB_SIDE}"
        # and comes back with one
        await reload(lb, cfg, both, "transparent.routing_installed")
        assert routing(topo) == V4_ONLY
        assert await ask(topo, "10.99.1.2", 81) == "10.99.2.2 saw 10.99.1.2"
        # a service turned to proxy by a reload: lb's address again, the routing gone
        await reload(
            lb,
            cfg,
            config_yaml([PLAIN, CLEAR.replace("transparent", "proxy")], "userspace"),
            "transparent.routing_removed",
        )
        assert routing(topo) == NONE
        assert await ask(topo, "10.99.1.2", 81) == f"10.99.2.2 saw {LB_SIDE}"
        await reload(lb, cfg, both, "transparent.routing_installed")
        lb.signal(signal.SIGTERM)
        assert await lb.wait() == 0
        assert any(e.get("event") == "transparent.routing_removed" for e in lb.events)
    assert routing(topo) == NONE  # shutdown left nothing behind


@pytest.mark.netns
@pytest.mark.topology(
    client_ips=["10.99.1.2", "10.99.1.3"], backend_ips=["10.99.2.2", "10.99.2.3"], vip_on="lo"
)
async def test_refused_and_timed_out_connects_are_retried_and_leak_nothing(
    topo: Topology, backends: Backends, tmp_path: Path
) -> None:
    """A transparent connect refused (a closed port) or unanswered (SYNs dropped: the
    connect timer cancels the wait) goes to the next backend, as a plain one does, and
    leaves no descriptor behind."""
    subprocess.run(
        ["ip", "netns", "exec", topo.backends, "nft", "-f", "-"],
        input="table ip lbt_drop {\n  chain in { type filter hook input priority 0;\n"
        "    ip daddr 10.99.2.3 tcp dport 8080 drop\n  }\n}\n",
        text=True,
        check=True,
    )
    entries = ["{address: 10.99.2.2:8080}", "{address: 10.99.2.2:9}", "{address: 10.99.2.3:8080}"]
    extra = (
        "    scheduler: rr\n    retries: 2\n    connect_timeout: 300ms\n    source: transparent\n"
    )
    cfg = tmp_path / "lb.yaml"
    cfg.write_text(config_yaml([service_yaml("clear", 81, entries, extra)], "userspace"))
    async with running_lb(topo, cfg) as lb:
        fds = Path(f"/proc/{lb.proc.pid}/fd")
        assert await ask(topo, "10.99.1.2", 81) == "10.99.2.2 saw 10.99.1.2"
        await asyncio.sleep(0.5)  # that connection's sockets closed
        before = len(list(fds.iterdir()))
        for i in range(9):  # rr: each backend first three times
            source = topo.client_ips[i % 2]
            assert await ask(topo, source, 81) == f"10.99.2.2 saw {source}"
        await asyncio.sleep(0.5)
        assert len(list(fds.iterdir())) <= before  # six failed attempts: no socket kept
        failed = {
            (e["backend"], e["reason"]) for e in lb.events if e["event"] == "connection.error"
        }
        assert failed == {("10.99.2.2:9", "refused"), ("10.99.2.3:8080", "timeout")}


@pytest.mark.netns
@TOPOLOGY
async def test_open_connections_of_a_removed_service_keep_the_routing_until_they_end(
    topo: Topology, backends: Backends, tmp_path: Path
) -> None:
    cfg = tmp_path / "lb.yaml"
    cfg.write_text(config_yaml([PLAIN, CLEAR], "userspace"))
    async with running_lb(topo, cfg) as lb:
        reader, writer = await client_conn(topo, "10.99.1.3", 81)
        assert await asyncio.wait_for(reader.readline(), 5) == b"10.99.2.2 saw 10.99.1.3\n"
        await reload(lb, cfg, config_yaml([PLAIN], "userspace"))
        await asyncio.sleep(2.5)  # two housekeeping ticks: the connection still needs it
        assert routing(topo) == V4_ONLY
        writer.write(b"still here")
        assert await asyncio.wait_for(reader.readexactly(10), 5) == b"still here"
        seen = len(lb.events)
        writer.close()
        await lb.wait_event("transparent.routing_removed", after=seen, timeout=10)
        assert routing(topo) == NONE


@pytest.mark.netns
@TOPOLOGY
async def test_leftovers_of_a_killed_run_are_taken_over_and_cleaned_up(
    topo: Topology, backends: Backends, tmp_path: Path
) -> None:
    cfg = tmp_path / "lb.yaml"
    cfg.write_text(config_yaml([CLEAR], "userspace"))
    async with running_lb(topo, cfg) as lb:
        lb.signal(signal.SIGKILL)
        await lb.proc.wait()
    assert routing(topo) == V4_ONLY  # killed: nothing removed it
    async with running_lb(topo, cfg) as lb:  # installed again over it, not doubled
        assert await ask(topo, "10.99.1.2", 81) == "10.99.2.2 saw 10.99.1.2"
        rules = subprocess.run(
            ["ip", "netns", "exec", topo.lb, "ip", "-4", "rule"], capture_output=True, text=True
        ).stdout
        assert rules.count("lookup 27746") == 1, rules
        lb.signal(signal.SIGKILL)
        await lb.proc.wait()
    code, out, err = await run_cli("cleanup", prefix=["ip", "netns", "exec", topo.lb])
    assert code == 0, err
    assert "deleted the IPv4 policy routing of source: transparent" in out
    assert "deleted nftables table inet lb_transparent" in out
    assert routing(topo) == NONE


@pytest.mark.netns
@TOPOLOGY
async def test_behind_a_proxy_the_source_is_the_headers(
    topo: Topology, backends: Backends, tmp_path: Path
) -> None:
    """With accept_proxy_protocol the client is who the PROXY header says (HAProxy's
    `usesrc clientip` behind `accept-proxy`); a header of the other family cannot be a
    source for an IPv4 backend: the connection's own address is."""
    cfg = tmp_path / "lb.yaml"
    cfg.write_text(
        config_yaml(
            [CLEAR.replace("    source:", "    accept_proxy_protocol: true\n    source:")],
            "userspace",
        )
    )

    async def via(header: bytes) -> bytes:
        reader, writer = await client_conn(topo, "10.99.1.2", 81)
        writer.write(header)
        try:
            return await asyncio.wait_for(reader.readline(), 5)
        finally:
            writer.close()

    async with running_lb(topo, cfg):
        # 10.99.1.30 is no address of the client's: lb's socket takes it all the same
        assert await via(b"PROXY TCP4 10.99.1.30 10.99.0.10 5555 81\r\n") == (
            b"10.99.2.2 saw 10.99.1.30\n"
        )
        assert await via(b"PROXY TCP6 2001:db8::9 2001:db8::1 5555 81\r\n") == (
            b"10.99.2.2 saw 10.99.1.2\n"
        )
        assert await via(b"PROXY UNKNOWN\r\n") == b"10.99.2.2 saw 10.99.1.2\n"


@pytest.mark.netns
@pytest.mark.topology(client_ips=["10.99.1.2"], backend_ips=["10.99.2.2"])
async def test_offloaded_or_not_the_backend_sees_the_client(
    topo: Topology, backends: Backends, tmp_path: Path
) -> None:
    """`auto` (nftables on this kernel): a transparent service is promoted like any other,
    and its backend sees the client's address in userspace and in the kernel alike."""
    cfg = tmp_path / "lb.yaml"
    clear = CLEAR.replace("    source:", "    scheduler: rr\n    retries: 0\n    source:")
    cfg.write_text(config_yaml([clear], "auto", "offload: {hold_down: 1s}\n"))
    async with running_lb(topo, cfg) as lb:
        assert (await lb.wait_event("offload.enabled"))["kernel"] == "nftables"
        assert await ask(topo, "10.99.1.2", 81) == "10.99.2.2 saw 10.99.1.2"  # userspace
        assert routing(topo) == V4_ONLY
        await lb.wait_event("offload.promote", timeout=30)
        for _ in range(50):
            table = subprocess.run(
                ["ip", "netns", "exec", topo.lb, "nft", "list", "table", "ip", "lb"],
                capture_output=True,
                text=True,
            ).stdout
            if "svc_tcp_10_99_0_10_81" in table:
                break
            await asyncio.sleep(0.1)
        assert await ask(topo, "10.99.1.2", 81) == "10.99.2.2 saw 10.99.1.2"  # the kernel
        lb.signal(signal.SIGTERM)
        assert await lb.wait() == 0
    assert routing(topo) == NONE


@pytest.fixture
async def v6(topo: Topology) -> AsyncIterator[str]:
    """IPv6 on the topology (no DAD): the client fd00:99:1::2, the backend fd00:99:2::2
    (its default route via lb), the VIP fd00:99::10 on lb's loopback; a backend on
    [fd00:99:2::2]:8080 that says which peer it saw."""
    t = topo.tag
    for ns, dev, address in (
        (topo.client, f"c{t}", "fd00:99:1::2/64"),
        (topo.lb, f"l{t}", "fd00:99:1::1/64"),
        (topo.lb, f"m{t}", "fd00:99:2::1/64"),
        (topo.backends, f"b{t}", "fd00:99:2::2/64"),
        (topo.lb, "lo", "fd00:99::10/128"),
    ):
        sh("ip", "-n", ns, "-6", "addr", "add", address, "dev", dev, "nodad")
    sh("ip", "-n", topo.client, "-6", "route", "add", "default", "via", "fd00:99:1::1")
    sh("ip", "-n", topo.backends, "-6", "route", "add", "default", "via", "fd00:99:2::1")

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(f"saw {w.get_extra_info('peername')[0]}\n".encode())
        await w.drain()
        w.close()

    with inside(topo.backends):
        sock = socket.socket(socket.AF_INET6)
    sock.bind(("fd00:99:2::2", 8080))
    server = await asyncio.start_server(handle, sock=sock)
    try:
        yield "fd00:99:1::2"
    finally:
        server.close()


@pytest.mark.netns
@TOPOLOGY
async def test_ipv6_transparent(topo: Topology, v6: str, tmp_path: Path) -> None:
    cfg = tmp_path / "lb.yaml"
    text = (
        "  - name: clear6\n    listen: '[fd00:99::10]:81'\n    source: transparent\n"
        "    backends: [{address: '[fd00:99:2::2]:8080'}]\n"
        "  - name: plain6\n    listen: '[fd00:99::10]:80'\n    backends: [{address: '[fd00:99:2::2]:8080'}]\n"
    )
    cfg.write_text(config_yaml([text], "userspace"))

    async def ask6(port: int) -> bytes:
        with inside(topo.client):
            sock = socket.socket(socket.AF_INET6)
        sock.bind((v6, 0))
        sock.setblocking(False)
        await asyncio.wait_for(
            asyncio.get_running_loop().sock_connect(sock, ("fd00:99::10", port)), 5
        )
        reader, writer = await asyncio.open_connection(sock=sock)
        try:
            return await asyncio.wait_for(reader.readline(), 5)
        finally:
            writer.close()

    async with running_lb(topo, cfg) as lb:
        assert await ask6(81) == f"saw {v6}\n".encode()
        assert await ask6(80) == b"saw fd00:99:2::1\n"
        assert routing(topo) == {
            "nft": True,
            "rule4": False,
            "route4": False,
            "rule6": True,
            "route6": True,
        }
        lb.signal(signal.SIGTERM)
        assert await lb.wait() == 0
    assert routing(topo) == NONE


@pytest.mark.netns
@TOPOLOGY
async def test_without_the_privilege_the_service_is_refused(topo: Topology, shared: Path) -> None:
    """As nobody, IP_TRANSPARENT is refused (EPERM): lb names the service and the field,
    exits 1 and binds nothing. In the balancer's namespace, so that nothing could reach
    the host's even if it were allowed."""
    cfg = shared_config(shared, config_yaml([HIGH_PLAIN, HIGH_CLEAR], "userspace"))
    code, _, err = await run_cli(
        "run", "-c", str(cfg), prefix=["ip", "netns", "exec", topo.lb, *NOBODY]
    )
    assert code == 1, err
    lines = [line for line in err.splitlines() if line.startswith("lb:")]
    assert lines == [
        "lb: service clear (tcp/10.99.0.10:8081): source: transparent: needs root or "
        "CAP_NET_ADMIN (setsockopt IP_TRANSPARENT: operation not permitted); without it "
        "set source: proxy"
    ]
    assert routing(topo) == NONE


@pytest.mark.netns
@TOPOLOGY
async def test_a_policy_routing_failure_refuses_the_service_and_says_why(
    topo: Topology, shared: Path
) -> None:
    """With CAP_NET_RAW alone the socket option is allowed but nftables and the rules are
    not: the service is refused, with nft's own words, and nothing is left."""
    cfg = shared_config(shared, config_yaml([HIGH_CLEAR], "userspace"))
    raw = ["--inh-caps=+net_raw", "--ambient-caps=+net_raw"]
    code, _, err = await run_cli(
        "run", "-c", str(cfg), prefix=["ip", "netns", "exec", topo.lb, *NOBODY, *raw]
    )
    assert code == 1, err
    lines = [line for line in err.splitlines() if line.startswith("lb:")]
    assert len(lines) == 1, err
    assert lines[0].startswith(
        "lb: service clear (tcp/10.99.0.10:8081): source: transparent: "
        "cannot add nftables table inet lb_transparent: "
    )
    assert "Operation not permitted" in lines[0]
    assert routing(topo) == NONE


@pytest.fixture
def shared() -> Iterator[Path]:
    """A directory nobody can read (unlike tmp_path, root's alone)."""
    with tempfile.TemporaryDirectory() as name:
        Path(name).chmod(0o755)
        yield Path(name)


def shared_config(where: Path, text: str) -> Path:
    cfg = where / "lb.yaml"
    cfg.write_text(text)
    cfg.chmod(0o644)
    return cfg
