"""sh, dh and mh: bucket tables and the hash functions of the kernel."""

from __future__ import annotations

import collections
import ipaddress

from lb.model import Endpoint, SchedFlag
from lb.sched.mh import TAB_SIZE as MH_SIZE
from lb.sched.siphash import hsiphash_u32, siphash
from tests.support.vs import Harness, name_of


def golden_hash(value: int) -> int:
    """hash_32(v, 8) = ((v * 0x61C88647) mod 2^32) >> 24, as docs/semantics.md states."""
    return ((value * 0x61C88647) % 2**32) >> 24


def test_sh_table_gives_each_dest_weight_buckets_and_zero_weight_one() -> None:
    h = Harness("sh").add("A", 0).add("B", 2).add("C", 1)
    table = h.vs.sched.table  # type: ignore[attr-defined]
    names = [name_of(d.endpoint) for d in table]
    assert h.order() == "CBA"
    assert names[:8] == list("CBBACBBA")
    assert collections.Counter(names) == {"C": 64, "B": 128, "A": 64}


def test_sh_picks_the_bucket_of_the_client_address() -> None:
    h = Harness("sh").add("A", 1).add("B", 1).add("C", 1).add("D", 1)
    order = h.order()  # DCBA, one bucket each in turn
    for text in ("10.0.0.1", "10.0.0.2", "192.0.2.77", "203.0.113.5"):
        bucket = golden_hash(int(ipaddress.IPv4Address(text)))
        assert h.pick(text) == order[bucket % 4], text


def test_sh_port_flag_adds_the_source_port() -> None:
    h = Harness("sh", flags=frozenset({SchedFlag.PORT})).add("A").add("B").add("C").add("D")
    order = h.order()
    ip = int(ipaddress.IPv4Address("10.1.2.3"))
    for port in (1024, 40000, 65535):
        assert h.pick("10.1.2.3", port) == order[golden_hash(ip + port) % 4]
    plain = Harness("sh").add("A").add("B").add("C").add("D")
    assert len({plain.pick("10.1.2.3", p) for p in range(1000, 1100)}) == 1


def test_sh_ipv6_folds_the_four_words() -> None:
    h = Harness("sh").add("A").add("B").add("C").add("D")
    addr = ipaddress.IPv6Address("2001:db8::1:2")
    words = [int(addr) >> s & 0xFFFFFFFF for s in (96, 64, 32, 0)]
    fold = words[0] ^ words[1] ^ words[2] ^ words[3]
    assert h.pick(str(addr)) == h.order()[golden_hash(fold) % 4]


def test_sh_without_fallback_refuses_when_the_bucket_is_unavailable() -> None:
    h = Harness("sh").add("A", 1).add("B", 1)  # list B A: even buckets B, odd A
    src = next(f"10.0.0.{i}" for i in range(1, 255) if golden_hash(0x0A000000 + i) % 2 == 1)
    assert h.pick(src) == "A"
    h.edit("A", 0)  # quiesced: still owns a bucket (a weight-0 dest takes one)
    assert h.pick(src) == "-"


def test_sh_fallback_probes_with_the_kernel_offset() -> None:
    # ip_vs_sh_get_fallback(): probe k looks at bucket (k + 2 * ihash) mod 256.
    h = Harness("sh", flags=frozenset({SchedFlag.FALLBACK}))
    for n in "ABCD":
        h.add(n, 1)
    order = h.order()
    for i in range(1, 60):
        src = f"10.9.0.{i}"
        ihash = golden_hash(0x0A090000 + i)
        owner = order[ihash % 4]
        h.edit(owner, 0)
        expected = "-"
        for k in range(256):
            cand = order[(k + 2 * ihash) % 256 % 4]
            if cand != owner:
                expected = cand
                break
        assert h.pick(src) == expected, src
        h.edit(owner, 1)


def test_dh_hashes_the_vip_so_every_client_gets_the_same_dest() -> None:
    vip = Endpoint(ipaddress.ip_address("10.0.0.100"), 80)
    h = Harness("dh", vip=vip).add("A", 5).add("B", 1).add("C", 1)
    expected = h.order()[golden_hash(int(vip.ip)) % 3]
    assert {h.pick(f"172.16.0.{i}") for i in range(1, 50)} == {expected}
    table = list(h.vs.sched.table)  # type: ignore[attr-defined]
    h.edit(expected, 0)  # no upd_dest hook: the table stays, the quiesced dest refuses
    assert h.vs.sched.table == table and h.pick() == "-"  # type: ignore[attr-defined]
    h.edit(expected, 2)
    assert h.pick() == expected


def test_every_scheduler_survives_every_edit() -> None:
    for sched in ("rr", "wrr", "lc", "wlc", "sed", "nq", "sh", "mh", "dh"):
        h = Harness(sched).add("A", 2).add("B", 3)
        h.edit("B", 1).edit("A", 0).delete("A").add("C", 4).edit("C", 4)
        assert h.pick() in "BC", sched


# --- SipHash / mh -------------------------------------------------------------------------

SIPHASH24_VECTORS = [0x726FDB47DD0E0E31, 0x74F839C593DC67FD, 0x0D6C8009D9A94F5A, 0x85676696D7FB7E2D]
# lib/siphash_kunit.c, test_vectors_hsiphash for BITS_PER_LONG == 64: hsiphash of the
# bytes 0..n-1 under the key 00 01 .. 0f.
HSIPHASH64_VECTORS = [
    0x050FC4DC, 0x7D57CA93, 0x4DC7D44D, 0xE7DDF7FB, 0x88D38328, 0x49533B67,
    0xC59F22A7, 0x9BB11140, 0x8D299A8E, 0x6C063DE4, 0x92FF097F, 0xF94DC352,
]  # fmt: skip
K0, K1 = 0x0706050403020100, 0x0F0E0D0C0B0A0908


def test_siphash24_reference_vectors() -> None:
    for n, want in enumerate(SIPHASH24_VECTORS):
        assert siphash(bytes(range(n)), K0, K1) == want


def test_hsiphash_matches_the_kernel_self_test() -> None:
    for n, want in enumerate(HSIPHASH64_VECTORS):
        assert siphash(bytes(range(n)), K0, K1, 1, 3) & 0xFFFFFFFF == want
    # the specialised 4-byte form used by mh
    assert hsiphash_u32(int.from_bytes(bytes(range(4)), "little"), K0, K1) == HSIPHASH64_VECTORS[4]
    for v in (0, 1, 0xDEADBEEF, 0xFFFFFFFF):
        assert (
            hsiphash_u32(v, 123, 456)
            == siphash(v.to_bytes(4, "little"), 123, 456, 1, 3) & 0xFFFFFFFF
        )


def _slots(h: Harness) -> collections.Counter[str]:
    return collections.Counter(name_of(d.endpoint) if d else "-" for d in h.vs.sched.lookup)  # type: ignore[attr-defined]


def test_mh_slots_follow_weights_in_whole_rounds() -> None:
    h = Harness("mh").add("A", 1).add("B", 2).add("C", 3)
    # Turns per round 3 (C), 2 (B), 1 (A): 682 full rounds of 6 slots, and the one slot
    # left goes to the first destination in list order (C).
    assert _slots(h) == {"C": 682 * 3 + 1, "B": 682 * 2, "A": 682}
    assert sum(_slots(h).values()) == MH_SIZE


def test_mh_large_weights_are_shifted_down() -> None:
    h = Harness("mh").add("A", 1).add("B", 1000)
    # gcd 1, max 1000: fls(1000) = 10 bits, shift 10 - 6 = 4: B gets 1000 >> 4 = 62 turns,
    # A gets 1 >> 4 = 0, raised to 1 since its weight is not zero.
    rounds, extra = divmod(MH_SIZE, 63)
    assert _slots(h) == {"B": rounds * 62 + extra, "A": rounds}


def test_mh_quiesced_dest_keeps_its_slots() -> None:
    h = Harness("mh").add("A", 1).add("B", 1).add("C", 1)
    before = list(h.vs.sched.lookup)  # type: ignore[attr-defined]
    h.edit("B", 0)
    assert h.vs.sched.lookup == before  # type: ignore[attr-defined]
    clients = [f"10.2.{i // 250}.{i % 250 + 1}" for i in range(300)]
    picks = {c: h.pick(c) for c in clients}
    assert "B" not in picks.values() and "-" in picks.values()
    fb = Harness("mh", flags=frozenset({SchedFlag.FALLBACK})).add("A", 1).add("B", 1).add("C", 1)
    fb.edit("B", 0)
    for c in clients:  # with mh-fallback, B's clients go elsewhere; the others stay
        got = fb.pick(c)
        assert got in "AC"
        if picks[c] != "-":
            assert got == picks[c]


def test_mh_delete_rebuilds_without_the_dest_and_is_mostly_stable() -> None:
    h = Harness("mh")
    for n in "ABCDE":
        h.add(n, 1)
    before = [name_of(d.endpoint) for d in h.vs.sched.lookup]  # type: ignore[attr-defined]
    h.delete("C")
    after = [name_of(d.endpoint) for d in h.vs.sched.lookup]  # type: ignore[attr-defined]
    assert "C" not in after
    kept = sum(1 for a, b in zip(before, after, strict=True) if a == b and a != "C")
    assert kept > 0.8 * sum(1 for a in before if a != "C")


def test_mh_port_flag_spreads_one_client_over_ports() -> None:
    h = Harness("mh", flags=frozenset({SchedFlag.PORT})).add("A").add("B").add("C")
    assert len({h.pick("10.0.0.1", p) for p in range(2000, 2100)}) == 3
    plain = Harness("mh").add("A").add("B").add("C")
    assert len({plain.pick("10.0.0.1", p) for p in range(2000, 2100)}) == 1
