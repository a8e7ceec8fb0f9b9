"""The backends and the peers of the data-plane bench: what runs in the balancer's
namespace to carry the services, and what serves behind it.

Every peer carries the same three services, on the VIP, each to backend ports that
differ from its own (port mapping):
- `http` VIP:80 -> :8080 (nginx), round robin;
- `iperf` VIP:5201 TCP and UDP -> :5301 (iperf3 -s), source hash: an iperf3 test is a
  control connection plus data connections (or a UDP flow) that must reach one server;
- `sockperf` VIP:11111 TCP and UDP -> :11211 (sockperf server), round robin.
`direct` has no balancer: the client talks to the first backend, through the balancer's
namespace as a plain router (the same devices and hops, no NAT, no proxy).

IPVS (kernel NAT, only in the VM of the kernel tier) would be one more Peer here: `lb run
--dataplane ipvs` with the lb configuration below, measured in the VM (not written).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.parse import proc_pid_stat, proc_status_rss_kb
from bench.topology import BALANCER_NS, CLIENT_IP, CLIENT_NS, VIP, Topology, sh
from offload.netns import inside


@dataclass(frozen=True)
class Svc:
    name: str
    port: int  # on the VIP
    backend_port: int
    udp: bool  # also a UDP service on the same port
    sticky: bool  # source hash instead of round robin


HTTP = Svc("http", 80, 8080, udp=False, sticky=False)
#: The backends' nginx also listens here with `proxy_protocol`: the http service's port
#: for the peers that send a PROXY protocol header (iperf3 and sockperf cannot read one)
HTTP_PROXY_PORT = 8081
IPERF = Svc("iperf", 5201, 5301, udp=True, sticky=True)
SOCKPERF = Svc("sockperf", 11111, 11211, udp=True, sticky=False)
SERVICES = (HTTP, IPERF, SOCKPERF)
ADMIN = "127.0.0.1:9090"  # lb's admin API, in the balancer's namespace


class Proc:
    """A process the bench started; stopped by its pid, TERM then KILL."""

    def __init__(self, what: str, proc: asyncio.subprocess.Process, log: Path) -> None:
        self.what = what
        self.proc = proc
        self.log = log

    @classmethod
    async def start(cls, what: str, cmd: list[str], log: Path) -> Proc:
        with log.open("wb") as out:
            proc = await asyncio.create_subprocess_exec(
                *cmd,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C reaches the bench, which stops it
            )
        return cls(what, proc, log)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def failed(self) -> str | None:
        """Why it is gone: its exit status and its log's last line (a traceback's error)."""
        if self.proc.returncode is None:
            return None
        lines = [x for x in self.log.read_text(errors="replace").splitlines() if x.strip()]
        return f"{self.what} exited ({self.proc.returncode}): {lines[-1] if lines else ''}"

    async def stop(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()


def process_tree(pid: int) -> list[int]:
    """A process and every descendant still alive: nginx's worker, say, is the master's
    child."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                parents[int(entry)] = proc_pid_stat(f.read())[0]
        except (OSError, ValueError):
            continue
    out = []
    for p in parents:
        q = p
        while q and q != pid:
            q = parents.get(q, 0)
        if q == pid:
            out.append(p)
    return out


def tree_cpu_ticks(pid: int) -> int:
    """CPU ticks of a process tree (each process's own and its reaped children's)."""
    total = 0
    for p in process_tree(pid):
        with contextlib.suppress(OSError, ValueError), open(f"/proc/{p}/stat") as f:
            total += proc_pid_stat(f.read())[1]
    return total


def tree_rss_kb(pid: int) -> int:
    """Resident memory of a process tree, kB (VmRSS: shared pages counted in each)."""
    total = 0
    for p in process_tree(pid):
        with contextlib.suppress(OSError, ValueError), open(f"/proc/{p}/status") as f:
            total += proc_status_rss_kb(f.read())
    return total


async def reachable(host: str, port: int, within: float = 30.0) -> None:
    """Wait until host:port accepts a TCP connection from the client's namespace."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        with inside(CLIENT_NS):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(s, (host, port)), 1)
            return
        except (OSError, TimeoutError):
            if loop.time() > deadline:
                raise RuntimeError(f"{host}:{port} not reachable within {within:g}s") from None
            await asyncio.sleep(0.1)
        finally:
            s.close()


# --- backends -------------------------------------------------------------------------------


def nginx_backend_conf(work: Path, ip: str, port: int) -> str:
    """A tiny static answer with keep-alive, one worker, nothing logged; at /addr, the
    client's address as the backend sees it (the connection's peer on `port`; on
    HTTP_PROXY_PORT, the one its PROXY protocol header gives), so that a peer's address
    option can be checked."""
    tmp = work / "tmp"
    return f"""worker_processes 1;
daemon off;
pid {work}/nginx.pid;
error_log stderr warn;
worker_rlimit_nofile 65536;
events {{ worker_connections 16384; }}
http {{
  access_log off;
  keepalive_requests 100000000;
  keepalive_timeout 60s;
  client_body_temp_path {tmp}; proxy_temp_path {tmp}; fastcgi_temp_path {tmp};
  uwsgi_temp_path {tmp}; scgi_temp_path {tmp};
  server {{
    listen {ip}:{port} backlog=8192;
    location / {{ default_type text/plain; return 200 "ok\\n"; }}
    location = /addr {{ default_type text/plain; return 200 "$remote_addr\\n"; }}
  }}
  server {{
    listen {ip}:{HTTP_PROXY_PORT} proxy_protocol backlog=8192;
    location / {{ default_type text/plain; return 200 "ok\\n"; }}
    location = /addr {{ default_type text/plain; return 200 "$proxy_protocol_addr\\n"; }}
  }}
}}
"""


async def start_backends(topo: Topology, work: Path) -> list[Proc]:
    procs: list[Proc] = []
    for i, ip in enumerate(topo.backend_ips):
        d = work / f"backend{i}"
        (d / "tmp").mkdir(parents=True, exist_ok=True)
        conf = d / "nginx.conf"
        conf.write_text(nginx_backend_conf(d, ip, HTTP.backend_port))
        for what, cmd in (
            ("nginx", ["nginx", "-p", str(d), "-c", str(conf), "-e", "stderr"]),
            ("iperf3", ["iperf3", "-s", "-B", ip, "-p", str(IPERF.backend_port)]),
            ("sockperf-tcp", ["sockperf", "server", "--tcp", "-i", ip, "-p", "11211"]),
            ("sockperf-udp", ["sockperf", "server", "-i", ip, "-p", "11211"]),
        ):
            log = d / f"{what}.log"
            procs.append(await Proc.start(f"backend {i} {what}", topo.on_backend(i, *cmd), log))
    for ip in topo.backend_ips:
        for port in (*(svc.backend_port for svc in SERVICES), HTTP_PROXY_PORT):
            await reachable(ip, port)
    return procs


async def seen_by_backend(host: str, port: int) -> str:
    """The client's address as the http backend saw it (its answer), asked from the
    client's namespace."""
    loop = asyncio.get_running_loop()
    with inside(CLIENT_NS):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setblocking(False)
    try:
        async with asyncio.timeout(5):
            await loop.sock_connect(s, (host, port))
            await loop.sock_sendall(s, b"GET /addr HTTP/1.0\r\nHost: bench\r\n\r\n")
            answer = b""
            while chunk := await loop.sock_recv(s, 4096):
                answer += chunk
    finally:
        s.close()
    return answer.partition(b"\r\n\r\n")[2].decode(errors="replace").strip()


# --- peers ----------------------------------------------------------------------------------


class Peer:
    """Something that carries the services from the VIP to the backends."""

    name = ""
    udp = True  # carries UDP services
    userspace = False  # a process relays the bytes, else the kernel (results.json "kinds")
    local_vip = False  # the VIP must be a local address of the balancer (proxies bind it)
    #: an address option's peer: the same proxy without it (its cost is taken against it)
    plain = ""
    #: what the http backend must see as the client's address (checked once started)
    backend_sees = ""

    def __init__(self) -> None:
        self.procs: list[Proc] = []
        #: workloads the peer does not change from its plain one, and why (not measured)
        self.same_as_plain: dict[str, str] = {}

    def target(self, svc: Svc, topo: Topology) -> tuple[str, int]:
        return VIP, svc.port

    async def start(self, topo: Topology, work: Path) -> None:
        """Start carrying; return once every TCP service answers."""

    async def stop(self, topo: Topology) -> None:
        for p in self.procs:
            await p.stop()
        self.procs = []

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def failed(self) -> str | None:
        return next((f for p in self.procs if (f := p.failed())), None)

    async def _ready(self, topo: Topology) -> None:
        for svc in SERVICES:
            host, port = self.target(svc, topo)
            try:
                await reachable(host, port)
            except RuntimeError as e:
                raise RuntimeError(f"{self.name}: {e}; {self.failed() or ''}") from None
        if self.backend_sees:  # the address option is in effect, or nothing is measured
            try:
                seen = await seen_by_backend(*self.target(HTTP, topo))
            except (OSError, TimeoutError) as e:
                raise RuntimeError(f"{self.name}: http: {e}") from None
            if seen != self.backend_sees:
                raise RuntimeError(
                    f"{self.name}: the backend saw the client as {seen!r}, not {self.backend_sees}"
                )


class Direct(Peer):
    name = "direct"

    def target(self, svc: Svc, topo: Topology) -> tuple[str, int]:
        return topo.backend_ips[0], svc.backend_port


def nft_dnat_script(topo: Topology) -> str:
    """A hand-written DNAT rule per service: numgen round robin (jhash of the client for
    the sticky one) over a map of slot -> backend address . port. The hash has a fixed
    seed (else the kernel draws one per rule) so that TCP and UDP pick the same backend."""
    n = len(topo.backend_ips)
    rules = []
    for svc in SERVICES:
        pick = f"jhash ip saddr mod {n} seed 0x1" if svc.sticky else f"numgen inc mod {n}"
        slots = ", ".join(
            f"{i} : {ip} . {svc.backend_port}" for i, ip in enumerate(topo.backend_ips)
        )
        for proto in ("tcp", "udp") if svc.udp else ("tcp",):
            rules.append(
                f"    ip daddr {VIP} {proto} dport {svc.port} dnat ip to {pick} map {{ {slots} }}"
            )
    return (
        "table ip lbbench {\n  chain prerouting {\n"
        "    type nat hook prerouting priority dstnat; policy accept;\n"
        + "\n".join(rules)
        + "\n  }\n}\n"
    )


class NftDnat(Peer):
    name = "nftables DNAT"

    async def start(self, topo: Topology, work: Path) -> None:
        await sh("ip", "netns", "exec", BALANCER_NS, "nft", "-f", "-", stdin=nft_dnat_script(topo))
        await self._ready(topo)

    async def stop(self, topo: Topology) -> None:
        await sh(
            "ip", "netns", "exec", BALANCER_NS, "nft", "delete", "table", "ip", "lbbench",
            check=False,
        )  # fmt: skip


def haproxy_conf(topo: Topology, *, transparent: bool = False, send_proxy: bool = False) -> str:
    """`transparent`: every backend connected from the client's address (`source 0.0.0.0
    usesrc clientip`); `send_proxy`: the http service sends a PROXY protocol v2 header
    (`send-proxy-v2`) to the backends' HTTP_PROXY_PORT."""
    parts = [
        "global\n  nbthread 1\n  maxconn 9000\n",  # 2 fds each, within the fd limit
        "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n",
    ]
    for svc in SERVICES:
        port, extra = svc.backend_port, ""
        if send_proxy and svc is HTTP:
            port, extra = HTTP_PROXY_PORT, " send-proxy-v2"
        servers = "".join(
            f"  server b{i} {ip}:{port}{extra}\n" for i, ip in enumerate(topo.backend_ips)
        )
        balance = "source" if svc.sticky else "roundrobin"
        source = "  source 0.0.0.0 usesrc clientip\n" if transparent else ""
        parts.append(
            f"frontend {svc.name}\n  bind {VIP}:{svc.port}\n  default_backend {svc.name}\n"
            f"backend {svc.name}\n  balance {balance}\n{source}{servers}"
        )
    return "\n".join(parts)


#: The address options' peers measure the http service's connections and requests (and the
#: system calls per connection): the PROXY header goes to the http service only (iperf3
#: and sockperf cannot read one), and neither option concerns UDP
_PROXY_V2_SAME = {
    "bulk": "the PROXY header is sent on the http service only",
    "udp": "the PROXY header is sent on the http service only",
}
_TRANSPARENT_SAME = {"udp": "source: transparent is for TCP only"}


class Haproxy(Peer):
    name = "haproxy"
    udp = False  # HAProxy has no UDP proxy
    userspace = True
    local_vip = True

    def __init__(self, option: str = "") -> None:
        super().__init__()
        self.option = option
        if option:
            self.name = f"haproxy {option}"
            self.plain = "haproxy"
            self.backend_sees = CLIENT_IP
            self.same_as_plain = _PROXY_V2_SAME if option == "send-proxy-v2" else {}

    async def start(self, topo: Topology, work: Path) -> None:
        transparent = self.option == "usesrc clientip"
        if transparent:  # lb's policy routing, as lb run would make it (stop removes it)
            await transparent_routing(True)
        conf = work / "haproxy.cfg"
        conf.write_text(
            haproxy_conf(topo, transparent=transparent, send_proxy=self.option == "send-proxy-v2")
        )
        cmd = topo.on_balancer("haproxy", "-db", "-f", str(conf))
        self.procs = [await Proc.start(self.name, cmd, work / "haproxy.log")]
        await self._ready(topo)

    async def stop(self, topo: Topology) -> None:
        await super().stop(topo)
        if self.option == "usesrc clientip":
            await transparent_routing(False)


async def transparent_routing(on: bool) -> None:
    """In the balancer's namespace, the policy routing that delivers a backend's replies
    to a socket bound to the client's address (HAProxy's `usesrc clientip` needs it; lb
    makes the same itself for `source: transparent`: lb/proxy/transparent.py)."""
    from lb.proxy import transparent as t

    ns = ("ip", "netns", "exec", BALANCER_NS)
    rule_del, flush = t.ip_remove(4)
    for _ in range(t.MAX_RULE_DELETIONS):  # until there is none: a leftover is not doubled
        try:
            await sh(*ns, *rule_del)
        except RuntimeError:
            break
    await sh(*ns, *flush, check=False)
    if on:
        await sh(*ns, "nft", "-f", "-", stdin=t.nft_install())
        for cmd in t.ip_install(4):
            await sh(*ns, *cmd)
    else:
        await sh(*ns, "nft", "-f", "-", stdin=t.nft_remove(), check=False)


def nginx_stream_conf(topo: Topology, work: Path) -> str:
    blocks = []
    for svc in SERVICES:
        servers = "".join(f"    server {ip}:{svc.backend_port};\n" for ip in topo.backend_ips)
        pick = "    hash $remote_addr;\n" if svc.sticky else ""
        blocks.append(f"  upstream {svc.name} {{\n{pick}{servers}  }}\n")
        blocks.append(f"  server {{ listen {VIP}:{svc.port}; proxy_pass {svc.name}; }}\n")
        if svc.udp:
            blocks.append(f"  server {{ listen {VIP}:{svc.port} udp; proxy_pass {svc.name}; }}\n")
    return (
        "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n"
        f"worker_processes 1;\ndaemon off;\npid {work}/nginx-lb.pid;\nerror_log stderr warn;\n"
        "worker_rlimit_nofile 200000;\nevents { worker_connections 100000; }\n"
        "stream {\n" + "".join(blocks) + "}\n"
    )


class NginxStream(Peer):
    name = "nginx stream"
    userspace = True
    local_vip = True

    async def start(self, topo: Topology, work: Path) -> None:
        conf = work / "nginx-lb.conf"
        conf.write_text(nginx_stream_conf(topo, work))
        cmd = topo.on_balancer("nginx", "-p", str(work), "-c", str(conf), "-e", "stderr")
        self.procs = [await Proc.start("nginx stream", cmd, work / "nginx-lb.log")]
        await self._ready(topo)


#: How long lb may take to carry every service (in the kernel VM, whose CPU is emulated,
#: Python's imports alone take half a minute)
START_TIMEOUT = 180.0


def lb_yaml(topo: Topology, offload: str = "", option: str = "") -> str:
    """One lb configuration for both of lb's dataplanes: `retries: 0` so that the kernel
    can carry the TCP services (docs/dataplanes/ipvs.md), no health checks (always UP);
    `offload`: the `offload:` settings, if not the defaults; `option`: an address option,
    `transparent` (`source: transparent` on every TCP service) or `proxy v2`
    (`proxy_protocol: v2` on the http service, to the backends' HTTP_PROXY_PORT)."""
    out = [f"dataplane: userspace\nshutdown_grace: 1s\nadmin: {{listen: {ADMIN}}}\n"]
    if offload:
        out.append(f"offload: {{{offload}}}\n")
    out.append("services:\n")
    for svc in SERVICES:
        sched = "sh" if svc.sticky else "rr"
        for proto in ("tcp", "udp") if svc.udp else ("tcp",):
            port, extra = svc.backend_port, ""
            if proto == "tcp":
                extra = "    retries: 0\n"
                if option == "transparent":
                    extra += "    source: transparent\n"
                elif option == "proxy v2" and svc is HTTP:
                    port, extra = HTTP_PROXY_PORT, extra + "    proxy_protocol: v2\n"
            backends = "".join(f"      - address: {ip}:{port}\n" for ip in topo.backend_ips)
            out.append(
                f"  - name: {svc.name}-{proto}\n    protocol: {proto}\n"
                f"    listen: {VIP}:{svc.port}\n    scheduler: {sched}\n{extra}"
                f"    backends:\n{backends}"
            )
    return "".join(out)


def lb_services_carried(listing: str) -> dict[str, str]:
    """Service name -> dataplane, from `lb list --json`."""
    doc = json.loads(listing)
    services = doc["services"] if isinstance(doc, dict) else doc
    return {s["name"]: s["dataplane"] for s in services}


class Lb(Peer):
    def __init__(
        self, dataplane: str, variant: str = "", offload: str = "", option: str = ""
    ) -> None:
        super().__init__()
        self.dataplane = dataplane
        self.offload = offload
        self.option = option
        self.name = f"lb {dataplane}{' ' + variant if variant else ''}"
        self.userspace = dataplane == "userspace"
        self.local_vip = dataplane == "userspace"  # the kernel ones put the VIP on lb0
        if option:
            self.plain = f"lb {dataplane}"
            self.backend_sees = CLIENT_IP
            self.same_as_plain = _PROXY_V2_SAME if option == "proxy v2" else _TRANSPARENT_SAME

    async def start(self, topo: Topology, work: Path) -> None:
        conf = work / "lb.yaml"
        conf.write_text(lb_yaml(topo, self.offload, self.option))
        lb = str(Path(sys.executable).with_name("lb"))
        await sh(lb, "check", "-q", "-c", str(conf))
        cmd = topo.on_balancer(
            lb, "run", "-c", str(conf), "--dataplane", self.dataplane, "--log-format", "json"
        )
        self.procs = [await Proc.start(self.name, cmd, work / f"lb-{self.dataplane}.log")]
        # Measure only once lb says every service is carried where asked (the kernel for
        # nftables: all of them are expressible).
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT
        listing = ""
        while loop.time() < deadline:
            if failed := self.failed():
                raise RuntimeError(failed)
            listing = await sh(
                "ip", "netns", "exec", BALANCER_NS, lb, "list", "-n", "--json",
                "--admin", ADMIN, check=False,
            )  # fmt: skip
            with contextlib.suppress(ValueError, KeyError, TypeError):
                carried = lb_services_carried(listing)
                if len(carried) == 5 and set(carried.values()) == {self.dataplane}:
                    break
            await asyncio.sleep(0.2)
        else:
            raise RuntimeError(f"{self.name}: services not all on {self.dataplane}: {listing}")
        await self._ready(topo)


class LbAt(Lb):
    """lb userspace run from another copy of its packages (`path` on PYTHONPATH): two
    versions of lb side by side in one run (bench/results/2026-12-08)."""

    def __init__(self, name: str, path: str) -> None:
        super().__init__("userspace")
        self.name = name
        self.path = path

    async def start(self, topo: Topology, work: Path) -> None:
        plain = topo.on_balancer

        def with_path(*cmd: str) -> list[str]:
            return plain("env", f"PYTHONPATH={self.path}", *cmd)

        topo.on_balancer = with_path  # type: ignore[method-assign]
        try:
            await super().start(topo, work)
        finally:
            topo.on_balancer = plain  # type: ignore[method-assign]


def all_peers() -> dict[str, Peer]:
    peers: list[Peer] = [
        Direct(),
        NftDnat(),
        Haproxy(),
        NginxStream(),
        Lb("userspace"),
        Lb("userspace", "transparent", option="transparent"),
        Lb("userspace", "proxy v2", option="proxy v2"),
        Haproxy("usesrc clientip"),
        Haproxy("send-proxy-v2"),
        Lb("nftables"),  # with the flowtable on a kernel that has flowtables (the VM's)
        Lb("nftables", "no flowtable", "flow_threshold: 0"),
        Lb("ipvs"),
    ]
    return {p.name: p for p in peers}


#: Every peer the bench knows
ALL_PEERS = tuple(all_peers())
#: The host's peers, the default: `lb ipvs` needs a kernel with IPVS, which the data plane
#: in the kernel VM has (bench/vm.py); this machine's kernel has no flowtables, so lb
#: nftables runs without one here whatever its flow_threshold: one of them is enough
#: The address options' peers (lb's and HAProxy's, each beside its plain one): asked for
#: by name with --peers, not run by default
OPTION_PEERS = (
    "lb userspace transparent",
    "lb userspace proxy v2",
    "haproxy usesrc clientip",
    "haproxy send-proxy-v2",
)
PEERS = tuple(
    p for p in ALL_PEERS if p not in ("lb ipvs", "lb nftables no flowtable", *OPTION_PEERS)
)
#: The peers of the data plane in the kernel VM: the references, and lb on IPVS beside lb
#: in userspace, and lb nftables with its flowtable (the guest's kernel has flowtables)
#: and without (an emulated CPU makes each round long, so only these)
VM_PEERS = (
    "direct",
    "haproxy",
    "lb userspace",
    "lb ipvs",
    "lb nftables",
    "lb nftables no flowtable",
)
