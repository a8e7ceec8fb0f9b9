"""`lb offload plan`: what it prints for a small config under each dataplane, without root
(`lb cleanup` needs root and runs in tests/test_nft_offload.py and the kernel tier)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lb.config import load_config
from lb.model import Config
from offload.commands import plan

CONFIG = """\
dataplane: {mode}
services:
  - name: web
    listen: 10.0.0.1:80
    scheduler: wrr
    retries: 0
    persistence: {{timeout: 300s, netmask: 255.255.255.0}}
    backends:
      - {{address: 10.0.1.1:8080, weight: 3}}
      - {{address: 10.0.1.2:8080, weight: 1, max_connections: 100}}
  - name: dns
    protocol: udp
    listen: 10.0.0.1:53
    scheduler: sh
    scheduler_flags: [sh-port]
    backends: [{{address: 10.0.1.3:5353}}]
  - name: api
    listen: 10.0.0.2:443
    backends: [{{address: 10.0.1.4:8443}}]
"""

#: What IPVS gets, as `ipvsadm-save -n` would print it: backends in the file's order.
IPVS_RULES = [
    "-A -t 10.0.0.1:80 -s wrr -p 300 -M 255.255.255.0",
    "-a -t 10.0.0.1:80 -r 10.0.1.1:8080 -m -w 3",
    "-a -t 10.0.0.1:80 -r 10.0.1.2:8080 -m -w 1 -x 100",
    "-A -u 10.0.0.1:53 -s sh -b sh-port",
    "-a -u 10.0.0.1:53 -r 10.0.1.3:5353 -m -w 1",
]
API_STAYS = (
    "#   api (tcp 10.0.0.2:443): connect retry is userspace-only "
    "(retries: 1; set retries: 0 to offload)"
)


def config(tmp_path: Path, mode: str) -> tuple[Config, Path]:
    path = tmp_path / "lb.yaml"
    path.write_text(CONFIG.format(mode=mode))
    return load_config(path), path


def test_ipvs_plan_is_the_ipvsadm_rules_and_what_stays_in_userspace(tmp_path: Path) -> None:
    cfg, path = config(tmp_path, "ipvs")
    assert plan(cfg, cfg.dataplane).splitlines() == [
        f"# lb offload plan for {path} (dataplane ipvs)",
        *IPVS_RULES,
        "# stays in userspace:",
        API_STAYS,
    ]


@pytest.mark.parametrize(
    ("mode", "note"),
    [
        ("userspace", "# dataplane userspace: nothing goes to the kernel; with ipvs or auto it"),
        ("auto", "# auto: each service below moves to IPVS (nftables where the kernel has no"),
    ],
)
def test_userspace_and_auto_plans_say_what_ipvs_would_get(
    tmp_path: Path, mode: str, note: str
) -> None:
    cfg, path = config(tmp_path, mode)
    header, line, *rest = plan(cfg, cfg.dataplane).splitlines()
    assert header == f"# lb offload plan for {path} (dataplane {mode})"
    assert line.startswith(note)
    assert rest == [*IPVS_RULES, "# stays in userspace:", API_STAYS]


def test_nftables_plan_is_the_first_transaction_and_what_stays_in_userspace(
    tmp_path: Path,
) -> None:
    cfg, path = config(tmp_path, "nftables")
    out = plan(cfg, cfg.dataplane).splitlines()
    assert out[0] == f"# lb offload plan for {path} (dataplane nftables)"
    # the base tables, each made empty first (`table` then `delete table`: idempotent)
    assert out[1:3] == ["table ip lb", "delete table ip lb"]
    assert [line for line in out if line.startswith("delete table")] == [
        "delete table ip lb",
        *(f"delete table ip lb_{i}" for i in range(16)),
    ]
    # dns is carried: its counter, its chain with the one backend, its verdict-map entry
    assert "add counter ip lb c_udp_10_0_0_1_53_10_0_1_3_5353" in out
    [dnat] = [line for line in out if " dnat ip to " in line]
    assert "svc_udp_10_0_0_1_53" in dnat and "10.0.1.3 . 5353" in dnat
    [entry] = [line for line in out if "services { 10.0.0.1 . udp . 53 :" in line]
    assert entry.endswith("goto svc_udp_10_0_0_1_53 }")
    # web is not (nftables has no connection thresholds), nor is api
    rules = [line for line in out if not line.startswith("#")]
    assert not [line for line in rules if "10.0.0.1 . tcp . 80" in line or "10.0.0.2" in line]
    assert out[-3:] == [
        "# stays in userspace:",
        "#   web (tcp 10.0.0.1:80): backend 10.0.1.2:8080: connection thresholds need IPVS or "
        "userspace",
        API_STAYS,
    ]


def test_a_config_the_kernel_can_carry_whole_has_nothing_staying(tmp_path: Path) -> None:
    path = tmp_path / "lb.yaml"
    path.write_text(
        "dataplane: ipvs\nservices:\n  - name: one\n    listen: 10.0.0.5:25\n    scheduler: rr\n    retries: 0\n"
        "    backends: [{address: 10.0.1.5:2525, weight: 2}]\n"
    )
    cfg = load_config(path)
    assert plan(cfg, cfg.dataplane).splitlines()[1:] == [
        "-A -t 10.0.0.5:25 -s rr",
        "-a -t 10.0.0.5:25 -r 10.0.1.5:2525 -m -w 2",
    ]


@pytest.mark.parametrize("mode", ["ipvs", "nftables"])
def test_allowed_sources_are_carried_with_their_filter(tmp_path: Path, mode: str) -> None:
    """`allowed_sources` keeps no service in userspace: the plan shows its filter, in
    table `ip lb` for nftables, in the host's `ip lb_ipvs` (as nft comments) for IPVS."""
    path = tmp_path / "lb.yaml"
    path.write_text(
        f"dataplane: {mode}\nservices:\n  - name: one\n    listen: 10.0.0.5:25\n    scheduler: rr\n"
        "    retries: 0\n    allowed_sources: [10.9.0.0/16, 192.0.2.7]\n"
        "    backends: [{address: 10.0.1.5:2525}]\n"
    )
    cfg = load_config(path)
    out = plan(cfg, cfg.dataplane).splitlines()
    assert "# stays in userspace:" not in out
    table, prefix = ("lb_ipvs", "# nft: ") if mode == "ipvs" else ("lb", "")
    assert (
        f"{prefix}add set ip {table} src_tcp_10_0_0_5_25 "
        "{ type ipv4_addr; flags interval; elements = { 10.9.0.0/16, 192.0.2.7 }; }"
    ) in out
    assert (
        f"{prefix}add element ip {table} firewall {{ 10.0.0.5 . tcp . 25 : goto fw_tcp_10_0_0_5_25 }}"
    ) in out
    if mode == "ipvs":
        assert out[1:3] == ["-A -t 10.0.0.5:25 -s rr", "-a -t 10.0.0.5:25 -r 10.0.1.5:2525 -m -w 1"]
