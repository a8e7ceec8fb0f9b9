"""nf_tables transactions over netlink, without the `nft` command.

`nft -f` reads the whole ruleset of the network namespace before it runs a command that
adds a rule or a set element (its cache of chains, sets and objects): a change to one
service costs time in proportion to every service there is (0.35 s at 5,000 services of
10 backends on nft 1.0.6). The operations of `offload.nft_rules` are small and few in
kind, so lb encodes them itself, as the bytecode `nft --debug=netlink` shows for the
same text, and sends them in one batch: the kernel applies it atomically, and the cost
is that of the change.

What lb reads while it runs is read here too, as netlink dumps: the named counters of
table `ip lb` every second (`NftNetlink.counters`) and the sizes of the affinity sets
every 10 s (`NftNetlink.set_sizes`). Spawning `nft -j list counters` for them cost 2-6%
of a core with nothing happening.

Still through `nft`: the first apply, which builds the table, the flowtable and its
devices, lb's probes, the removal of its tables, and reading an affinity set's clients
back for a demote (offload/nftables.py); all of it without a socket (its fallback).

Values follow include/uapi/linux/netfilter/nf_tables.h; every integer attribute is big
endian; register contents are in the order the packet has them.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import itertools
import os
import select
import socket
import struct
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from ipaddress import IPv4Network

from lb.model import Endpoint, IPAddress, Protocol, ServiceKey
from offload.netns import inside
from offload.nft_rules import (
    AFFINITY_SIZE,
    FIREWALL,
    AddAffinity,
    AddChain,
    AddConns,
    AddCounter,
    AddFirewall,
    AddMasq,
    AddRule,
    AddService,
    AddSet,
    AffinitySet,
    Conns,
    DeleteChain,
    DeleteConns,
    DeleteCounter,
    DeleteFirewall,
    DeleteMasq,
    DeleteService,
    DeleteSet,
    DispatchRule,
    DnatRule,
    EndpointRule,
    FlushChain,
    NatPath,
    Op,
    Rule,
    SourceRule,
    SourceSet,
    StickyRule,
)

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_DUMP_INTR = 0x10  # the ruleset changed during the dump: it may be inconsistent
NLM_F_DUMP = 0x300  # NLM_F_ROOT | NLM_F_MATCH
NLA_TYPE_MASK = 0x3FFF  # an attribute's kind without NLA_F_NESTED, NLA_F_NET_BYTEORDER
DUMP_RECV = 1 << 20  # bytes per recv of a dump (the kernel sends at most ~32 KiB a time)
DUMP_TIMEOUT = 30.0  # seconds without a part of a dump's answer: the read fails
DUMP_TRIES = 3  # dumps of the same thing while the ruleset changes under them
#: the sequence number of every dump (a batch's are others): one exchange at a time on
#: a socket, and an unchanged answer is the same bytes each time
DUMP_SEQ = 1
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33
BUFFER = 32 << 20
NLM_F_CREATE, NLM_F_APPEND = 0x400, 0x800
NLA_F_NESTED = 0x8000

(MSG_NEWCHAIN, MSG_DELCHAIN, MSG_NEWRULE, MSG_DELRULE) = (3, 5, 6, 8)
(MSG_NEWSET, MSG_DELSET, MSG_NEWSETELEM, MSG_DELSETELEM) = (9, 11, 12, 14)
(MSG_NEWOBJ, MSG_GETOBJ, MSG_DELOBJ) = (18, 19, 20)
MSG_GETSETELEM = 13
OBJ_TABLE, OBJ_NAME, OBJ_TYPE, OBJ_DATA = 1, 2, 3, 4  # NFTA_OBJ_*
COUNTER_BYTES, COUNTER_PACKETS = 1, 2  # NFTA_COUNTER_*
ELEM_LIST_TABLE, ELEM_LIST_SET, ELEM_LIST_ELEMENTS = 1, 2, 3  # NFTA_SET_ELEM_LIST_*
LIST_ELEM = 1  # NFTA_LIST_ELEM

REG_VERDICT, REG_1, REG_2 = 0, 1, 2
REG32_01 = 9  # the second 32-bit word of REG_1 (a concatenation's second field)
REG32_05 = 13  # the second 32-bit word of REG_2
NFT_GOTO = -4
NF_DROP = 0
NFT_DATA_VERDICT = 0xFFFFFF00
OBJECT_COUNTER = 1
SET_ANONYMOUS, SET_CONSTANT, SET_INTERVAL, SET_MAP = 0x1, 0x2, 0x4, 0x8
SET_TIMEOUT, SET_EVAL = 0x10, 0x20
LOOKUP_INVERTED = 0x1  # NFT_LOOKUP_F_INV: the rule matches what is not in the set
ELEM_FLAGS, ELEM_USERDATA = 3, 6  # NFTA_SET_ELEM_*
ELEM_INTERVAL_END = 0x1  # NFT_SET_ELEM_INTERVAL_END
#: nft's user data on an interval's start whose end is the last address (no end element)
UDATA_ELEM_FLAGS, UDATA_INTERVAL_OPEN = 1, 0x1
TYPE_INTEGER, TYPE_IPADDR, TYPE_INET_SERVICE = 4, 7, 13  # nft's data types (for listings)
TYPE_ADDR_PORT = (TYPE_IPADDR << 6) | TYPE_INET_SERVICE  # the concatenation ipv4_addr . port
BYTEORDER_HOST, BYTEORDER_BIG = 1, 2
PROTO = {Protocol.TCP: socket.IPPROTO_TCP, Protocol.UDP: socket.IPPROTO_UDP}


class NftNetlinkError(Exception):
    pass


# --- attributes ---------------------------------------------------------------------------


_HEAD = struct.Struct("=HH").pack
_PAD = (b"", b"\0\0\0", b"\0\0", b"\0")  # by the payload's length modulo 4


def attr(kind: int, payload: bytes) -> bytes:
    size = 4 + len(payload)
    return _HEAD(size, kind) + payload + _PAD[size % 4]


def nest(kind: int, *children: bytes) -> bytes:
    return attr(kind | NLA_F_NESTED, b"".join(children))


@functools.lru_cache(maxsize=4096)
def u32(kind: int, value: int) -> bytes:
    """(Cached: a table's messages repeat a few registers, lengths and flags.)"""
    return attr(kind, struct.pack(">I", value & 0xFFFFFFFF))


def u64(kind: int, value: int) -> bytes:
    return attr(kind, struct.pack(">Q", value))


def string(kind: int, value: str) -> bytes:
    return attr(kind, value.encode() + b"\0")


def data(kind: int, value: bytes) -> bytes:
    return nest(kind, attr(1, value))  # NFTA_DATA_VALUE


def goto(kind: int, chain: str) -> bytes:
    # NFTA_DATA_VERDICT { NFTA_VERDICT_CODE, NFTA_VERDICT_CHAIN }
    return nest(kind, nest(2, u32(1, NFT_GOTO), string(2, chain)))


def host_u32(value: int) -> bytes:
    return value.to_bytes(4, sys.byteorder)


def udata_byteorder(order: int) -> bytes:
    """Set user data nft reads back to print keys (NFTNL_UDATA_SET_KEYBYTEORDER)."""
    return _udata(0, order)


def _udata(kind: int, value: int) -> bytes:
    return bytes([kind, 4]) + struct.pack("<I", value)


# --- expressions -----------------------------------------------------------------------------


def expr(name: str, *attrs: bytes) -> bytes:
    return nest(1, string(1, name), nest(2, *attrs))  # NFTA_LIST_ELEM { NAME, DATA }


def payload(base: int, offset: int, length: int, dreg: int) -> bytes:
    return expr("payload", u32(1, dreg), u32(2, base), u32(3, offset), u32(4, length))


def saddr(dreg: int = REG_1) -> bytes:
    return payload(1, 12, 4, dreg)  # network header, IPv4 source address


def masked(prefix_len: int) -> bytes:
    value = (0xFFFFFFFF << (32 - prefix_len)) & 0xFFFFFFFF
    return expr(
        "bitwise",
        u32(1, REG_1),
        u32(2, REG_1),
        u32(3, 4),
        data(4, struct.pack(">I", value)),
        data(5, b"\0\0\0\0"),
    )


def lookup(
    set_name: str,
    sreg: int,
    dreg: int | None = None,
    set_id: int | None = None,
    *,
    inverted: bool = False,
) -> bytes:
    attrs = [string(1, set_name), u32(2, sreg)]
    if dreg is not None:
        attrs.append(u32(3, dreg))
    if set_id is not None:
        attrs.append(u32(4, set_id))
    if inverted:
        attrs.append(u32(5, LOOKUP_INVERTED))  # NFTA_LOOKUP_FLAGS
    return expr("lookup", *attrs)


def jump_to(chain: str) -> bytes:
    return expr("immediate", u32(1, REG_VERDICT), goto(2, chain))


def drop() -> bytes:
    # NFTA_IMMEDIATE_DATA { NFTA_DATA_VERDICT { NFTA_VERDICT_CODE } }
    return expr("immediate", u32(1, REG_VERDICT), nest(2, nest(2, u32(1, NF_DROP))))


def immediate(dreg: int, value: bytes) -> bytes:
    return expr("immediate", u32(1, dreg), data(2, value))


# --- the batch -----------------------------------------------------------------------------


#: What a message of a batch does, as nft would say it: made only for an error message.
What = Callable[[], str]


@dataclass
class Batch:
    """Messages of one transaction, each with what it does (for error messages)."""

    messages: list[tuple[int, int, bytes, What]] = field(default_factory=list)
    next_set_id: int = 1
    #: Anonymous sets get names of lb's own, not "__map%d": the kernel finds a free %d by
    #: reading the name of every set of the table, for every new one.
    map_names: Iterator[int] = field(default_factory=itertools.count)

    def add(self, msg: int, flags: int, attrs: Iterable[bytes], what: What) -> None:
        self.messages.append((msg, flags, b"".join(attrs), what))

    def encode(self, seq: int) -> tuple[bytes, dict[int, What]]:
        out = [_message(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, seq, b"", socket.AF_UNSPEC)]
        what = {}
        for i, (msg, flags, attrs, text) in enumerate(self.messages, start=1):
            kind = (NFNL_SUBSYS_NFTABLES << 8) | msg
            out.append(_message(kind, NLM_F_REQUEST | flags, seq + i, attrs))
            what[seq + i] = text
        end = seq + len(self.messages) + 1
        out.append(_message(NFNL_MSG_BATCH_END, NLM_F_REQUEST, end, b"", socket.AF_UNSPEC))
        return b"".join(out), what


def _message(kind: int, flags: int, seq: int, attrs: bytes, family: int = socket.AF_INET) -> bytes:
    res_id = NFNL_SUBSYS_NFTABLES if family == socket.AF_UNSPEC else 0
    body = struct.pack("=BBH", family, 0, socket.htons(res_id)) + attrs
    return struct.pack("=IHHII", 16 + len(body), kind, flags, seq, 0) + body


def _table(name: str) -> bytes:
    return string(1, name)


def encode(ops: Iterable[Op], map_names: Iterator[int] | None = None) -> Batch:
    """The batch that does what these operations' nft text says (`map_names`: numbers for
    the names of anonymous maps, unique for the socket's life)."""
    b = Batch() if map_names is None else Batch(map_names=map_names)
    for op in ops:
        text = op.nft  # its text is made only if the kernel refuses it
        match op:
            case AddChain(table, name):
                b.add(MSG_NEWCHAIN, NLM_F_CREATE, [_table(table), string(3, name)], text)
            case FlushChain(table, name):
                b.add(MSG_DELRULE, 0, [_table(table), string(2, name)], text)
            case DeleteChain(table, name):
                b.add(MSG_DELCHAIN, 0, [_table(table), string(3, name)], text)
            case AddCounter(table, name):
                counter = nest(4, u64(1, 0), u64(2, 0))  # NFTA_OBJ_DATA { bytes, packets }
                b.add(
                    MSG_NEWOBJ,
                    NLM_F_CREATE,
                    [_table(table), string(2, name), u32(3, OBJECT_COUNTER), counter],
                    text,
                )
            case DeleteCounter(table, name):
                attrs = [_table(table), string(2, name), u32(3, OBJECT_COUNTER)]
                b.add(MSG_DELOBJ, 0, attrs, text)
            case AddSet(table, name, AffinitySet(timeout)):
                b.add(
                    MSG_NEWSET,
                    NLM_F_CREATE,
                    [
                        _table(table),
                        string(2, name),
                        u32(3, SET_TIMEOUT | SET_EVAL),
                        u32(4, TYPE_IPADDR),
                        u32(5, 4),
                        u32(10, _set_id(b)),
                        nest(9, u32(1, AFFINITY_SIZE)),
                        u64(11, timeout * 1000),
                        attr(13, udata_byteorder(BYTEORDER_BIG)),
                    ],
                    text,
                )
            case AddSet(table, name, SourceSet(networks)):
                set_id = _set_id(b)
                b.add(
                    MSG_NEWSET,
                    NLM_F_CREATE,
                    [
                        _table(table),
                        string(2, name),
                        u32(3, SET_INTERVAL),
                        u32(4, TYPE_IPADDR),
                        u32(5, 4),
                        u32(10, set_id),
                        attr(13, udata_byteorder(BYTEORDER_BIG)),
                    ],
                    text,
                )
                if networks:
                    head = [_table(table), string(2, name), u32(4, set_id)]
                    _element_messages(b, MSG_NEWSETELEM, head, _intervals(networks), text)
            case DeleteSet(table, name):
                b.add(MSG_DELSET, 0, [_table(table), string(2, name)], text)
            case AddRule(table, chain, rule):
                b.add(
                    MSG_NEWRULE,
                    NLM_F_CREATE | NLM_F_APPEND,
                    [_table(table), string(2, chain), nest(4, *_rule(b, table, rule, text))],
                    text,
                )
            case AddAffinity(table, name, clients):
                items = [
                    nest(1, data(1, ip.packed), u64(4, ms))  # NFTA_SET_ELEM_KEY, _TIMEOUT
                    for ip, ms in clients
                ]
                attrs = [_table(table), string(2, name), nest(3, *items)]
                b.add(MSG_NEWSETELEM, NLM_F_CREATE, attrs, text)
            case AddService(table, key, chain):
                _elements(
                    b, MSG_NEWSETELEM, table, "services", [(_service_key(key), chain)], text=text
                )
            case DeleteService(table, key):
                _elements(
                    b, MSG_DELSETELEM, table, "services", [(_service_key(key), None)], text=text
                )
            case AddFirewall(table, key, chain):
                _elements(
                    b, MSG_NEWSETELEM, table, FIREWALL, [(_service_key(key), chain)], text=text
                )
            case DeleteFirewall(table, key):
                _elements(
                    b, MSG_DELSETELEM, table, FIREWALL, [(_service_key(key), None)], text=text
                )
            case AddConns(counters, table):
                _elements(b, MSG_NEWSETELEM, table, "conns", _conns(counters), text=text)
            case DeleteConns(counters, table):
                keys = [(key, None) for key, _ in _conns(counters)]
                _elements(b, MSG_DELSETELEM, table, "conns", keys, text=text)
            case AddMasq(paths, table):
                _elements(b, MSG_NEWSETELEM, table, "masq_paths", _masq_keys(paths), text=text)
            case DeleteMasq(paths, table):
                _elements(b, MSG_DELSETELEM, table, "masq_paths", _masq_keys(paths), text=text)
    return b


def _set_id(b: Batch) -> int:
    b.next_set_id += 1
    return b.next_set_id


def _port(port: int) -> bytes:
    """A port as nft concatenates it: big endian, padded to 4 bytes."""
    return struct.pack(">H", port) + b"\0\0"


def _fields(ip: IPAddress, protocol: Protocol, port: int) -> bytes:
    """Address . protocol . port, each field padded to 4 bytes (nft_rules.fields)."""
    return ip.packed + bytes([PROTO[protocol], 0, 0, 0]) + _port(port)


def _service_key(key: ServiceKey) -> bytes:
    return _fields(key.listen.ip, key.protocol, key.listen.port)


def _addr_port(e: Endpoint) -> bytes:
    """A backend as address . port (a map's data, or the end of a `conns` key)."""
    return e.ip.packed + _port(e.port)


def _conns(counters: Iterable[Conns]) -> list[tuple[bytes, Value]]:
    """VIP . protocol . port . backend . port -> the counter's name."""
    return [(_service_key(c.key) + _addr_port(c.backend), Counter(c.counter)) for c in counters]


def _masq_keys(paths: Iterable[NatPath]) -> list[tuple[bytes, Value]]:
    return [
        (p.source.packed + _fields(p.backend.ip, p.protocol, p.backend.port), None)
        for p in sorted(paths, key=NatPath.sort_key)
    ]


@dataclass(frozen=True, slots=True)
class Counter:
    """An element's value: a named counter (the map's elements are object references)."""

    name: str


#: What a map element maps to: a chain to go to, a counter, or bytes (address . port).
Value = str | Counter | bytes | None


#: The most bytes of elements put in one message's element list (an attribute's length
#: is 16 bits, headers included).
ELEMENTS_BYTES = 60_000


def _elements(
    b: Batch,
    msg: int,
    table: str,
    set_name: str,
    elements: Sequence[tuple[bytes, Value]],
    *,
    text: What,
    set_id: int | None = None,
) -> None:
    items = []
    for key, value in elements:
        parts = [data(1, key)]  # NFTA_SET_ELEM_KEY
        match value:
            case str(chain):
                parts.append(goto(2, chain))  # NFTA_SET_ELEM_DATA
            case Counter(name):
                parts.append(string(9, name))  # NFTA_SET_ELEM_OBJREF
            case bytes(raw):
                parts.append(data(2, raw))
        items.append(nest(1, *parts))
    head = [_table(table), string(2, set_name)]
    if set_id is not None:
        head.append(u32(4, set_id))
    _element_messages(b, msg, head, items, text)


def _element_messages(
    b: Batch, msg: int, head: list[bytes], items: list[bytes], text: What
) -> None:
    """The element messages for `items` (NFTA_LIST_ELEM each) of the set `head` names.
    The element list is one attribute, whose length is 16 bits: past ELEMENTS_BYTES, the
    elements go in several messages of the same batch (about 1,000 services' map
    elements each), as nft splits them."""
    start, size = 0, 0
    for i, item in enumerate(items):
        if size + len(item) > ELEMENTS_BYTES and i > start:
            b.add(
                msg,
                NLM_F_CREATE if msg == MSG_NEWSETELEM else 0,
                [*head, nest(3, *items[start:i])],
                text,
            )
            start, size = i, 0
        size += len(item)
    b.add(msg, NLM_F_CREATE if msg == MSG_NEWSETELEM else 0, [*head, nest(3, *items[start:])], text)


def _intervals(networks: Sequence[IPv4Network]) -> list[bytes]:
    """An interval set's elements, as nft sends them: each network's first address, then
    the address after its last flagged as an interval's end (none for an interval up to
    255.255.255.255: its start says so in its user data); the end of an interval below
    the first, at 0.0.0.0, unless one starts there."""
    items = []
    if networks and int(networks[0].network_address) != 0:
        items.append(nest(1, u32(ELEM_FLAGS, ELEM_INTERVAL_END), data(1, bytes(4))))
    for n in networks:
        after = int(n.broadcast_address) + 1
        if after > 0xFFFFFFFF:
            open_end = attr(ELEM_USERDATA, _udata(UDATA_ELEM_FLAGS, UDATA_INTERVAL_OPEN))
            items.append(nest(1, data(1, n.network_address.packed), open_end))
            continue
        items.append(nest(1, data(1, n.network_address.packed)))
        items.append(nest(1, u32(ELEM_FLAGS, ELEM_INTERVAL_END), data(1, after.to_bytes(4, "big"))))
    return items


def _anonymous_map(b: Batch, table: str, values: Sequence[Value], text: What) -> tuple[str, int]:
    """A constant map slot -> goto chain (str) or address . port (bytes), created in the
    batch; its name and id."""
    set_id = _set_id(b)
    name = f"__lbmap{next(b.map_names)}"
    if all(isinstance(v, str) for v in values):
        typed = [u32(6, NFT_DATA_VERDICT), u32(7, 0)]
        udata = udata_byteorder(BYTEORDER_HOST)
    else:  # as nft declares them: key byte order host, data's unset, no intervals
        typed = [u32(6, TYPE_ADDR_PORT), u32(7, 8)]
        udata = udata_byteorder(BYTEORDER_HOST) + _udata(1, 0) + _udata(6, 0)
    b.add(
        MSG_NEWSET,
        NLM_F_CREATE,
        [
            _table(table),
            string(2, name),
            u32(3, SET_ANONYMOUS | SET_CONSTANT | SET_MAP),
            u32(4, TYPE_INTEGER),
            u32(5, 4),
            *typed,
            u32(10, set_id),
            nest(9, u32(1, len(values))),
            attr(13, udata),
        ],
        text,
    )
    elements = [(host_u32(i), v) for i, v in enumerate(values)]
    _elements(b, MSG_NEWSETELEM, table, name, elements, text=text, set_id=set_id)
    return name, set_id


def _rule(b: Batch, table: str, rule: Rule, text: What) -> list[bytes]:
    match rule:
        case EndpointRule(affinity, prefix_len, protocol, backend):
            return [
                saddr(),
                masked(prefix_len),
                expr("dynset", string(1, affinity), u32(3, 1), u32(4, REG_1)),
                *_l4proto(protocol),
                immediate(REG_1, backend.ip.packed),
                immediate(REG_2, struct.pack(">H", backend.port)),
                _dnat(REG_1, REG_2),
            ]
        case StickyRule(prefix_len, affinity, chain):
            return [saddr(), masked(prefix_len), lookup(affinity, REG_1), jump_to(chain)]
        case DispatchRule(hashed, with_port, chains):
            name, set_id = _anonymous_map(b, table, chains, text)
            pick = _pick(hashed, with_port, len(chains))
            return [*pick, lookup(name, REG_1, REG_VERDICT, set_id)]
        case SourceRule(sources):
            return [saddr(), lookup(sources, REG_1, inverted=True), drop()]
        case DnatRule(hashed, with_port, protocol, targets):
            slots = [_addr_port(e) for e in targets]
            name, set_id = _anonymous_map(b, table, slots, text)
            return [
                *_l4proto(protocol),
                *_pick(hashed, with_port, len(targets)),
                lookup(name, REG_1, REG_1, set_id),
                _dnat(REG_1, REG32_01),  # address . port, as the map's data
            ]
    raise AssertionError(rule)


def _l4proto(protocol: Protocol) -> list[bytes]:
    return [
        expr("meta", u32(2, 16), u32(1, REG_1)),  # l4proto
        expr("cmp", u32(1, REG_1), u32(2, 0), data(3, bytes([PROTO[protocol]]))),
    ]


def _pick(hashed: bool, with_port: bool, slots: int) -> list[bytes]:
    """The slot into REG_1: `jhash` of the client (and its port) or `numgen inc`."""
    if not hashed:
        return [expr("numgen", u32(1, REG_1), u32(2, slots), u32(3, 0), u32(4, 0))]
    out = [saddr(REG_2)]
    if with_port:
        out.append(payload(2, 0, 2, REG32_05))  # transport header: source port
    out.append(
        expr(
            "hash",
            u32(1, REG_2),
            u32(2, REG_1),
            u32(3, 8 if with_port else 4),
            u32(4, slots),
            u32(5, 0),
            u32(6, 0),
            u32(7, 0),  # jenkins
        )
    )
    return out


def _dnat(addr: int, port: int) -> bytes:
    return expr(
        "nat",
        u32(1, 1),  # DNAT
        u32(2, socket.AF_INET),
        u32(3, addr),
        u32(5, port),
        u32(7, 0x2),  # NF_NAT_RANGE_PROTO_SPECIFIED
    )


# --- dumps -----------------------------------------------------------------------------------

_HEADER = struct.Struct("=IHHII")  # struct nlmsghdr
_ATTR = struct.Struct("=HH")  # struct nlattr
_INT = struct.Struct("=i")
_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")


class _CounterReader:
    """Takes the counters of a NFT_MSG_GETOBJ dump: NFTA_OBJ_NAME -> (NFTA_COUNTER_PACKETS,
    NFTA_COUNTER_BYTES) of NFTA_OBJ_DATA, for the counters of one table."""

    __slots__ = ("out", "table")

    def __init__(self, out: list[tuple[str, tuple[int, int]]], table: bytes) -> None:
        self.out = out
        self.table = table + b"\0"  # as the attribute holds it

    def __call__(self, buf: bytearray, at: int, end: int) -> None:
        name = None
        ours = False
        kind_of = packets = count = -1
        while at + 4 <= end:
            size, kind = _ATTR.unpack_from(buf, at)
            if size < 4:
                return
            kind &= NLA_TYPE_MASK
            if kind == OBJ_NAME:
                name = _text(buf, at + 4, at + size)
            elif kind == OBJ_TABLE:
                ours = size == 4 + len(self.table) and buf.startswith(self.table, at + 4)
            elif kind == OBJ_TYPE:
                (kind_of,) = _BE32.unpack_from(buf, at + 4)
            elif kind == OBJ_DATA:
                inner, stop = at + 4, at + size
                while inner + 4 <= stop:
                    isize, ikind = _ATTR.unpack_from(buf, inner)
                    if isize < 4:
                        break
                    ikind &= NLA_TYPE_MASK
                    if ikind == COUNTER_PACKETS:
                        (packets,) = _BE64.unpack_from(buf, inner + 4)
                    elif ikind == COUNTER_BYTES:
                        (count,) = _BE64.unpack_from(buf, inner + 4)
                    inner += (isize + 3) & ~3
            at += (size + 3) & ~3
        if name is not None and ours and kind_of == OBJECT_COUNTER and count >= 0:
            self.out.append((name, (max(packets, 0), count)))


class _ElementCounter:
    """Counts the elements (NFTA_LIST_ELEM of NFTA_SET_ELEM_LIST_ELEMENTS) of a
    NFT_MSG_GETSETELEM dump."""

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, buf: bytearray, at: int, end: int) -> None:
        while at + 4 <= end:
            size, kind = _ATTR.unpack_from(buf, at)
            if size < 4:
                return
            if kind & NLA_TYPE_MASK == ELEM_LIST_ELEMENTS:
                inner, stop = at + 4, at + size
                while inner + 4 <= stop:
                    isize, ikind = _ATTR.unpack_from(buf, inner)
                    if isize < 4:
                        break
                    if ikind & NLA_TYPE_MASK == LIST_ELEM:
                        self.count += 1
                    inner += (isize + 3) & ~3
            at += (size + 3) & ~3


@dataclass(frozen=True, slots=True)
class _Part:
    """What one part of a counters' dump held: its counters, whether it ends the dump,
    whether it is consistent."""

    items: list[tuple[str, tuple[int, int]]]
    done: bool
    consistent: bool


class _CounterDump:
    """Takes the parts of a counters' dump: a part known from the dump before (`seen`,
    by digest) gives the counters read then, another is parsed."""

    def __init__(self, table: bytes, seen: dict[bytes, _Part]) -> None:
        self.items: list[tuple[str, tuple[int, int]]] = []
        self.reader = _CounterReader(self.items, table)
        self.seen = seen
        self.parts: dict[bytes, _Part] = {}

    def __call__(self, buf: bytearray, size: int) -> tuple[bool, bool]:
        digest = hashlib.blake2b(self.reader.table, digest_size=16)  # the parse depends on it
        digest.update(memoryview(buf)[:size])
        key = digest.digest()
        known = self.seen.get(key)
        if known is None:
            start = len(self.items)
            done, consistent = _scan(buf, size, self.reader)
            known = _Part(self.items[start:], done, consistent)
        else:
            self.items.extend(known.items)
        self.parts[key] = known
        return known.done, known.consistent


def _scan(
    buf: bytearray, size: int, take: Callable[[bytearray, int, int], None]
) -> tuple[bool, bool]:
    """The messages of one part of a dump's answer: the attributes of each nf_tables one
    to `take` (the buffer, where they start and end). Whether the dump ends with this
    part (NLMSG_DONE), and whether the part is consistent (no NLM_F_DUMP_INTR); OSError
    for the kernel's error answer."""
    offset, consistent = 0, True
    while offset + 16 <= size:
        length, answer, flags, seq, _ = _HEADER.unpack_from(buf, offset)
        if length < 16 or offset + length > size:
            raise NftNetlinkError(f"a malformed netlink answer ({length} bytes)")
        if seq == DUMP_SEQ:
            if answer in (NLMSG_DONE, NLMSG_ERROR):
                (code,) = _INT.unpack_from(buf, offset + 16) if length >= 20 else (0,)
                if code < 0:
                    raise OSError(-code, os.strerror(-code))
                if answer == NLMSG_DONE:
                    return True, consistent
            elif answer >> 8 == NFNL_SUBSYS_NFTABLES:
                if flags & NLM_F_DUMP_INTR:
                    consistent = False
                take(buf, offset + 20, offset + length)  # past struct nfgenmsg
        offset += (length + 3) & ~3
    return False, consistent


def _text(buf: bytearray, start: int, end: int) -> str:
    """A string attribute's value (NUL-terminated in the attribute)."""
    nul = buf.find(0, start, end)
    return buf[start : nul if nul >= 0 else end].decode(errors="replace")


# --- the socket ----------------------------------------------------------------------------


class NftNetlink:
    """A netlink socket to nf_tables in the network namespace it was opened in (`netns`:
    a named one, `ip netns add NAME`, instead of this process's)."""

    def __init__(self, netns: str | None = None) -> None:
        with inside(netns) if netns is not None else contextlib.nullcontext():
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.bind((0, 0))
        for force, plain in (
            (SO_SNDBUFFORCE, socket.SO_SNDBUF),
            (SO_RCVBUFFORCE, socket.SO_RCVBUF),
        ):
            try:  # a batch goes in one send: room for thousands of messages
                self.sock.setsockopt(socket.SOL_SOCKET, force, BUFFER)
            except OSError:
                self.sock.setsockopt(socket.SOL_SOCKET, plain, BUFFER)
        self.seq = int.from_bytes(os.urandom(3), "big") << 4
        # nft names the maps of its own transactions __map<n>; lb's have a random base so
        # that a restarted lb does not meet the names of the one before
        self.map_names = itertools.count(int.from_bytes(os.urandom(4), "big") << 16)
        #: one exchange at a time: the dataplane runs batches and dumps in threads
        #: (asyncio.to_thread), and an answer must reach the exchange that asked for it
        self._lock = threading.Lock()
        self._buffer = bytearray(DUMP_RECV)
        self._parts: dict[bytes, _Part] = {}  # the parts of the last counters' dump

    def close(self) -> None:
        self.sock.close()

    def run(self, ops: list[Op]) -> None:
        """Apply the operations as one transaction, or raise NftNetlinkError naming the
        operations the kernel refused (and then nothing of them is applied).

        The kernel handles a batch within the send itself and answers only errors: once
        the send returns, every answer is already queued on the socket."""
        if ops:
            self.send(self.prepare(ops))

    def prepare(self, ops: list[Op]) -> Batch:
        """The operations' messages, for `send`: pure work, which may go on in one thread
        while another sends the batch before (a table built in chunks: the kernel commits
        one while lb encodes the next)."""
        return encode(ops, self.map_names)

    def send(self, batch: Batch) -> None:
        """`run`'s second half: one transaction of `prepare`'s batch."""
        with self._lock:
            self.seq += len(batch.messages) + 2
            blob, what = batch.encode(self.seq)
            self._drain()  # nothing stale may be taken for this batch's answer
            self.sock.sendall(blob)
            answers = self._drain()
        errors = [
            f"{what[seq]() if seq in what else 'the batch'}: {os.strerror(-code)}"
            for seq, code in answers
        ]
        if errors:
            raise NftNetlinkError("; ".join(errors[:5]) + (" ..." if len(errors) > 5 else ""))

    def counters(self, table: str) -> dict[str, tuple[int, int]]:
        """The named counters of table `ip TABLE`: name -> (packets, bytes), as `nft -j
        list counters table ip TABLE` lists them, in one dump (NFT_MSG_GETOBJ, which the
        kernel filters by table and type), made again if the ruleset changed during it
        (DUMP_TRIES in all; the last is taken). A table that is not there has none.
        OSError if the kernel refuses the dump.

        A part of the answer the same, byte for byte, as one of the dump before (an idle
        table's all are: every dump has sequence number DUMP_SEQ) is not parsed again:
        its counters are those read then, found by the part's digest."""
        request = string(OBJ_TABLE, table) + u32(OBJ_TYPE, OBJECT_COUNTER)
        for _ in range(DUMP_TRIES):
            dump = _CounterDump(table.encode(), self._parts)
            try:
                consistent = self._dump(MSG_GETOBJ, request, dump)
            except FileNotFoundError:  # no table of that name (a kernel that looked it up)
                return {}
            self._parts = dump.parts  # the parts of this dump only: as many as it had
            if consistent:
                break
        return dict(dump.items)

    def counter(self, table: str, name: str) -> tuple[int, int] | None:
        """One named counter of table `ip TABLE`: (packets, bytes), or None if there is
        none. NFT_MSG_GETOBJ for that object alone: a lookup, not a dump of them all."""
        request = string(OBJ_TABLE, table) + string(OBJ_NAME, name)
        request += u32(OBJ_TYPE, OBJECT_COUNTER)
        items: list[tuple[str, tuple[int, int]]] = []
        reader = _CounterReader(items, table.encode())
        kind = (NFNL_SUBSYS_NFTABLES << 8) | MSG_GETOBJ
        buf = self._buffer
        with self._lock:
            self._drain()  # nothing stale may be taken for this answer
            self.sock.sendall(_message(kind, NLM_F_REQUEST | NLM_F_ACK, DUMP_SEQ, request))
            while True:  # the object, then the acknowledgement (or only an error)
                size = self._receive(buf)
                offset = 0
                while offset + 16 <= size:
                    length, answer, _, seq, _ = _HEADER.unpack_from(buf, offset)
                    if length < 16 or offset + length > size:
                        raise NftNetlinkError(f"a malformed netlink answer ({length} bytes)")
                    if seq == DUMP_SEQ and answer == NLMSG_ERROR:
                        (code,) = _INT.unpack_from(buf, offset + 16)
                        if code == -errno.ENOENT:
                            return None
                        if code < 0:
                            raise OSError(-code, os.strerror(-code))
                        return dict(items).get(name)
                    if seq == DUMP_SEQ and answer >> 8 == NFNL_SUBSYS_NFTABLES:
                        reader(buf, offset + 20, offset + length)  # past struct nfgenmsg
                    offset += (length + 3) & ~3

    def set_sizes(self, table: str, names: Iterable[str]) -> dict[str, int]:
        """How many elements each of these sets of table `ip TABLE` holds, as `nft list
        set` lists them (the kernel leaves expired elements out of a dump): one dump
        (NFT_MSG_GETSETELEM) per set. A set, or table, that is not there is left out.
        OSError if the kernel refuses a dump."""
        out: dict[str, int] = {}
        for name in names:
            request = string(ELEM_LIST_TABLE, table) + string(ELEM_LIST_SET, name)
            for _ in range(DUMP_TRIES):
                reader = _ElementCounter()
                try:
                    consistent = self._dump(MSG_GETSETELEM, request, partial(_scan, take=reader))
                except FileNotFoundError:  # deleted, maybe while it was counted
                    out.pop(name, None)
                    break
                out[name] = reader.count
                if consistent:
                    break
        return out

    def _dump(
        self, msg: int, attrs: bytes, part: Callable[[bytearray, int], tuple[bool, bool]]
    ) -> bool:
        """Ask for a dump and hand each part of the answer to `part` (the receive buffer,
        good for that call only, and the part's size), which says whether the dump ends
        with it and whether it is consistent (`_scan`), up to the part with NLMSG_DONE.
        Whether the dump was consistent: the ruleset did not change while the kernel
        made it (no NLM_F_DUMP_INTR). OSError if the kernel refuses.

        The kernel answers in parts of up to ~32 KiB, each made as the one before is
        received: one recv per part, parsed in place."""
        kind = (NFNL_SUBSYS_NFTABLES << 8) | msg
        buf = self._buffer
        consistent = True
        with self._lock:
            self._drain()  # nothing stale may be taken for this dump, no dump under way
            self.sock.sendall(_message(kind, NLM_F_REQUEST | NLM_F_DUMP, DUMP_SEQ, attrs))
            while True:
                done, whole = part(buf, self._receive(buf))
                consistent = consistent and whole
                if done:
                    return consistent

    def _receive(self, buf: bytearray) -> int:
        """One part of a dump into `buf`: its size. The kernel makes the next part as a
        recv takes the one before, so it is there at once; NftNetlinkError if nothing
        comes within DUMP_TIMEOUT (a refresh must not wait forever)."""
        try:
            return self.sock.recv_into(buf, 0, socket.MSG_DONTWAIT)
        except BlockingIOError:
            poll = select.poll()  # not select(): lb may hold more than 1,024 descriptors
            poll.register(self.sock, select.POLLIN)
            if not poll.poll(DUMP_TIMEOUT * 1000):
                raise NftNetlinkError(f"no answer to a dump in {DUMP_TIMEOUT:g} s") from None
            return self.sock.recv_into(buf, 0, socket.MSG_DONTWAIT)

    def _drain(self) -> list[tuple[int, int]]:
        """The (sequence, error) answers waiting on the socket (taken with the lock held:
        into the socket's one buffer)."""
        out: list[tuple[int, int]] = []
        reply = self._buffer
        while True:
            try:
                length = self.sock.recv_into(reply, 0, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return out
            offset = 0
            while offset + 16 <= length:
                size, kind, _, seq, _ = struct.unpack_from("=IHHII", reply, offset)
                if kind == NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", reply, offset + 16)
                    if code:
                        out.append((seq, code))
                offset += max(size + (-size % 4), 16)
