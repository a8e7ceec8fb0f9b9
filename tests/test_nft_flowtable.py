"""The nftables fast path (`offload.flow_threshold`): the flowtable and its forward rule as
rendered (pure), the dataplane keeping its devices current and saying once when the
kernel has no flowtables (fake nft), and on this machine's own kernel, which has none,
lb running without it (real namespaces, needs root). The flowtable on a kernel that has
one: tests/kernel/test_flowtable.py, in the VM."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path
from typing import Any

import pytest

from lb.changes import Changes
from lb.config import ConfigError, parse_config
from lb.model import OffloadSettings, Service
from offload.conntrack import parse_flows
from offload.netns import inside
from offload.nft_netlink import NftNetlink
from offload.nft_rules import (
    FLOWTABLE,
    AddFlowtableDevices,
    FastPath,
    base_script,
    probe_flowtable_script,
)
from offload.nftables import NftDataplane, NftError
from tests.support.doubles import apply_diff
from tests.support.netns import Topology
from tests.support.traffic import Backends, ask, config_yaml, running_lb, service_yaml

WEB = """
services:
  - name: web
    listen: 10.99.0.10:80
    retries: 0
    backends: [{address: "10.99.2.2:8080"}, {address: "10.99.2.3:8080"}]
"""


def web() -> Service:
    (s,) = parse_config(WEB).services
    return s


# --- the setting -----------------------------------------------------------------------------


def test_flow_threshold_defaults_to_kep_4963s_twenty_and_zero_turns_it_off() -> None:
    assert parse_config(WEB).offload.flow_threshold == 20 == OffloadSettings().flow_threshold
    assert parse_config(WEB + "offload: {flow_threshold: 0}\n").offload.flow_threshold == 0
    for bad in ("-1", "1.5", '"20"', "2000000"):
        with pytest.raises(ConfigError, match="flow_threshold"):
            parse_config(WEB + f"offload: {{flow_threshold: {bad}}}\n")


# --- rendering -------------------------------------------------------------------------------


def table_lb(lines: list[str]) -> list[str]:
    end = lines.index("}")
    return lines[:end]


def test_the_flowtable_and_its_forward_rule_in_table_lb() -> None:
    lines = base_script((), FastPath(20, frozenset({"eth1", "eth0", "veth.2"})))
    lb = table_lb(lines)
    assert (
        f'    flowtable {FLOWTABLE} {{ hook ingress priority filter; devices = {{ "eth0", "eth1", '
        f'"veth.2" }}; counter; }}'
    ) in lb
    start = lb.index("    chain forward {")
    assert lb[start + 1] == "        type filter hook forward priority filter; policy accept;"
    # only lb's own flows: found in `conns` by original VIP:port and backend, per protocol,
    # once past the threshold
    for proto, line in zip(("tcp", "udp"), lb[start + 2 : start + 4], strict=True):
        assert line == (
            f"        meta l4proto {proto} ct packets > 20 ct original ip daddr . meta "
            "l4proto . ct original proto-dst . ct reply ip saddr . ct reply proto-src "
            f"@conns flow add @{FLOWTABLE}"
        )
    assert lb[start + 4] == "    }"
    # the service tables are the same with or without it
    assert lines[len(lb) :] == base_script(())[len(table_lb(base_script(()))) :]


def test_no_flowtable_without_a_fast_path_and_none_of_no_device() -> None:
    assert not any("flowtable" in x or "forward" in x for x in base_script(()))
    (line,) = [x for x in base_script((), FastPath(5)) if "flowtable" in x]
    assert "devices" not in line and "counter;" in line


def test_devices_that_appear_are_added_to_the_flowtable() -> None:
    op = AddFlowtableDevices(frozenset({"b", "a"}))
    assert op.nft() == (
        'add flowtable ip lb ft { hook ingress priority filter; devices = { "a", "b" }; }'
    )


def test_the_probe_leaves_nothing_behind() -> None:
    script = probe_flowtable_script()
    assert "flowtable ft { hook ingress priority filter; }" in script
    assert script.rstrip().endswith("delete table ip lb_probe")


# --- the dataplane, with a fake nft ----------------------------------------------------------


class FakeNft:
    def __init__(self, flowtables: bool = True) -> None:
        self.scripts: list[str] = []
        self.flowtables = flowtables
        self.refuse: str | None = None

    async def __call__(self, script: str) -> str:
        if self.refuse is not None and self.refuse in script:
            raise NftError("Could not process rule: No such file or directory")
        if "flowtable" in script and not self.flowtables:
            raise NftError("Could not process rule: No such file or directory")
        self.scripts.append(script)
        return ""

    async def query(self, *args: str) -> Any:
        return {"nftables": []}


def dataplane(
    nft: FakeNft, devices: set[str], threshold: int = 20, acct: list[int] | None = None
) -> NftDataplane:
    return NftDataplane(
        nft,
        nft.query,
        flow_threshold=threshold,
        device="lb0",
        devices=lambda: set(devices),
        acct=lambda: (acct if acct is not None else []).append(1),
    )


async def test_the_flowtable_on_every_device_but_lo_and_lbs_own_kept_current() -> None:
    nft, devices, acct = FakeNft(), {"lo", "lb0", "eth0", "eth1"}, list[int]()
    dp = dataplane(nft, devices, acct=acct)
    await dp.probe()
    assert dp.fastpath and dp.flowtable_unavailable is None
    await dp.apply([web()], Changes([web()], []))
    assert 'devices = { "eth0", "eth1" }; counter; }' in nft.scripts[-1]
    assert acct, "conntrack accounting on, for `ct packets`"
    assert dp.fastpath_note() == "flowtable ft after 20 packets, on eth0, eth1"
    # a link comes: added at the next refresh; one goes: the kernel took it out itself
    devices |= {"veth7"}
    devices -= {"eth1"}
    n = len(nft.scripts)
    await dp.refresh()
    assert nft.scripts[n:] == [
        'add flowtable ip lb ft { hook ingress priority filter; devices = { "veth7" }; }\n'
    ]
    await dp.refresh()
    assert len(nft.scripts) == n + 1  # nothing new: nothing sent
    # a device that vanished before the write: tried again at the next refresh
    devices |= {"gone"}
    nft.refuse = '"gone"'
    await dp.refresh()
    nft.refuse = None
    devices -= {"gone"}
    devices |= {"new"}
    await dp.refresh()
    assert nft.scripts[-1].startswith("add flowtable") and '{ "new" }' in nft.scripts[-1]
    # a rebuild writes the devices there are then
    dp._rendered = None
    await dp.apply([web()], Changes([web()], []))
    assert 'devices = { "eth0", "new", "veth7" }' in nft.scripts[-1]  # one nft -f


async def test_a_kernel_without_flowtables_is_said_once_and_lb_runs_without(
    caplog: pytest.LogCaptureFixture,
) -> None:
    nft = FakeNft(flowtables=False)
    dp = dataplane(nft, {"lo", "eth0"})
    with caplog.at_level(logging.INFO, logger="lb.offload"):
        await dp.probe()
        await dp.apply([web()], Changes([web()], []))
        await dp.refresh()
        await dp.refresh()
    said = [r for r in caplog.records if getattr(r, "event", "") == "nft.flowtable_unavailable"]
    assert len(said) == 1 and "No such file or directory" in said[0].getMessage()
    assert not dp.fastpath
    assert dp.fastpath_note().startswith("no flowtable: this kernel has no flowtables")
    assert not any("flowtable" in s for s in nft.scripts)
    assert any("svc_tcp_10_99_0_10_80" in s for s in nft.scripts)  # the service is there


async def test_threshold_zero_means_no_flowtable_and_no_probe() -> None:
    nft = FakeNft()
    dp = dataplane(nft, {"lo", "eth0"}, threshold=0)
    await dp.probe()
    await dp.apply([web()], Changes([web()], []))
    await dp.refresh()
    assert not any("flowtable" in s or "forward" in s for s in nft.scripts)
    assert dp.fastpath_note() == "no flowtable (offload.flow_threshold: 0)"


def test_offloaded_flows_count_as_active() -> None:
    """conntrack lists a flow in the flowtable without timeout or state, with [OFFLOAD]
    (the first line as Debian's 6.1 kernel and conntrack 1.4.7 printed it in the VM): an
    offloaded TCP flow is established (the flowtable lets go of it at FIN or RST)."""
    text = (
        "tcp      6 src=10.99.1.2 dst=10.99.0.10 sport=35728 dport=80 packets=19 "
        "bytes=157145 src=10.99.2.2 dst=10.99.1.2 sport=8080 dport=35728 packets=9 bytes=476 "
        "[OFFLOAD] mark=0 use=2\n"
        "tcp      6 86399 ESTABLISHED src=10.99.1.3 dst=10.99.0.10 sport=40001 dport=80 "
        "src=10.99.2.3 dst=10.99.1.3 sport=8080 dport=40001 [OFFLOAD] mark=0 use=2\n"
        "udp      17 src=10.99.1.2 dst=10.99.0.10 sport=4000 dport=53 "
        "src=10.99.2.5 dst=10.99.1.2 sport=5353 dport=4000 [OFFLOAD] mark=0 use=2\n"
    )
    flows = parse_flows(text)
    assert [(str(f.backend), f.established) for f in flows] == [
        ("10.99.2.2:8080", True),
        ("10.99.2.3:8080", True),
        ("10.99.2.5:5353", False),
    ]


# --- this machine's kernel (no flowtables here) ----------------------------------------------


def nft_in(topo: Topology, *args: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", topo.lb, "nft", *args], check=True, capture_output=True, text=True
    ).stdout


@pytest.mark.netns
@pytest.mark.topology(vip_on="lo", ip_forward=True)
async def test_this_kernel_without_flowtables_lb_says_so_and_forwards(
    topo: Topology, backends: Backends, caplog: pytest.LogCaptureFixture
) -> None:
    dp = NftDataplane(netlink=NftNetlink(topo.lb), flow_threshold=20, device="lb0")
    with caplog.at_level(logging.INFO, logger="lb.offload"), inside(topo.lb):
        await dp.probe()
        await apply_diff(dp, [web()])
    answers = [await ask(topo, "10.99.1.2") for _ in range(4)]
    assert all(a.endswith("saw 10.99.1.2") for a in answers), answers
    ruleset = nft_in(topo, "list", "ruleset")
    assert "lb_probe" not in ruleset  # the probe left nothing behind
    said = [r for r in caplog.records if getattr(r, "event", "") == "nft.flowtable_unavailable"]
    if dp.flowtable_unavailable is None:  # a kernel with flowtables: lb's table has one
        assert not said and f"flowtable {FLOWTABLE}" in ruleset
        return
    assert "No such file or directory" in dp.flowtable_unavailable
    assert len(said) == 1 and "flowtable" not in ruleset
    with inside(topo.lb):
        await dp.remove_all()


def test_the_bench_measures_lb_nftables_with_and_without_its_flowtable() -> None:
    from bench.peers import VM_PEERS, Lb, all_peers, lb_yaml
    from bench.topology import Topology as BenchTopology

    peers = all_peers()
    plain, without = peers["lb nftables"], peers["lb nftables no flowtable"]
    assert isinstance(plain, Lb) and isinstance(without, Lb)
    assert {plain.name, without.name} <= set(VM_PEERS)
    topo = BenchTopology()
    assert parse_config(lb_yaml(topo, plain.offload)).offload.flow_threshold == 20
    assert parse_config(lb_yaml(topo, without.offload)).offload.flow_threshold == 0


@pytest.mark.netns
async def test_lb_run_on_this_kernel_says_once_that_it_runs_without_a_flowtable(
    topo: Topology, backends: Backends, tmp_path: Path
) -> None:
    cfg = tmp_path / "lb.yaml"
    web = service_yaml("web", 80, ["{address: 10.99.2.2:8080}"], "    retries: 0\n")
    cfg.write_text(config_yaml([web], "nftables"))
    async with running_lb(topo, cfg) as lb:
        await ask(topo, "10.99.1.2")
        enabled = next(e for e in lb.events if e.get("event") == "offload.enabled")
        said = [e for e in lb.events if e.get("event") == "nft.flowtable_unavailable"]
        if "(flowtable ft after 20 packets" in enabled["msg"]:
            assert not said  # a kernel with flowtables
            return
        assert "no flowtable: this kernel has no flowtables" in enabled["msg"], enabled
        assert len(said) == 1 and "No such file or directory" in said[0]["msg"], said
