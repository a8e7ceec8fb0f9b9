"""Load and validate the YAML config file into the frozen model.

Two passes, both always run, so that one bad value never hides another:
1. pydantic (strict types, ranges, unknown keys, durations, addresses), per service;
2. semantic checks across fields and services (duplicates, flags, netmasks, ...), which
   look only at the values that parse.
Every problem is reported with its path (`services[0].backends[1].weight`) and the line
of the file it sits on; nothing is built unless there are none. The `services` list is
read one service at a time, each checked (both passes) as soon as it is read: reading
stops at the MAX_COLLECTED_PROBLEMS-th problem, so that a file with a problem on every
line costs milliseconds, not the whole file's parse. A plain file is first read without
nodes or lines (`_plain_data`), and again with them only if it has a problem
(docs/configuration.md, "Bounds of the loader").
"""

from __future__ import annotations

import collections
import contextlib
import difflib
import functools
import gc
import ipaddress
import math
import re
import socket
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, Strict, ValidationError
from pydantic_core import ErrorDetails
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError

from lb.model import (
    ADMIN_DEFAULT,
    HEALTHZ_DEFAULT,
    TCP_IDLE_TIMEOUT,
    UDP_IDLE_TIMEOUT,
    UDP_MAX_FLOWS,
    AdminSettings,
    AdminState,
    Backend,
    CheckKind,
    Config,
    Endpoint,
    HealthCheck,
    IPAddress,
    IPNetwork,
    KubernetesSettings,
    Mode,
    OffloadSettings,
    Persistence,
    Protocol,
    ProxyProtocol,
    SchedFlag,
    SchedulerName,
    Service,
    SourceAddress,
)
from lb.sched import SCHEDULERS, with_flags

PathPart = str | int
T = TypeVar("T")

# --- what loading a file may cost (docs/configuration.md, "Bounds of the loader") -----
# A file comes from an operator, but a reload must never take the balancer down with it:
# each bound is refused with a clear problem, not a spin, a crash or a traceback.

#: The largest file read (a 10,000-service file with 10 backends each is about 6 MB).
MAX_FILE_BYTES = 64 * 1024 * 1024
#: The deepest nesting of mappings and lists (a config needs six levels).
MAX_DEPTH = 64
#: Nodes reached through aliases and merge keys beyond the file's own: an alias bomb
#: (anchors nested nine deep, 446 bytes) expands to a billion nodes.
MAX_ALIAS_NODES = 1_000_000
#: Problems listed in an error; the rest are counted.
MAX_LISTED_PROBLEMS = 100
#: Problems found before the loader stops reading: a 20 MB file with a problem on every
#: line is reported in milliseconds, not a minute and gigabytes.
MAX_COLLECTED_PROBLEMS = 1000
#: The longest duration anywhere (timeouts, intervals, grace periods): one year.
MAX_DURATION = 365 * 86400.0
#: The longest persistence timeout: IPVS keeps it as seconds x HZ in 32 bits (30 days).
MAX_PERSISTENCE = 30 * 86400
#: The largest connection limit or threshold (IPVS keeps thresholds in 32 bits).
MAX_COUNT = 2**31 - 1


@dataclass(frozen=True, slots=True)
class Problem:
    path: tuple[PathPart, ...]
    message: str
    line: int | None = None

    @property
    def where(self) -> str:
        return format_path(self.path)


class ConfigError(Exception):
    """The config is not valid; `problems` lists every reason, in file order."""

    def __init__(self, source: str, problems: Sequence[Problem], complete: bool = True) -> None:
        self.source = source
        self.problems = list(problems)
        #: False: the loader stopped at MAX_COLLECTED_PROBLEMS, the rest of the file unread.
        self.complete = complete
        super().__init__(self.render())

    def __reduce__(self) -> tuple[type[ConfigError], tuple[str, list[Problem], bool]]:
        return (ConfigError, (self.source, self.problems, self.complete))  # from lb.loader

    @property
    def listed(self) -> list[Problem]:
        """The problems worth showing: the first MAX_LISTED_PROBLEMS."""
        return self.problems[:MAX_LISTED_PROBLEMS]

    @property
    def unlisted(self) -> int:
        return max(0, len(self.problems) - MAX_LISTED_PROBLEMS)

    def render(self) -> str:
        lines = []
        for p in self.listed:
            loc = f"{self.source}:{p.line}" if p.line else self.source
            lines.append(f"{loc}: {p.where}: {p.message}" if p.path else f"{loc}: {p.message}")
        if self.unlisted:
            more = f"{self.source}: ... and {self.unlisted} more problems"
            if not self.complete:
                more += f" (reading stopped at {len(self.problems):,}: the rest is unchecked)"
            lines.append(more)
        return "\n".join(lines)


def format_path(path: Iterable[PathPart]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


# --- value parsers (shared by both passes) ---------------------------------------------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: object) -> float:
    """`500ms`, `2s`, `5m`, `1h`, or a bare number of seconds: finite, 0 to MAX_DURATION."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError("must be a duration such as 500ms, 2s, 5m or a number of seconds")
    if isinstance(value, int) and abs(value) > MAX_DURATION:  # float() of it may overflow
        seconds = math.inf if value > 0 else -math.inf
    elif isinstance(value, int | float):
        seconds = float(value)
    else:
        m = _DURATION.match(value)
        if not m:
            raise ValueError(f"{value!r} is not a duration (use 500ms, 2s, 5m, 1h or seconds)")
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    if math.isnan(seconds):
        raise ValueError("must be a number of seconds, not NaN")
    if seconds < 0:
        raise ValueError("must not be negative")
    if seconds > MAX_DURATION:
        raise ValueError(f"must be at most 365 days ({MAX_DURATION:.0f}s)")
    return seconds


def parse_endpoint(value: object) -> Endpoint:
    if not isinstance(value, str):
        raise ValueError("must be a string ADDRESS:PORT, e.g. 127.0.0.1:8080 or [::1]:8080")
    return _parse_endpoint(value)


#: One int object per port number written (Python keeps only 0-256): 100,000 backends
#: on port 8080 share one 8080, not 100,000 (3.5 MB at 10,000 services).
_PORTS: dict[str, int] = {}


@functools.cache
def _parse_endpoint(text: str) -> Endpoint:
    """Each address is read by two passes (model, then meaning): parse it once (the cache
    lives for one parse_config). A plain IPv4 ADDRESS:PORT, what large files are made
    of, is read by the C library's inet_pton (a quarter of ipaddress's time, and as
    strict: four decimal octets, no leading zero); anything else by Endpoint.parse."""
    host, _, port = text.rpartition(":")
    if port.isdecimal() and 0 < int(port) < 65536:
        try:
            ip = ipaddress.IPv4Address(socket.inet_pton(socket.AF_INET, host))
            return Endpoint(ip, _PORTS.setdefault(port, int(port)))
        except (OSError, ValueError):  # not a dotted quad; a NUL or a non-ASCII letter
            pass
    return Endpoint.parse(text)


def parse_network(value: object) -> IPNetwork:
    """A network in CIDR notation: `10.0.0.0/8`, `2001:db8::/32`, or one address."""
    if not isinstance(value, str):
        raise ValueError("must be a network in CIDR notation, e.g. 10.0.0.0/8")
    try:
        return ipaddress.ip_network(value.strip(), strict=True)
    except ValueError as e:
        raise ValueError(f"{value!r} is not a network in CIDR notation ({e})") from None


MAX_SOURCES = 1000  # allowed_sources entries per service
Network = Annotated[IPNetwork, BeforeValidator(parse_network)]


def parse_prefix(value: object, family: int) -> int:
    """A netmask as a prefix length: `255.255.255.0`, `/24` or `24` (IPv6: a prefix length)."""
    bits = 32 if family == 4 else 128
    if isinstance(value, bool):
        raise ValueError("must be a netmask")
    if isinstance(value, str) and "." in value:
        if family != 4:
            raise ValueError("an IPv6 service takes a prefix length (1-128), not a dotted mask")
        try:
            mask = int(ipaddress.IPv4Address(value))
        except ValueError:
            raise ValueError(f"{value!r} is not a netmask") from None
        prefix = 32 - ((~mask & 0xFFFFFFFF).bit_length())
        if prefix == 0 or mask != (0xFFFFFFFF << (32 - prefix)) & 0xFFFFFFFF:
            raise ValueError(
                f"{value} is not a netmask (its one bits must be contiguous from the left)"
            )
        return prefix
    text = value.lstrip("/") if isinstance(value, str) else value
    if isinstance(text, str) and text.isdigit():
        text = int(text)
    if not isinstance(text, int) or not 1 <= text <= bits:
        raise ValueError(f"{value!r} is not a netmask (a dotted mask or a prefix length 1-{bits})")
    return text


# --- pass 1: structure (pydantic) ---------------------------------------------------------

StrictInt = Annotated[int, Strict()]
Duration = Annotated[float, BeforeValidator(parse_duration)]
Addr = Annotated[Endpoint, BeforeValidator(parse_endpoint)]
Port = Annotated[int, Strict(), Field(ge=1, le=65535)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, frozen=True)


class BackendIn(_Model):
    address: Addr
    weight: Annotated[int, Strict(), Field(ge=0, le=65535)] = 1
    state: Literal["ready", "drain", "maint"] = "ready"
    max_connections: Annotated[int, Strict(), Field(ge=0, le=MAX_COUNT)] = 0
    resume_below: Annotated[int, Strict(), Field(ge=0, le=MAX_COUNT)] = 0


class PersistenceIn(_Model):
    timeout: Duration = 300.0
    netmask: Any = 32  # checked against the listen address family in pass 2


class HealthCheckIn(_Model):
    type: Literal["tcp", "http"]
    interval: Duration = 2.0
    timeout: Duration = 1.0
    rise: Annotated[int, Strict(), Field(ge=1, le=100)] = 2
    fall: Annotated[int, Strict(), Field(ge=1, le=100)] = 3
    path: Annotated[str, Strict()] = "/"
    port: Port | None = None


class ServiceIn(_Model):
    name: Annotated[
        str, Strict(), Field(min_length=1, max_length=63, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    ]
    protocol: Literal["tcp", "udp"] = "tcp"
    listen: Addr
    scheduler: SchedulerName = SchedulerName.WLC
    scheduler_flags: list[Annotated[str, Strict()]] = []
    persistence: PersistenceIn | None = None
    health_check: HealthCheckIn | None = None
    connect_timeout: Duration = 5.0
    idle_timeout: Duration | None = None
    retries: Annotated[int, Strict(), Field(ge=0, le=10)] = 1
    max_connections: Annotated[int, Strict(), Field(ge=0, le=MAX_COUNT)] | None = None
    access_log: Annotated[bool, Strict()] = False
    allowed_sources: Annotated[list[Network], Field(max_length=MAX_SOURCES)] = []
    proxy_protocol: Literal["v1", "v2"] | None = None
    accept_proxy_protocol: Annotated[bool, Strict()] = False
    source: Literal["proxy", "transparent"] = "proxy"
    backends: list[BackendIn] = []


class AdminIn(_Model):
    enabled: Annotated[bool, Strict()] = True
    listen: Addr = ADMIN_DEFAULT
    allow_remote: Annotated[bool, Strict()] = False
    token_file: Annotated[str, Strict(), Field(min_length=1)] | None = None
    backend_metrics: Annotated[bool, Strict()] = False


class OffloadIn(_Model):
    hold_down: Duration = 10.0
    churn_limit: Annotated[int, Strict(), Field(ge=1, le=1000)] = 3
    drain_timeout: Duration = 300.0
    device: Annotated[
        str, Strict(), Field(min_length=1, max_length=15, pattern=r"^[A-Za-z0-9_.-]+$")
    ] = "lb0"
    affinity_wait: Duration = 300.0
    flow_threshold: Annotated[int, Strict(), Field(ge=0, le=1_000_000)] = 20


class KubernetesIn(_Model):
    min_sync_period: Duration = 0.5
    sync_period: Duration = 30.0
    default_scheduler: SchedulerName = SchedulerName.RR
    nodeport_addresses: list[Annotated[str, Strict()]] = []
    kubeconfig: Annotated[str, Strict(), Field(min_length=1)] | None = None
    node_name: Annotated[str, Strict(), Field(min_length=1, max_length=253)] | None = None
    healthz_address: Addr | None = HEALTHZ_DEFAULT


class RootIn(_Model):
    services: list[Any] = Field(default_factory=list)
    source: Literal["file", "kubernetes"] = "file"
    kubernetes: KubernetesIn = KubernetesIn()
    shutdown_grace: Duration = 30.0
    admin: AdminIn = AdminIn()
    dataplane: Mode = Mode.USERSPACE
    offload: OffloadIn = OffloadIn()


_MESSAGES: dict[str, Callable[[ErrorDetails], str]] = {
    "missing": lambda e: "required field is missing",
    "greater_than_equal": lambda e: f"must be >= {e.get('ctx', {}).get('ge')}",
    "less_than_equal": lambda e: f"must be <= {e.get('ctx', {}).get('le')}",
    "greater_than": lambda e: f"must be > {e.get('ctx', {}).get('gt')}",
    "int_type": lambda e: "must be a whole number",
    "int_from_float": lambda e: "must be a whole number",
    "string_type": lambda e: "must be a string",
    "list_type": lambda e: "must be a list",
    "model_type": lambda e: "must be a mapping",
    "model_attributes_type": lambda e: "must be a mapping",
    "dict_type": lambda e: "must be a mapping",
    "literal_error": lambda e: f"must be one of {e.get('ctx', {}).get('expected')}",
    "enum": lambda e: f"must be one of {e.get('ctx', {}).get('expected')}",
    "string_too_short": lambda e: "must not be empty",
    "string_too_long": lambda e: f"must be at most {e.get('ctx', {}).get('max_length')} characters",
    "string_pattern_mismatch": lambda e: (
        "must be letters, digits, '.', '_' or '-', starting with a letter or digit"
    ),
    "value_error": lambda e: str(e.get("ctx", {}).get("error", e["msg"])),
}


def _pydantic_problems(err: ValidationError, prefix: tuple[PathPart, ...]) -> Iterator[Problem]:
    for e in err.errors():
        path = prefix + tuple(e["loc"])
        if e["type"] == "extra_forbidden":
            fields = _known_fields(prefix, tuple(e["loc"])[:-1])
            hint = difflib.get_close_matches(str(path[-1]), fields, n=1)
            msg = "unknown field" + (f" (did you mean {hint[0]!r}?)" if hint else "")
        else:
            render = _MESSAGES.get(e["type"])
            msg = render(e) if render else e["msg"]
            if e["type"] not in (
                "missing",
                "model_type",
                "dict_type",
                "model_attributes_type",
                "value_error",
            ):
                msg += f" (got {_show(e.get('input'))})"
        yield Problem(path, msg)


def _known_fields(prefix: tuple[PathPart, ...], loc: tuple[PathPart, ...]) -> list[str]:
    model: type[BaseModel] = ServiceIn if prefix else RootIn
    for part in loc:
        if isinstance(part, int):
            continue
        ann = model.model_fields[str(part)].annotation
        for candidate in (
            BackendIn,
            PersistenceIn,
            HealthCheckIn,
            AdminIn,
            OffloadIn,
            KubernetesIn,
        ):
            if candidate in _type_args(ann):
                model = candidate
                break
    return list(model.model_fields)


def _type_args(ann: object) -> set[object]:
    out: set[object] = {ann}
    for a in getattr(ann, "__args__", ()):
        out |= _type_args(a)
    return out


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# --- pass 2: meaning ----------------------------------------------------------------------


def _try(parse: Callable[[object], T], value: object) -> T | None:
    try:
        return parse(value)
    except (ValueError, TypeError):
        return None


class _Listens:
    """The listen addresses seen so far, found by protocol and port: checking a service
    against all the others is a lookup, not a walk (10,000 services load in seconds)."""

    def __init__(self) -> None:
        self._by: dict[tuple[str, int, int], dict[IPAddress, tuple[int, Endpoint]]] = {}

    def clashes(self, protocol: str, listen: Endpoint) -> list[tuple[int, Endpoint]]:
        same = self._by.get((protocol, listen.port, listen.ip.version), {})
        if listen.ip.is_unspecified:
            return sorted(same.values(), key=lambda x: x[0])  # a wildcard takes every address
        out = [x for x in (same.get(listen.ip),) if x is not None]
        wildcard = ipaddress.ip_address("0.0.0.0" if listen.ip.version == 4 else "::")
        if wildcard != listen.ip and wildcard in same:
            out.append(same[wildcard])
        return sorted(out, key=lambda x: x[0])

    def add(self, i: int, protocol: str, listen: Endpoint) -> None:
        same = self._by.setdefault((protocol, listen.port, listen.ip.version), {})
        same.setdefault(listen.ip, (i, listen))


class _AcrossServices:
    """Pass 2 for one service after another: what each means, and whether it clashes
    with the ones before it (names, listen addresses)."""

    def __init__(self) -> None:
        self.names: dict[str, int] = {}
        self.listens = _Listens()

    def check(self, i: int, svc: Any) -> Iterator[Problem]:
        names, listens = self.names, self.listens
        if not isinstance(svc, Mapping):
            return
        at: tuple[PathPart, ...] = ("services", i)
        name = svc.get("name")
        if isinstance(name, str):
            if name in names:
                yield Problem(
                    (*at, "name"), f"duplicate service name {name!r} (also services[{names[name]}])"
                )
            else:
                names[name] = i
        protocol = svc.get("protocol", "tcp")
        listen = _try(parse_endpoint, svc.get("listen"))
        if listen is not None and protocol in ("tcp", "udp"):
            for j, other in listens.clashes(protocol, listen):
                yield Problem(
                    (*at, "listen"),
                    f"{protocol} {listen} is already used by services[{j}] ({other})",
                )
            listens.add(i, protocol, listen)
            if protocol == "udp" and listen.ip.is_unspecified:
                yield Problem(
                    (*at, "listen"),
                    "a udp service needs a specific address, so that replies come from it",
                )
        yield from _check_flags(svc, at)
        yield from _check_persistence(svc, at, listen)
        yield from _check_health(svc, at)
        if protocol == "udp":
            for key in ("connect_timeout", "retries"):
                if key in svc:
                    yield Problem((*at, key), "only applies to tcp services")
            if svc.get("max_connections") == 0:
                yield Problem(
                    (*at, "max_connections"), "a udp service needs a bounded flow table (>= 1)"
                )
            for key in ("proxy_protocol", "accept_proxy_protocol"):
                if svc.get(key) not in (None, False):
                    yield Problem(
                        (*at, key), "the PROXY protocol is for tcp services only (not udp)"
                    )
            if svc.get("source") == "transparent":
                yield Problem(
                    (*at, "source"),
                    "transparent is for tcp services only: a udp flow comes from lb's address",
                )
        elif svc.get("source") == "transparent" and listen is not None:
            yield from _check_transparent(svc, at, listen)
        yield from _check_backends(svc, at)


def _admin_problems(admin: object, raw_services: list[Any]) -> Iterator[Problem]:
    if not isinstance(admin, Mapping) or admin.get("enabled") is False:
        return
    listen = _try(parse_endpoint, admin.get("listen", str(ADMIN_DEFAULT)))
    remote = admin.get("allow_remote") is True
    if listen is not None and not listen.ip.is_loopback and not remote:
        yield Problem(
            ("admin", "listen"),
            f"{listen.ip} is not a loopback address: set admin.allow_remote: true "
            "(with a token_file) to expose the admin API",
        )
    if remote and not admin.get("token_file"):
        yield Problem(("admin", "token_file"), "required when allow_remote is true")
    if listen is not None:
        for i, svc in enumerate(raw_services):
            if not isinstance(svc, Mapping) or svc.get("protocol", "tcp") != "tcp":
                continue
            other = _try(parse_endpoint, svc.get("listen"))
            if other is not None and _overlaps(listen, other):
                yield Problem(
                    ("admin", "listen"), f"tcp {listen} is already used by services[{i}] ({other})"
                )


def _kubernetes_problems(raw: Mapping[str, Any]) -> Iterator[Problem]:
    if raw.get("source") == "kubernetes" and raw.get("services"):
        yield Problem(
            ("services",), "must be empty with source: kubernetes (services come from the API)"
        )
    k = raw.get("kubernetes")
    if not isinstance(k, Mapping):
        return
    low = _try(parse_duration, k.get("min_sync_period", 0.5))
    high = _try(parse_duration, k.get("sync_period", 30.0))
    if high is not None and high <= 0:
        yield Problem(("kubernetes", "sync_period"), "must be more than 0")
    elif low is not None and high is not None and low > high:
        yield Problem(("kubernetes", "min_sync_period"), f"must not exceed sync_period ({high:g}s)")
    addresses = k.get("nodeport_addresses")
    if isinstance(addresses, list):
        for i, a in enumerate(addresses):
            if isinstance(a, str) and _try(lambda v: ipaddress.ip_address(str(v)), a) is None:
                yield Problem(
                    ("kubernetes", "nodeport_addresses", i), f"{a!r} is not an IP address"
                )


def _overlaps(a: Endpoint, b: Endpoint) -> bool:
    if a.port != b.port or a.ip.version != b.ip.version:
        return False
    return a.ip == b.ip or a.ip.is_unspecified or b.ip.is_unspecified


def _check_flags(svc: Mapping[str, Any], at: tuple[PathPart, ...]) -> Iterator[Problem]:
    flags = svc.get("scheduler_flags")
    sched = svc.get("scheduler", "wlc")
    if not isinstance(flags, list) or not flags or not isinstance(sched, str):
        return
    try:
        spellings = SCHEDULERS[SchedulerName(sched)].flags
    except ValueError:
        return
    if not spellings:
        takers = [str(name) for name in with_flags()]
        only = ", ".join(takers[:-1]) + " and " + takers[-1] if len(takers) > 1 else takers[0]
        yield Problem(
            (*at, "scheduler_flags"), f"the {sched} scheduler takes no flags (only {only} do)"
        )
        return
    for k, flag in enumerate(flags):
        if isinstance(flag, str) and flag not in spellings:
            yield Problem(
                (*at, "scheduler_flags", k),
                f"unknown flag {flag!r} for {sched} (use {', '.join(sorted(spellings))})",
            )


def _check_persistence(
    svc: Mapping[str, Any], at: tuple[PathPart, ...], listen: Endpoint | None
) -> Iterator[Problem]:
    p = svc.get("persistence")
    if not isinstance(p, Mapping):
        return
    timeout = _try(parse_duration, p.get("timeout", 300))
    if timeout is not None and (timeout < 1 or timeout != int(timeout)):
        yield Problem(
            (*at, "persistence", "timeout"),
            "must be a whole number of seconds, at least 1s (IPVS granularity)",
        )
    elif timeout is not None and timeout > MAX_PERSISTENCE:
        yield Problem(
            (*at, "persistence", "timeout"),
            f"must be at most 30 days ({MAX_PERSISTENCE}s, what IPVS can hold)",
        )
    if "netmask" in p and listen is not None:
        try:
            parse_prefix(p["netmask"], listen.ip.version)
        except ValueError as e:
            yield Problem((*at, "persistence", "netmask"), str(e))


def _check_health(svc: Mapping[str, Any], at: tuple[PathPart, ...]) -> Iterator[Problem]:
    hc = svc.get("health_check")
    if not isinstance(hc, Mapping):
        return
    if hc.get("type") == "tcp" and "path" in hc:
        yield Problem((*at, "health_check", "path"), "only applies to http checks")
    if isinstance(hc.get("path"), str) and not hc["path"].startswith("/"):
        yield Problem((*at, "health_check", "path"), "must start with '/'")
    interval = _try(parse_duration, hc.get("interval", 2.0))
    timeout = _try(parse_duration, hc.get("timeout", 1.0))
    if interval is not None and interval <= 0:
        yield Problem((*at, "health_check", "interval"), "must be more than 0")
    if timeout is not None and timeout <= 0:
        yield Problem((*at, "health_check", "timeout"), "must be more than 0")
    if interval and timeout and timeout > interval:
        yield Problem(
            (*at, "health_check", "timeout"), f"must not exceed the interval ({interval:g}s)"
        )


def _check_transparent(
    svc: Mapping[str, Any], at: tuple[PathPart, ...], listen: Endpoint
) -> Iterator[Problem]:
    """`source: transparent` connects from the client's address: every backend must be of
    the client's family, which is the listen address's (an IPv6 listener takes no IPv4)."""
    backends = svc.get("backends")
    if not isinstance(backends, list):
        return
    for j, b in enumerate(backends):
        addr = _try(parse_endpoint, b.get("address")) if isinstance(b, Mapping) else None
        if addr is not None and addr.ip.version != listen.ip.version:
            yield Problem(
                (*at, "backends", j, "address"),
                f"with source: transparent a backend must be IPv{listen.ip.version}, as the "
                f"clients of {listen} are (lb connects to it from the client's address)",
            )


def _check_backends(svc: Mapping[str, Any], at: tuple[PathPart, ...]) -> Iterator[Problem]:
    backends = svc.get("backends")
    if not isinstance(backends, list):
        return
    sched = next((s for s in SCHEDULERS.values() if s.name == svc.get("scheduler", "wlc")), None)
    if sched is not None and sched.max_backends is not None and len(backends) > sched.max_backends:
        yield Problem(
            (*at, "backends"),
            f"the {sched.name} scheduler takes at most {sched.max_backends} backends",
        )
    seen: dict[Endpoint, int] = {}
    for j, b in enumerate(backends):
        if not isinstance(b, Mapping):
            continue
        addr = _try(parse_endpoint, b.get("address"))
        if addr is not None:
            if addr in seen:
                yield Problem(
                    (*at, "backends", j, "address"),
                    f"duplicate backend {addr} (also backends[{seen[addr]}])",
                )
            else:
                seen[addr] = j
            if addr.ip.is_unspecified or addr.ip.is_multicast:
                yield Problem(
                    (*at, "backends", j, "address"), f"{addr.ip} cannot be a backend address"
                )
        upper, lower = b.get("max_connections", 0), b.get("resume_below", 0)
        if isinstance(upper, int) and isinstance(lower, int) and lower > 0:
            if upper == 0:
                yield Problem((*at, "backends", j, "resume_below"), "needs max_connections")
            elif lower > upper:
                yield Problem(
                    (*at, "backends", j, "resume_below"),
                    f"must not exceed max_connections ({upper})",
                )


# --- building the model -------------------------------------------------------------------


_NO_FLAGS: frozenset[SchedFlag] = frozenset()


def _build_service(s: ServiceIn) -> Service:
    protocol = Protocol(s.protocol)
    scheduler = s.scheduler
    spellings = SCHEDULERS[scheduler].flags
    flags = frozenset(spellings[f] for f in s.scheduler_flags) or _NO_FLAGS  # one, shared
    persistence = None
    if s.persistence is not None:
        persistence = Persistence(
            int(s.persistence.timeout), parse_prefix(s.persistence.netmask, s.listen.ip.version)
        )
    check = None
    if s.health_check is not None:
        h = s.health_check
        check = HealthCheck(
            CheckKind(h.type), h.interval, h.timeout, h.rise, h.fall, h.path, h.port
        )
    udp = protocol is Protocol.UDP
    return Service(
        name=s.name,
        protocol=protocol,
        listen=s.listen,
        scheduler=scheduler,
        flags=flags,
        persistence=persistence,
        health_check=check,
        backends=tuple(
            Backend(b.address, b.weight, AdminState(b.state), b.max_connections, b.resume_below)
            for b in s.backends
        ),
        connect_timeout=s.connect_timeout,
        idle_timeout=s.idle_timeout
        if s.idle_timeout is not None
        else (UDP_IDLE_TIMEOUT if udp else TCP_IDLE_TIMEOUT),
        retries=0 if udp else s.retries,
        max_connections=s.max_connections
        if s.max_connections is not None
        else (UDP_MAX_FLOWS if udp else 0),
        access_log=s.access_log,
        allowed_sources=tuple(s.allowed_sources),
        proxy_protocol=ProxyProtocol(s.proxy_protocol) if s.proxy_protocol else None,
        accept_proxy_protocol=s.accept_proxy_protocol,
        source_address=SourceAddress(s.source),
    )


_STR, _SEQ, _MAP = "tag:yaml.org,2002:str", "tag:yaml.org,2002:seq", "tag:yaml.org,2002:map"
if TYPE_CHECKING:
    _SafeLoader = yaml.SafeLoader
else:  # libyaml's parser when PyYAML has it: the same methods as the Python one
    _SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Loader(_SafeLoader):
    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        """PyYAML's, except that a scalar it cannot build (`!!float ''`, `!!bool maybe`,
        an integer of more than 4,300 digits, ...) is invalid YAML, not an IndexError,
        KeyError or ValueError escaping from the loader."""
        try:
            return super().construct_object(node, deep)
        except (ValueError, TypeError, IndexError, KeyError, AttributeError, OverflowError) as e:
            tag = str(node.tag).replace("tag:yaml.org,2002:", "!!")
            digits = sys.get_int_max_str_digits()
            why = f" (more than {digits:,} digits)" if f"({digits} digits)" in str(e) else ""
            raise ConstructorError(
                None, None, f"{_show(node.value)} is not a valid {tag}{why}", node.start_mark
            ) from None


class _Refused(Exception):
    def __init__(self, problem: Problem) -> None:
        super().__init__(problem.message)
        self.problem = problem


class _Enough(Exception):
    """MAX_COLLECTED_PROBLEMS found: read no further."""


class _Reader:
    """The file read event by event (with libyaml's parser when PyYAML has it). Nodes are
    composed as PyYAML's composer does and measured on the way, so what the bounds refuse
    (a cycle, nesting past MAX_DEPTH, aliases expanding past MAX_ALIAS_NODES) is refused
    before anything is built from it. The `services` list is taken one service at a time:
    each is built and checked as soon as it is read and its nodes let go, so that a file
    with a problem on every line stops being read at the MAX_COLLECTED_PROBLEMS-th."""

    def __init__(self, text: str) -> None:
        self.loader: Any = _Loader(text)
        self.anchors: dict[str, Any] = {}  # yaml.Node
        self.measured: dict[str, tuple[int, int]] = {}  # an anchor's (expanded nodes, height)
        self.open: set[str] = set()  # anchors whose node is being composed
        self.aliased = 0  # nodes reached through aliases beyond the file's own
        self.fresh: list[yaml.Node] = []  # anchored nodes composed since the last build
        self.shared: dict[yaml.Node, Any] = {}  # what those were built into, for later ones
        self.stopped = False
        self.duplicates: list[Problem] = []  # the duplicate keys outside the services list

    def close(self) -> None:
        self.loader.dispose()

    def document(
        self, take: Callable[[int, yaml.Node], Any]
    ) -> tuple[yaml.Node | None, Any, list[Any] | None]:
        """The root node, its data, and the services `take` was given one by one (each
        service's node, and its index; `take` builds and checks it), or None if the
        services list was read whole (it is not a plain list under a plain mapping)."""
        ld = self.loader
        ld.get_event()  # the stream's start
        if ld.check_event(yaml.StreamEndEvent):
            return None, None, None
        ld.get_event()  # the document's start
        event = ld.peek_event()
        services = None
        self.stub: yaml.Node | None = None  # the services list's place in the root node
        if self._plain(event, yaml.MappingStartEvent, yaml.MappingNode, _MAP):
            root, services = self._root(take)
        else:
            root = self._node(0)[0]
        if not self.stopped:
            ld.get_event()  # the document's end
            if not ld.check_event(yaml.StreamEndEvent):
                raise ComposerError(
                    "expected a single document in the stream",
                    root.start_mark,
                    "but found another document",
                    ld.get_event().start_mark,
                )
        # keys as the file writes them, before merge keys (`<<`) bring others in
        self.duplicates = list(_duplicate_keys(root, ()))
        if services is None:
            return root, self.build(root), None
        assert isinstance(root, yaml.MappingNode)
        pairs = [(k, v) for k, v in root.value if v is not self.stub]
        data = self.build(yaml.MappingNode(_MAP, pairs, root.start_mark, root.end_mark))
        data["services"] = services  # a second `services` key is a duplicate: the first counts
        return root, data, services

    def _plain(self, event: Any, kind: type[Any], node: type[yaml.Node], tag: str) -> bool:
        """A mapping or sequence start without an anchor that resolves to `tag`."""
        if not isinstance(event, kind) or event.anchor is not None:
            return False
        resolved = event.tag
        if resolved is None or resolved == "!":
            resolved = self.loader.resolve(node, None, event.implicit)
        return bool(resolved == tag)

    def _root(self, take: Callable[[int, yaml.Node], Any]) -> tuple[yaml.Node, list[Any] | None]:
        ld = self.loader
        start = ld.get_event()
        root = yaml.MappingNode(_MAP, [], start.start_mark, None, flow_style=start.flow_style)
        services: list[Any] = []
        try:
            while not ld.check_event(yaml.MappingEndEvent):
                key = self._node(1)[0]
                named = key.tag == _STR and key.value == "services"
                event = ld.peek_event()
                if (
                    named
                    and self.stub is None
                    and self._plain(event, yaml.SequenceStartEvent, yaml.SequenceNode, _SEQ)
                ):
                    ld.get_event()
                    self.stub = yaml.SequenceNode(_SEQ, [], event.start_mark, None)
                    root.value.append((key, self.stub))
                    while not ld.check_event(yaml.SequenceEndEvent):
                        services.append(take(len(services), self._node(2)[0]))
                    self.stub.end_mark = ld.get_event().end_mark
                    continue
                root.value.append((key, self._node(1)[0]))
            root.end_mark = ld.get_event().end_mark
        except _Enough:
            self.stopped = True
        return root, services if self.stub is not None else None

    def _node(self, depth: int) -> tuple[yaml.Node, int, int]:
        """The next node, composed as PyYAML composes it: (it, the nodes it expands to
        through aliases, its height)."""
        ld = self.loader
        event = ld.get_event()
        start, end = event.start_mark, event.end_mark  # either parser's marks
        line = start.line + 1
        if isinstance(event, yaml.AliasEvent):
            name = event.anchor
            if name not in self.anchors:
                raise ComposerError(None, None, f"found undefined alias {name!r}", start)
            if name in self.open:
                raise _Refused(
                    Problem((), "an alias refers to a node that contains it (recursive)", line)
                )
            size, height = self.measured[name]
            if depth + height >= MAX_DEPTH:
                raise _Refused(Problem((), f"nested deeper than {MAX_DEPTH} levels", line))
            self.aliased += size
            if self.aliased > MAX_ALIAS_NODES:
                raise _Refused(
                    Problem(
                        (),
                        f"aliases and merge keys expand to more than {MAX_ALIAS_NODES:,} nodes "
                        "beyond the file's own: refused",
                        line,
                    )
                )
            return self.anchors[name], size, height
        if depth >= MAX_DEPTH:
            raise _Refused(Problem((), f"nested deeper than {MAX_DEPTH} levels", line))
        anchor = event.anchor
        if anchor is not None and anchor in self.anchors:
            raise ComposerError(
                f"found duplicate anchor {anchor!r}; first occurrence",
                self.anchors[anchor].start_mark,
                "second occurrence",
                start,
            )
        tag = event.tag
        node: yaml.Node
        size, height = 1, 0
        if isinstance(event, yaml.ScalarEvent):
            if tag is None or tag == "!":
                tag = ld.resolve(yaml.ScalarNode, event.value, event.implicit)
            node = yaml.ScalarNode(tag, event.value, start, end, style=event.style)
        else:
            mapping = isinstance(event, yaml.MappingStartEvent)
            kind: Any = yaml.MappingNode if mapping else yaml.SequenceNode
            if tag is None or tag == "!":
                tag = ld.resolve(kind, None, event.implicit)
            node = kind(tag, [], start, None, flow_style=event.flow_style)
            if anchor is not None:
                self.anchors[anchor] = node
                self.open.add(anchor)
            closing = yaml.MappingEndEvent if mapping else yaml.SequenceEndEvent
            while not ld.check_event(closing):
                child, n, h = self._node(depth + 1)
                size, height = size + n, max(height, h + 1)
                if mapping:
                    value, n, h = self._node(depth + 1)
                    size, height = size + n, max(height, h + 1)
                    node.value.append((child, value))
                else:
                    node.value.append(child)
            node.end_mark = ld.get_event().end_mark
        if anchor is not None:
            self.anchors[anchor] = node
            self.open.discard(anchor)
            self.measured[anchor] = (size, height)
            self.fresh.append(node)
        return node, size, height

    def build(self, node: yaml.Node) -> Any:
        """The node's data; a node reached again through an alias is built once."""
        ld = self.loader
        built: dict[yaml.Node, Any] = {}
        ld.constructed_objects = collections.ChainMap(built, self.shared)
        data = ld.construct_object(node, deep=True)
        for anchored in self.fresh:
            if anchored in built:
                self.shared[anchored] = built[anchored]
        self.fresh.clear()
        return data


class _Found:
    """The problems found so far, each located on its line, in the order a pass over the
    whole file would give: by line, then by kind (duplicate keys, the file's fields,
    services, meaning across services, admin, kubernetes). Raises _Enough at the
    MAX_COLLECTED_PROBLEMS-th, so that no more of the file is read."""

    DUPLICATES, ROOT, SERVICE, MEANING, ADMIN, KUBERNETES = range(6)

    def __init__(self) -> None:
        self.found: list[tuple[int, int, int, Problem]] = []

    def add(
        self, kind: int, problems: Iterable[Problem], node: yaml.Node | None, skip: int = 0
    ) -> None:
        """Add `problems`, locating each in `node` by its path past the first `skip` parts."""
        for p in problems:
            line = p.line or _line_of(node, p.path[skip:])
            self.found.append((line or 0, kind, len(self.found), Problem(p.path, p.message, line)))
            if len(self.found) >= MAX_COLLECTED_PROBLEMS:
                raise _Enough

    def sorted(self) -> list[Problem]:
        return _dedupe([p for *_, p in sorted(self.found, key=lambda f: f[:3])])


def parse_config(text: str, source: str = "<config>") -> Config:
    """Validate YAML text; raise ConfigError with every problem found (or the first
    MAX_COLLECTED_PROBLEMS, the rest of the file unread)."""
    collecting = gc.isenabled()
    gc.disable()  # a large file is millions of objects: collecting as they are made is slow
    try:
        return _parse_config(text, source)
    finally:
        _parse_endpoint.cache_clear()
        _PORTS.clear()
        if collecting:
            gc.enable()


def _parse_config(text: str, source: str) -> Config:
    if len(text) > MAX_FILE_BYTES:
        raise ConfigError(source, [_too_large(len(text))])
    checked = _Checked()

    def take(i: int, item: Any) -> None:
        checked.check(i, item, None, 0)
        if checked.found.found:
            raise _Located  # a problem: the full read says on which line

    raw = _plain_data(text, take)
    if raw is not _NOT_PLAIN:
        with contextlib.suppress(ConfigError):  # located, line by line, by the full read
            return _validated(raw, None, checked, source)
    return _parse_located(text, source)


def _parse_located(text: str, source: str) -> Config:
    """The full read: nodes with their lines, bounded (_Reader), services checked as
    they are read."""
    checked = _Checked()

    def take(i: int, node: yaml.Node) -> Any:
        checked.found.add(checked.found.DUPLICATES, _duplicate_keys(node, ("services", i)), None)
        item = reader.build(node)
        checked.check(i, item, node, 2)
        return item

    reader = _Reader(text)
    try:
        node, raw, _ = reader.document(take)
    except _Refused as e:
        raise ConfigError(source, [e.problem]) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        reason = getattr(e, "problem", None) or str(e)
        raise ConfigError(source, [Problem((), f"invalid YAML: {reason}", line)]) from None
    finally:
        reader.close()
    try:
        checked.found.add(checked.found.DUPLICATES, reader.duplicates, None)
    except _Enough:
        reader.stopped = True
    if reader.stopped:
        raise ConfigError(source, checked.found.sorted(), complete=False)
    return _validated(raw, node, checked, source)


class _Located(Exception):
    """A problem found in a plain read: the file is read again for its lines."""


class _Checked:
    """Services checked one by one (both passes), each built at once (its pydantic model
    let go) while no problem has been found."""

    def __init__(self) -> None:
        self.found = _Found()
        self.across = _AcrossServices()
        self.services: list[Service] = []
        self.read = 0  # how many services were checked

    def check(self, i: int, item: Any, node: yaml.Node | None, skip: int) -> None:
        self.read += 1
        found = self.found
        try:
            model = ServiceIn.model_validate(item)
        except ValidationError as e:
            found.add(found.SERVICE, _pydantic_problems(e, ("services", i)), node, skip)
            model = None
        found.add(found.MEANING, self.across.check(i, item), node, skip)
        if model is not None and not found.found:
            self.services.append(_build_service(model))


def _validated(raw: Any, node: yaml.Node | None, checked: _Checked, source: str) -> Config:
    """The Config of the file's data, or ConfigError with every problem (located in
    `node` when there is one). `checked`: the services checked as they were read, if
    they were (else they are checked here, from the root)."""
    found, services = checked.found, checked.services
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(
            source, [Problem((), "the file must be a mapping with a 'services' list", 1)]
        )
    root: RootIn | None = None
    listed = raw.get("services")
    raw_services: list[Any] = listed if isinstance(listed, list) else []
    stopped = False
    try:
        try:
            root = RootIn.model_validate(raw)
        except ValidationError as e:
            found.add(found.ROOT, _pydantic_problems(e, ()), node)
        if not checked.read:  # not read one by one: checked now, located from the root
            for i, item in enumerate(raw_services):
                checked.check(i, item, node, 0)
        found.add(found.ADMIN, _admin_problems(raw.get("admin"), raw_services), node)
        found.add(found.KUBERNETES, _kubernetes_problems(raw), node)
    except _Enough:
        stopped = True
    if found.found:
        raise ConfigError(source, found.sorted(), complete=not stopped)
    assert root is not None
    a, o, k = root.admin, root.offload, root.kubernetes
    return Config(
        services=tuple(services),
        shutdown_grace=root.shutdown_grace,
        admin=AdminSettings(a.enabled, a.listen, a.allow_remote, a.token_file, a.backend_metrics),
        dataplane=root.dataplane,
        offload=OffloadSettings(
            o.hold_down,
            o.churn_limit,
            o.drain_timeout,
            o.device,
            o.affinity_wait,
            o.flow_threshold,
        ),
        source=root.source,
        kubernetes=KubernetesSettings(
            k.min_sync_period,
            k.sync_period,
            k.default_scheduler,
            tuple(ipaddress.ip_address(a) for a in k.nodeport_addresses),
            k.kubeconfig,
            k.node_name,
            k.healthz_address,
        ),
        path=source,
    )


#: What `_plain_data` returns for a file it leaves to the full read.
_NOT_PLAIN: Any = object()
_SCALAR_NODE = yaml.ScalarNode
_TAGS_KEPT = 4096


def _plain_data(text: str, take: Callable[[int, Any], None]) -> Any:
    """The data of a plain file, read in one pass over libyaml's events without nodes or
    line marks (issue 17: most of a large file's load went to them), or _NOT_PLAIN. Each
    item of the root's `services` list is given to `take` as soon as it is read (it
    raises _Located to stop the read).
    Plain: one document of untagged mappings, sequences and scalars with scalar keys, no
    anchor, alias, merge key or duplicate key, nested at most MAX_DEPTH. Anything else
    (and every invalid file) is read by `_parse_located`, whose problems carry lines."""
    if "&" in text or "*" in text:  # may have anchors or aliases: the bounded read
        return _NOT_PLAIN
    loader = _Loader(text)
    # libyaml's parser and PyYAML's resolver are untyped
    get: Callable[[], Any] = loader.get_event
    resolve: Callable[..., str] = loader.resolve
    constructors = loader.yaml_constructors
    tags: dict[str, str] = {}  # plain scalars' resolved tags: keys and names repeat
    nokey: Any = _NOT_PLAIN
    stack: list[list[Any]] = []  # [container, its pending key] per open collection
    try:
        if not (
            isinstance(get(), yaml.StreamStartEvent) and isinstance(get(), yaml.DocumentStartEvent)
        ):
            return _NOT_PLAIN
        while True:
            event = get()
            kind = type(event)
            value: Any
            if kind is yaml.ScalarEvent:
                tag = event.tag
                if tag is None or tag == "!":
                    implicit = event.implicit
                    if not implicit[0]:  # quoted: a string, unless tagged
                        tag = resolve(_SCALAR_NODE, event.value, implicit)
                    elif (tag := tags.get(event.value)) is None:
                        tag = resolve(_SCALAR_NODE, event.value, implicit)
                        if len(tags) < _TAGS_KEPT:
                            tags[event.value] = tag
                if tag == _STR:
                    value = event.value
                elif (make := constructors.get(tag)) is not None:
                    value = make(loader, _SCALAR_NODE(tag, event.value, event.start_mark, None))
                else:
                    return _NOT_PLAIN
            elif kind is yaml.MappingStartEvent or kind is yaml.SequenceStartEvent:
                if event.tag not in (None, "!") or len(stack) >= MAX_DEPTH:
                    return _NOT_PLAIN
                stack.append([{} if kind is yaml.MappingStartEvent else [], nokey])
                continue
            elif kind is yaml.MappingEndEvent or kind is yaml.SequenceEndEvent:
                value = stack.pop()[0]
            else:
                return _NOT_PLAIN
            if not stack:
                break
            top = stack[-1]
            into = top[0]
            if type(into) is list:
                if len(stack) == 2 and stack[0][1] == "services":  # a service, read whole
                    take(len(into), value)
                into.append(value)
            elif top[1] is nokey:
                if isinstance(value, (dict, list)) or value == "<<":
                    return _NOT_PLAIN
                top[1] = value
            else:
                if top[1] in into:
                    return _NOT_PLAIN
                into[top[1]] = value
                top[1] = nokey
        if not (
            isinstance(get(), yaml.DocumentEndEvent) and isinstance(get(), yaml.StreamEndEvent)
        ):
            return _NOT_PLAIN
        return value
    except (
        _Located,
        yaml.YAMLError,
        ArithmeticError,
        LookupError,
        ValueError,
        TypeError,
        AttributeError,
    ):
        return _NOT_PLAIN  # a scalar libyaml or PyYAML cannot build: said with its line
    finally:
        loader.dispose()


def _too_large(size: int) -> Problem:
    return Problem((), f"the file is {size:,} bytes, more than {MAX_FILE_BYTES:,}: refused")


def load_config(path: str | Path) -> Config:
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ConfigError(str(path), [_too_large(size)])
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ConfigError(
            str(path), [Problem((), f"cannot read the config file: {reason}")]
        ) from None
    return parse_config(text, str(path))


def _dedupe(problems: list[Problem]) -> list[Problem]:
    seen: set[tuple[tuple[PathPart, ...], str]] = set()
    out = []
    for p in problems:
        if (p.path, p.message) not in seen:
            seen.add((p.path, p.message))
            out.append(p)
    return out


def _line_of(node: yaml.Node | None, path: Sequence[PathPart]) -> int | None:
    """The 1-based line where the value at `path` is (or its nearest existing parent)."""
    line = node.start_mark.line + 1 if node is not None else None
    for part in path:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if k.value == part:
                    node, line = v, k.start_mark.line + 1
                    break
            else:
                return line
        elif (
            isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value)
        ):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def _duplicate_keys(node: yaml.Node | None, path: tuple[PathPart, ...]) -> Iterator[Problem]:
    """Keys written twice in one mapping, as the file writes them: a key that a merge key
    (`<<`) brings in may be set again (that is what merging is for). A key that is not a
    scalar is left to the constructor, which refuses it."""
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for k, v in node.value:
            if not isinstance(k, yaml.ScalarNode) or k.tag == "tag:yaml.org,2002:merge":
                continue
            if k.value in seen:
                yield Problem((*path, k.value), "duplicate key", k.start_mark.line + 1)
            seen.add(k.value)
            yield from _duplicate_keys(v, (*path, k.value))
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            yield from _duplicate_keys(v, (*path, i))
