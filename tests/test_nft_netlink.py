"""What lb reads of nf_tables over netlink (offload/nft_netlink.py: `NftNetlink.counters`,
`NftNetlink.set_sizes`), against the real kernel of this machine: tables made by `nft` in
the balancer's namespace of the test topology, their counters and sets read by the
dumps and compared with what was written and with what `nft` lists; and the nftables
dataplane reading its counters through them (needs root)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import time

import pytest

from lb.changes import Changes
from lb.config import parse_config
from offload import nft_netlink
from offload.netns import inside
from offload.nft_netlink import NftNetlink, NftNetlinkError
from offload.nft_rules import TABLE
from offload.nftables import NftDataplane
from tests.support.netns import Topology

pytestmark = pytest.mark.netns

BIG = (5_000_000_000, (1 << 40) + 7)  # past 32 bits: the u64s are read whole


def nft(topo: Topology, script: str) -> None:
    subprocess.run(
        ["ip", "netns", "exec", topo.lb, "nft", "-f", "-"],
        input=script,
        text=True,
        check=True,
        capture_output=True,
    )


def nft_json(topo: Topology, *args: str) -> list[dict[str, object]]:
    out = subprocess.run(
        ["ip", "netns", "exec", topo.lb, "nft", "-j", *args],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    items: list[dict[str, object]] = json.loads(out)["nftables"]
    return items


def listed_elements(topo: Topology, table: str, name: str) -> int:
    (listed,) = [i["set"] for i in nft_json(topo, "list", "set", "ip", table, name) if "set" in i]
    assert isinstance(listed, dict)
    return len(listed.get("elem") or [])


def test_counters_of_one_table_with_their_exact_values(topo: Topology) -> None:
    nft(
        topo,
        f"""
        table ip T {{
          counter c1 {{ packets 5 bytes 300 }}
          counter c2 {{ packets 0 bytes 0 }}
          counter big {{ packets {BIG[0]} bytes {BIG[1]} }}
          quota q {{ 25 mbytes }}
        }}
        add table ip U
        add table inet T
        add table ip6 T
        add counter ip U c1 {{ packets 7 bytes 420 }}
        add counter inet T c1 {{ packets 9 bytes 540 }}
        add counter ip6 T c4 {{ packets 1 bytes 60 }}
        """,
    )
    nl = NftNetlink(topo.lb)
    try:
        # only counters (not the quota), only of `ip T` (not of U, nor of inet or ip6 T)
        assert nl.counters("T") == {"c1": (5, 300), "c2": (0, 0), "big": BIG}
        assert nl.counters("U") == {"c1": (7, 420)}
        assert nl.counters("gone") == {}  # no such table: none, no error
        nft(topo, "delete table ip T\n")
        assert nl.counters("T") == {}
    finally:
        nl.close()


def test_thousands_of_counters_come_in_many_parts_and_all_are_read(topo: Topology) -> None:
    """5,000 counters are ~0.5 MB of answer: the kernel sends it in parts of at most
    ~32 KiB, the dump is read to NLMSG_DONE. An unchanged answer is not parsed again
    (its parts are known by their digest), and a counter that moved in it is seen."""
    n = 5000
    nft(
        topo,
        "table ip T\n"
        + "".join(f"add counter ip T c{i} {{ packets {i} bytes {i * 60} }}\n" for i in range(n)),
    )
    nl = NftNetlink(topo.lb)
    try:
        want = {f"c{i}": (i, i * 60) for i in range(n)}
        assert nl.counters("T") == want
        assert len(nl._parts) >= 14  # 5,000 messages of ~92 bytes, in parts of <= 32 KiB
        # nothing left over on the socket for the next one (whose parts are all of the
        # kernel's largest size: it took the first of the first dump before it saw a recv)
        assert nl.counters("T") == want
        parts = set(nl._parts)
        assert nl.counters("T") == want
        assert set(nl._parts) == parts  # the same bytes: taken from the last dump's
        nft(topo, "reset counter ip T c2500\nadd counter ip T fresh { packets 3 bytes 9 }\n")
        nft(topo, "delete counter ip T c17\n")
        want |= {"c2500": (0, 0), "fresh": (3, 9)}
        del want["c17"]
        assert nl.counters("T") == want
        assert nl.counters("T") == want
    finally:
        nl.close()


def test_set_sizes_as_nft_lists_them(topo: Topology) -> None:
    """The elements of each set, as `nft list set` lists them: an element whose timeout
    ran out is in neither; a set or table that is not there is left out."""
    nft(
        topo,
        """
        table ip T {
          set three { type ipv4_addr; flags timeout; timeout 60s;
                      elements = { 10.0.0.1, 10.0.0.2, 10.0.0.3 } }
          set empty { type ipv4_addr; flags timeout; timeout 60s; }
          set leaving { type ipv4_addr; flags timeout; timeout 60s;
                        elements = { 10.0.0.1, 10.0.0.2 timeout 2s } }
          set plain { type ipv4_addr; elements = { 10.0.0.9 } }
        }
        """,
    )
    names = ["three", "empty", "leaving", "plain", "missing"]
    nl = NftNetlink(topo.lb)
    try:
        assert nl.set_sizes("T", names) == {"three": 3, "empty": 0, "leaving": 2, "plain": 1}
        time.sleep(2.5)
        sizes = nl.set_sizes("T", names)
        assert sizes == {"three": 3, "empty": 0, "leaving": 1, "plain": 1}
        assert sizes == {name: listed_elements(topo, "T", name) for name in sizes}
        assert nl.set_sizes("gone", names) == {}
    finally:
        nl.close()


def test_a_set_of_thousands_of_elements(topo: Topology) -> None:
    n = 5000
    elements = ", ".join(f"10.{i >> 8 & 255}.{i & 255}.1" for i in range(n))
    nft(
        topo,
        "table ip T {\n  set big { type ipv4_addr; size 65535; flags timeout; timeout 60s; }\n}\n"
        f"add element ip T big {{ {elements} }}\n",
    )
    nl = NftNetlink(topo.lb)
    try:
        assert (
            nl.set_sizes("T", ["big"]) == {"big": n} == {"big": listed_elements(topo, "T", "big")}
        )
    finally:
        nl.close()


WEB = """
services:
  - name: web
    listen: 10.99.0.10:80
    scheduler: wrr
    retries: 0
    backends: [{address: "10.99.2.2:8080"}, {address: "10.99.2.3:8080"}]
"""


async def test_dumps_and_batches_from_many_threads_each_get_their_own_answer(
    topo: Topology,
) -> None:
    """The dataplane reads and writes from threads (asyncio.to_thread) on one socket:
    every exchange gets the answer to its own request."""
    (web,) = parse_config(WEB).services
    nft(
        topo,
        "table ip T {\n"
        + "".join(f"  counter c{i} {{ packets {i} bytes 1 }}\n" for i in range(500))
        + "  set s { type ipv4_addr; elements = { 10.0.0.1, 10.0.0.2 } }\n}\n",
    )
    nl = NftNetlink(topo.lb)
    want = {f"c{i}": (i, 1) for i in range(500)}

    def reader() -> list[object]:
        wrong: list[object] = []
        for _ in range(30):
            got = nl.counters("T")
            if got != want:
                wrong.append(len(got))
            if nl.set_sizes("T", ["s"]) != {"s": 2}:
                wrong.append("s")
        return wrong

    dp = NftDataplane(netlink=nl)
    try:
        with inside(topo.lb):  # the first apply builds table lb through nft
            await dp.apply([web], Changes([web]))
        readers = [asyncio.create_task(asyncio.to_thread(reader)) for _ in range(3)]
        for i in range(30):  # changes over the same socket meanwhile, from threads too
            b = dataclasses.replace(web.backends[0], weight=2 + i % 2)
            changed = web.with_backends((b, web.backends[1]))
            await dp.apply([changed], Changes([changed]))
        assert [w for r in readers for w in await r] == []
        assert dp.writes == 2 + 30  # the build (table, then services), and each change
    finally:
        nl.close()


async def test_the_dataplane_reads_its_counters_and_none_once_the_table_is_gone(
    topo: Topology,
) -> None:
    (web,) = parse_config(WEB).services
    dp = NftDataplane(netlink=NftNetlink(topo.lb))
    with inside(topo.lb):
        await dp.apply([web], Changes([web]))
    names = {c.counter for c in (dp._rendered or {})[web.key].counters}
    await dp.refresh()
    assert dp._counters == dict.fromkeys(names, (0, 0))
    nft(topo, f"delete table ip {TABLE}\n")  # by hand
    await dp.refresh()
    assert dp._counters == {}
    (snap,) = dp.observe()
    assert snap.totals.conns == 0


def test_a_dump_without_answer_fails_instead_of_waiting_forever(
    topo: Topology, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refresh must not hang on a socket the kernel says nothing on."""
    monkeypatch.setattr(nft_netlink, "DUMP_TIMEOUT", 0.2)
    nl = NftNetlink(topo.lb)
    try:
        with pytest.raises(NftNetlinkError, match="no answer"):
            nl._receive(bytearray(64))  # nothing asked: nothing comes
    finally:
        nl.close()
