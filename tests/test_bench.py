"""The bench runs (its --quick mode, as CI runs it): results.json, the Markdown tables and
the plots come out with every dataplane and size, and every data-plane peer and workload.
It asserts nothing about speed. The parsers of the tools' output are checked on output
captured from the real tools (bench/samples/), without root."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import parse, vm
from bench.__main__ import names
from bench.dataplane import ratios, record
from bench.peers import (
    HTTP_PROXY_PORT,
    OPTION_PEERS,
    PEERS,
    Svc,
    haproxy_conf,
    lb_services_carried,
    lb_yaml,
    nft_dnat_script,
    nginx_backend_conf,
)
from bench.report import write_report
from bench.stats import percentile
from bench.topology import LOCK, Topology
from bench.workloads import WORKLOADS
from tests.support.root import require_root

SAMPLES = Path(__file__).parent.parent / "bench" / "samples"
#: Every figure each workload reports (bench/workloads.py)
FIGURES = {
    "connections": {
        "connections_per_s", "errors", "balancer_cpu_percent", "process_cpu_percent",
        "rss_mb", "paced_per_s", "paced_failed", "connect_p50_us", "connect_p99_us",
        "response_p50_us", "response_p99_us",
    },
    "requests": {
        "requests_per_s", "errors", "latency_p50_us", "latency_p99_us", "rtt_p50_us",
        "rtt_p99_us", "balancer_cpu_percent", "requests_per_cpu_s",
    },
    "bulk": {
        f"{what}_{n}" for what in ("gbit_s", "cpu_s_per_gb", "process_s_per_gb", "softirq_s_per_gb") for n in (1, 4)
    },
    "udp": {
        "datagrams_per_s", "loss_percent", "rtt_p50_us", "rtt_p99_us",
        *(f"dropped_{at}_percent" for at in ("balancer", "backends", "client_send", "backlog")),
    },
    # and one sys_<call> per system call made (syserr_<call>: those that failed)
    "syscalls": {
        "syscalls_per_connection", "syscall_errors_per_connection", "syscalls_failed_connections",
    },
}  # fmt: skip
#: The peers whose connections no process relays: no system calls to count
KERNEL_PEERS = {"direct", "nftables DNAT", "lb nftables"}


def figures_of(workload: str, got: dict[str, object]) -> set[str]:
    """The figures a workload reported, its per-call ones (syscalls) left out once checked."""
    if workload != "syscalls":
        return set(got)
    calls = {k for k in got if k.startswith(("sys_", "syserr_"))}
    assert {"sys_accept4", "sys_connect", "sys_close"} <= calls, got
    return set(got) - calls


def no_bench_namespace_left() -> bool:
    """No lbbench namespace, checked while holding the bench's lock so that no other bench
    can be making some (another one running now, say a second test suite's, owns what
    exists: nothing to check then)."""
    with open(LOCK, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        try:
            listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
            return not [ns for ns in listed.stdout.split() if ns.startswith("lbbench")]
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def bench(
    *args: str, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -m bench ARGS`, its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "bench", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=env,
    )


@pytest.mark.netns
def test_quick_bench_writes_results_table_and_plot(tmp_path: Path) -> None:
    require_root()
    out = tmp_path / "results"
    done = bench("--quick", "--runs", "2", "--out", str(out), timeout=900)
    assert done.returncode == 0, done.stderr
    doc = json.loads((out / "results.json").read_text())
    control = doc["control"]
    assert set(control) == {
        "lb nftables",
        "lb nftables, changes via nft -f",
        "iptables-restore (legacy)",
        "iptables-restore (nft)",
    }
    for name, per in control.items():
        assert set(per) == {"1", "10", "100"}
        for steps in per.values():
            kernel = {"add_one_kernel", "edit_one_kernel"} if name == "lb nftables" else set()
            assert set(steps) == {"full", "add_one", "edit_one"} | kernel
            if kernel:  # a part of the change it was measured in
                assert steps["add_one_kernel"]["low"] <= steps["add_one"]["high"]
            assert all(
                s["runs"] == 2 and 0 < s["low"] <= s["median"] <= s["high"] for s in steps.values()
            )
    table = (out / "results.md").read_text()
    assert "| lb nftables |" in table and "### add one service to N" in table
    assert "### add one service to N: the kernel transaction alone" in table
    assert (out / "control.png").read_bytes().startswith(b"\x89PNG")
    # lb run itself at each size: memory, idle CPU, start, and edits answered once applied
    scale = doc["scale"]
    assert set(scale) == {"userspace", "nftables"}
    for per in scale.values():
        assert set(per) == {"1", "10", "100"}
        for figures in per.values():
            assert set(figures) == {"start", "rss_mb", "idle_cpu_percent", "edit"}
            assert figures["edit"]["runs"] == 2 and figures["edit"]["low"] > 0
            assert figures["rss_mb"]["median"] > 10  # a Python process with lb loaded
    assert "## lb run at N services x 10 backends, end to end" in table
    assert "| lb nftables |" in table.split("## lb run at N services")[1]
    assert (out / "scale.png").read_bytes().startswith(b"\x89PNG")

    dp = doc["dataplane"]
    assert dp["peers"] == list(PEERS) and dp["workloads"] == list(WORKLOADS)
    for peer in PEERS:
        for workload, figures in FIGURES.items():
            r = dp["results"][peer][workload]
            if peer == "haproxy" and workload == "udp":
                assert r == {"n/a": "no UDP proxy"}
                continue
            if peer in KERNEL_PEERS and workload == "syscalls":
                assert r == {"n/a": "no process relays the connections"}
                continue
            assert r["errors"] == [], (peer, workload)
            assert figures_of(workload, r["figures"]) == figures, (peer, workload)
            assert all(
                s["runs"] == 2 and 0 <= s["low"] <= s["median"] <= s["high"]
                for s in r["figures"].values()
            ), (peer, workload, r["figures"])
            if peer != "direct" and workload != "syscalls":
                assert dp["ratios"]["direct"][peer][workload], (peer, workload)
        if peer not in KERNEL_PEERS:  # a proxy makes at least accept, connect, close...
            assert (
                dp["results"][peer]["syscalls"]["figures"]["syscalls_per_connection"]["median"] >= 5
            )
    assert set(dp["ratios"]) == {"direct", "haproxy"}
    for peer in PEERS:
        assert f"| {peer} |" in table
    for heading in ("## Data plane", "### New connections", "### Keep-alive requests",
                    "### Bulk TCP", "### UDP", "### System calls per connection",
                    "Per system call", "### Relative to direct",
                    "### Relative to haproxy"):  # fmt: skip
        assert heading in table
    assert dp["options"] == {}  # no address option's peer in the default run
    assert "Errors seen" not in table
    assert (out / "dataplane.png").read_bytes().startswith(b"\x89PNG")
    assert no_bench_namespace_left()
    # the vm part's figures (here the host's, in the shape the guest writes) have their own
    # section and plot
    doc["vm"] = {"kernel": "6.1.0-test", "machine": doc["machine"], "dataplane": dp}
    write_report(out, doc)
    table = (out / "results.md").read_text()
    vm_part = table.split("## Data plane in the kernel VM, with lb ipvs")[1]
    assert "kernel 6.1.0-test" in vm_part and "### Relative to haproxy" in vm_part
    assert (out / "dataplane-vm.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.netns
def test_one_part_peer_and_workload_can_be_chosen(tmp_path: Path) -> None:
    require_root()
    out = tmp_path / "results"
    done = bench(
        "--quick", "--runs", "1", "--out", str(out),
        "--only", "dataplane", "--peers", "haproxy,direct", "--workloads", "udp",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    doc = json.loads((out / "results.json").read_text())
    assert "control" not in doc
    dp = doc["dataplane"]
    assert dp["peers"] == ["haproxy", "direct"] and dp["workloads"] == ["udp"]
    assert dp["results"]["haproxy"]["udp"] == {"n/a": "no UDP proxy"}
    assert set(dp["results"]["direct"]["udp"]["figures"]) == FIGURES["udp"]
    table = (out / "results.md").read_text()
    assert "## Control plane" not in table and "n/a (no UDP proxy)" in table
    assert not (out / "control.png").exists() and (out / "dataplane.png").exists()
    assert no_bench_namespace_left()


@pytest.mark.netns
def test_address_options_are_measured_against_their_plain_proxy(tmp_path: Path) -> None:
    """lb's and HAProxy's address options as peers of their own: each starts only once
    the backend sees the client's address through it (else its start fails, in
    `errors`), and its figures are also taken relative to the same proxy without it."""
    require_root()
    out = tmp_path / "results"
    peers = ["lb userspace", "haproxy", *OPTION_PEERS]
    done = bench(
        "--quick", "--runs", "1", "--out", str(out), "--only", "dataplane",
        "--peers", ",".join(peers), "--workloads", "connections,bulk,syscalls",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    dp = json.loads((out / "results.json").read_text())["dataplane"]
    for peer in peers:
        for workload in ("connections", "syscalls"):
            r = dp["results"][peer][workload]
            assert r["errors"] == [], (peer, workload, r)
            assert figures_of(workload, r["figures"]) == FIGURES[workload], (peer, workload)
    # the PROXY header goes to the http service only: bulk (iperf3) is not measured again
    for peer in ("lb userspace proxy v2", "haproxy send-proxy-v2"):
        assert dp["results"][peer]["bulk"] == {
            "n/a": "the PROXY header is sent on the http service only"
        }
    assert set(dp["results"]["lb userspace transparent"]["bulk"]["figures"]) == FIGURES["bulk"]
    assert set(dp["options"]) == set(OPTION_PEERS)
    for peer in OPTION_PEERS:
        assert dp["options"][peer]["connections"]["connections_per_s"]["runs"] == 1
        assert dp["options"][peer]["syscalls"]["syscalls_per_connection"]["median"] > 0
    # a transparent connect binds the client's address first: one more system call
    calls = {p: dp["results"][p]["syscalls"]["figures"] for p in peers}
    assert (
        "sys_bind" in calls["lb userspace transparent"] and "sys_bind" not in calls["lb userspace"]
    )
    assert "sys_bind" in calls["haproxy usesrc clientip"]
    table = (out / "results.md").read_text()
    assert "### Address options: relative to the same proxy without them" in table
    assert no_bench_namespace_left()


def test_ipvs_peer_is_refused_on_a_kernel_without_ipvs(tmp_path: Path) -> None:
    require_root()
    if vm.ipvs_available():
        pytest.skip("this kernel has IPVS")
    done = bench("--only", "dataplane", "--peers", "direct,lb ipvs", "--out", str(tmp_path))
    assert done.returncode == 2 and "lb ipvs needs a kernel with IPVS" in done.stderr
    assert not (tmp_path / "results.json").exists()


def test_ipvs_control_is_refused_on_a_kernel_without_ipvs(tmp_path: Path) -> None:
    require_root()
    if vm.ipvs_available():
        pytest.skip("this kernel has IPVS")
    done = bench("--only", "ipvs-control", "--out", str(tmp_path))
    assert done.returncode == 2 and "ipvs-control needs a kernel with IPVS" in done.stderr


def test_the_ipvs_control_plane_is_reported_relative_to_the_smallest_size(
    tmp_path: Path,
) -> None:
    def summary(median: float) -> dict[str, float]:
        return {"median": median, "low": median, "high": median, "runs": 1}

    def steps(edit: float) -> dict[str, dict[str, float]]:
        return {"full": summary(1.0), "add_one": summary(edit), "edit_one": summary(edit)}

    machine = {"cpus": 2, "kernel": "6.1.0-test", "python": "3.11", "nft": "nft", "iptables": "x"}
    vm_doc = {
        "kernel": "6.1.0-test",
        "machine": machine,
        "dataplane": {},
        "ipvs_control": {
            "lb ipvs": {"10": steps(0.002), "10000": steps(0.003)},
            "lb nftables": {"10": steps(0.001), "10000": steps(0.004)},
        },
    }
    write_report(tmp_path, {"date": "d", "quick": False, "machine": machine, "vm": vm_doc})
    table = (tmp_path / "results.md").read_text()
    part = table.split("## Control plane with IPVS")[1]
    assert "### drain one backend of one service: relative to 10 services" in part
    assert "| lb ipvs | 1.00x | 1.50x |" in part and "| lb nftables | 1.00x | 4.00x |" in part
    assert "## Data plane in the kernel VM" not in table  # no data plane figures: no section


def test_a_failed_vm_part_is_reported_and_fails_the_run(tmp_path: Path) -> None:
    """The guest cannot boot (no such kernel image): the bench says so, in its exit code,
    on stderr and in results.md, and keeps what it measured."""
    require_root()
    if vm.missing():
        pytest.skip("the kernel VM's tools are not installed (scripts/setup)")
    done = bench(
        "--quick", "--only", "vm", "--out", str(tmp_path),
        env={**os.environ, "LB_KERNEL_IMAGE": str(tmp_path / "no-such-vmlinuz")},
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "bench: the vm part failed: the bench in the kernel VM wrote no results" in done.stderr
    doc = json.loads((tmp_path / "results.json").read_text())
    assert "vm" not in doc and "the kernel VM wrote no results" in doc["failed"]["vm"]
    assert "## The vm part failed" in (tmp_path / "results.md").read_text()


def test_bad_arguments_are_refused_with_a_reason() -> None:
    for args, reason in (
        (["--sizes", "1,x"], "--sizes must be integers"),
        (["--sizes", "0"], "at least 1"),
        (["--runs", "0"], "--runs must be at least 1"),
        (["--only", "kernel"], "--only: unknown 'kernel'"),
        (["--peers", "direct,envoy"], "--peers: unknown 'envoy'"),
        (["--workloads", "bulk,http2,dns"], "--workloads: unknown 'http2', 'dns'"),
        (["--workloads", ","], "--workloads: unknown empty list"),
    ):
        done = bench(*args)
        assert done.returncode == 2 and reason in done.stderr, (args, done.stderr)


# --- the pure parts, on output captured from the real tools ---------------------------------


def test_wrk_output_is_read_with_its_latency_distribution() -> None:
    close = parse.wrk((SAMPLES / "wrk-close.txt").read_text())
    assert close.requests_per_s == 6487.94 and close.requests == 19795
    assert close.latency_us == {50: 2950.0, 75: 3650.0, 90: 4250.0, 99: 5700.0}
    assert close.socket_errors == 0 and close.non_2xx == 0
    keep = parse.wrk((SAMPLES / "wrk-keepalive.txt").read_text())
    assert keep.requests_per_s == 28864.93 and keep.latency_us[99] == 2950.0
    assert parse.duration_us("795.12us") == pytest.approx(795.12)
    assert parse.duration_us("2.00s") == 2e6
    with pytest.raises(parse.ToolOutputError, match="no request rate"):
        parse.wrk((SAMPLES / "wrk-refused.txt").read_text())  # could not connect at all


def test_wrk_counts_socket_errors_and_bad_statuses() -> None:
    # a server that answered every other connection with a 503 and closed the rest unread
    w = parse.wrk((SAMPLES / "wrk-errors.txt").read_text())
    assert w.socket_errors == 5448 and w.non_2xx == 5447 and w.latency_us[50] == 115.0


def test_iperf3_json_tcp_udp_and_error() -> None:
    tcp = parse.iperf3((SAMPLES / "iperf3-tcp-4.json").read_text())
    assert tcp.bytes == 2873949080 and tcp.bits_per_second == pytest.approx(11.48e9, rel=1e-3)
    assert tcp.packets == 0 and tcp.retransmits == 2
    udp = parse.iperf3((SAMPLES / "iperf3-udp.json").read_text())
    assert (udp.packets, udp.lost_packets) == (175144, 27366)
    assert udp.datagrams_per_s == pytest.approx((175144 - 27366) / 2.003215)
    assert udp.lost_percent == pytest.approx(15.6243, rel=1e-4)
    with pytest.raises(parse.ToolOutputError, match="Connection refused"):
        parse.iperf3((SAMPLES / "iperf3-refused.json").read_text())
    with pytest.raises(parse.ToolOutputError, match="did not print JSON"):
        parse.iperf3("iperf3: error - unable to connect")


def test_sockperf_percentiles_without_its_colours() -> None:
    tcp = parse.sockperf((SAMPLES / "sockperf-tcp.txt").read_text())
    assert tcp.observations == 28555 and tcp.dropped == 0
    assert tcp.percentiles_us[50.0] == 50.925 and tcp.percentiles_us[99.0] == 90.188
    udp = parse.sockperf((SAMPLES / "sockperf-udp.txt").read_text())
    assert udp.observations == 29937 and udp.percentiles_us[99.999] == 3080.372
    with pytest.raises(parse.ToolOutputError):
        parse.sockperf("sockperf: ERROR: connect failed")


def test_strace_summary() -> None:
    # strace -c -f on lb userspace over 200 connections, one at a time
    st = parse.strace_summary((SAMPLES / "strace-c.txt").read_text())
    assert st.calls["accept4"] == 200 and st.calls["io_uring_enter"] == 800
    assert st.errors == {"connect": 200, "epoll_ctl": 200}  # EINPROGRESS; ENOENT
    assert st.total == 6427  # as its total line says
    with pytest.raises(parse.ToolOutputError):
        parse.strace_summary("strace: attach: ptrace(PTRACE_SEIZE, 1): Operation not permitted")


def test_udp_drop_counters() -> None:
    snmp = (
        "Ip: Forwarding DefaultTTL\nIp: 1 64\n"
        "Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors "
        "InCsumErrors IgnoredMulti MemErrors\n"
        "Udp: 140271 0 59508 202157 59508 0 0 0 0\n"
        "UdpLite: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors "
        "InCsumErrors IgnoredMulti MemErrors\nUdpLite: 0 0 0 0 0 0 0 0 0\n"
    )
    udp = parse.snmp_udp(snmp)
    assert udp["RcvbufErrors"] == 59508 and udp["SndbufErrors"] == 0
    with pytest.raises(parse.ToolOutputError):
        parse.snmp_udp("Ip: Forwarding\nIp: 1\n")
    softnet = "0774d794 00000000 00000015 00000000 00000000\n07c37c7c 0000000a 00000016 00000000\n"
    assert parse.softnet_dropped(softnet) == 10


def test_proc_files() -> None:
    stat = (
        "cpu  1 2 3 4 5 6 7 8 9 10\ncpu0 10 0 20 300 1 2 30 0 0 0\ncpu1 11 1 21 301 2 3 31 0 0 0\n"
    )
    assert parse.proc_stat_cpu(stat, 1)["softirq"] == 31
    with pytest.raises(parse.ToolOutputError):
        parse.proc_stat_cpu(stat, 2)
    # a name with spaces and a parenthesis, from a real /proc/<pid>/stat
    pid = "4715 (py (x) 1) S 4700 4715 4700 0 -1 4194560 9 0 0 0 120 35 7 3 20 0 3 0 1 1 1"
    assert parse.proc_pid_stat(pid) == (4700, 165)  # its own time and its reaped children's
    assert parse.proc_status_rss_kb("Name:\tnginx\nVmRSS:\t    2816 kB\n") == 2816
    assert parse.proc_status_rss_kb("Name:\tkthreadd\n") == 0


def test_percentile_interpolates_between_ranks() -> None:
    assert percentile([5.0], 99) == 5.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile(list(map(float, range(101))), 99) == 99.0
    with pytest.raises(ValueError):
        percentile([], 50)


def test_ratios_pair_runs_of_the_same_round() -> None:
    values: dict[str, dict[str, dict[str, list[float | None]]]] = {
        "direct": {"requests": {"requests_per_s": [100.0, 200.0, None], "errors": [0.0, 0, 0]}},
        "lb": {"requests": {"requests_per_s": [50.0, 150.0, 10.0], "errors": [1.0, 0, 0]}},
    }
    r = ratios(values, "direct")
    assert r == {"lb": {"requests": {"requests_per_s": {
        "median": 0.625, "low": 0.5, "high": 0.75, "runs": 2}}}}  # fmt: skip


def test_choices_keep_order_and_drop_repeats() -> None:
    assert names(None, "--peers", ("a", "b")) == ["a", "b"]
    assert names(None, "--peers", ("a", "b"), ("b",)) == ["b"]
    assert names("b, a,b", "--peers", ("a", "b")) == ["b", "a"]


def test_generated_configs() -> None:
    topo = Topology()
    cfg = lb_yaml(topo)
    done = subprocess.run(
        [sys.executable, "-m", "lb", "check", "-c", "/dev/stdin"],
        input=cfg, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    # five services (TCP and UDP where the workload has both), all with port mapping
    assert cfg.count("- name:") == 5 and "retries: 0" in cfg
    script = nft_dnat_script(topo)
    assert script.count("dnat ip to") == 5 and "seed 0x1" in script
    assert "10.201.3.2 . 11211" in script
    assert "balance source" in haproxy_conf(topo) and "nbthread 1" in haproxy_conf(topo)
    # the address options: lb's configurations pass lb check, HAProxy's say them
    for option, says in (
        ("transparent", "source: transparent"),
        ("proxy v2", "proxy_protocol: v2"),
    ):
        text = lb_yaml(topo, option=option)
        done = subprocess.run(
            [sys.executable, "-m", "lb", "check", "-c", "/dev/stdin"],
            input=text, capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        assert says in text
    assert lb_yaml(topo, option="proxy v2").count("proxy_protocol") == 1  # the http service
    assert lb_yaml(topo, option="transparent").count("source: transparent") == 3  # TCP ones
    assert haproxy_conf(topo, transparent=True).count("usesrc clientip") == 3
    assert haproxy_conf(topo, send_proxy=True).count(f":{HTTP_PROXY_PORT} send-proxy-v2") == 3
    backend = nginx_backend_conf(Path("/w"), "10.201.1.2", 8080)
    assert f"listen 10.201.1.2:{HTTP_PROXY_PORT} proxy_protocol" in backend
    assert '"ok\\n"' in backend and "$proxy_protocol_addr" in backend
    assert Svc("x", 1, 2, udp=False, sticky=False).backend_port == 2
    listing = json.dumps({"services": [{"name": "http-tcp", "dataplane": "nftables"}]})
    assert lb_services_carried(listing) == {"http-tcp": "nftables"}


def test_a_system_call_not_seen_in_a_round_was_made_0_times_in_it() -> None:
    """The syscalls workload reports the calls it saw: one missing from a round that ran
    is 0 there (not a missing run), in a round that failed unknown."""
    runs: dict[str, list[float | None]] = {}
    record(runs, {"syscalls_per_connection": 25.0, "sys_write": 2.0, "sys_io_uring_enter": 2.0}, 0)
    record(runs, {}, 1)  # the workload failed
    record(runs, {"syscalls_per_connection": 23.0, "sys_write": 2.0, "sys_getsockopt": 1.0}, 2)
    assert runs == {
        "syscalls_per_connection": [25.0, None, 23.0],
        "sys_write": [2.0, None, 2.0],
        "sys_io_uring_enter": [2.0, None, 0.0],
        "sys_getsockopt": [0.0, None, 1.0],
    }
    record(runs, {"rate": 1.0}, 3)  # another workload's figure is never made up
    assert runs["rate"] == [None, None, None, 1.0]
