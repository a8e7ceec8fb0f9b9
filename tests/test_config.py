"""The config file: the documented shape, and every error reported at once with its path."""

from __future__ import annotations

import textwrap

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from lb.config import ConfigError, parse_config, parse_duration
from lb.model import AdminState, CheckKind, Protocol, SchedFlag, SchedulerName

GOOD = """
services:
  - name: web
    protocol: tcp
    listen: 127.0.0.1:8080
    scheduler: wrr
    scheduler_flags: []
    persistence:
      timeout: 300s
      netmask: 255.255.255.255
    health_check:
      type: http
      interval: 2s
      timeout: 1s
      rise: 2
      fall: 3
      path: /healthz
    backends:
      - address: 127.0.0.1:9001
        weight: 3
      - address: 127.0.0.1:9002
        weight: 1
  - name: dns
    protocol: udp
    listen: "[::1]:5353"
    scheduler: mh
    scheduler_flags: [mh-fallback, mh-port]
    backends:
      - address: "[::1]:53"
"""


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse_config(textwrap.dedent(text), "t.yaml")
    return [f"{p.where}: {p.message}" if p.path else p.message for p in e.value.problems]


def test_documented_example_parses() -> None:
    cfg = parse_config(GOOD)
    web, dns = cfg.services
    assert web.protocol is Protocol.TCP and web.scheduler is SchedulerName.WRR
    assert str(web.listen) == "127.0.0.1:8080"
    assert web.persistence is not None and (
        web.persistence.timeout,
        web.persistence.prefix_len,
    ) == (300, 32)
    assert web.health_check is not None and web.health_check.kind is CheckKind.HTTP
    assert web.health_check.path == "/healthz" and web.health_check.interval == 2.0
    assert [(str(b.address), b.weight) for b in web.backends] == [
        ("127.0.0.1:9001", 3),
        ("127.0.0.1:9002", 1),
    ]
    assert dns.protocol is Protocol.UDP and dns.flags == {SchedFlag.FALLBACK, SchedFlag.PORT}
    assert dns.idle_timeout == 300 and dns.max_connections == 65536 and dns.retries == 0
    assert web.idle_timeout == 900 and web.max_connections == 0 and web.retries == 1


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("2s", 2.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        (7, 7.0),
        (1.5, 1.5),
        ("30", 30.0),
    ],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["2 weeks", "-1s", "", "s", True, None, [1]])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_every_error_is_reported_with_its_path() -> None:
    out = problems(
        """
        services:
          - name: web
            listen: 127.0.0.1:8080
            scheduler: rr
            scheduler_flags: [sh-port]
            backends:
              - address: 127.0.0.1:9001
                weight: -1
              - address: 127.0.0.1:9001
              - address: localhost:9003
                wieght: 2
          - name: web
            listen: 127.0.0.1:8080
            backends: []
        """
    )
    assert out == [
        "services[0].scheduler_flags: the rr scheduler takes no flags (only sh and mh do)",
        "services[0].backends[0].weight: must be >= 0 (got -1)",
        "services[0].backends[1].address: duplicate backend 127.0.0.1:9001 (also backends[0])",
        "services[0].backends[2].address: 'localhost' is not an IP address (host names are not resolved)",
        "services[0].backends[2].wieght: unknown field (did you mean 'weight'?)",
        "services[1].name: duplicate service name 'web' (also services[0])",
        "services[1].listen: tcp 127.0.0.1:8080 is already used by services[0] (127.0.0.1:8080)",
    ]


def test_errors_carry_file_lines() -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(
            "services:\n  - name: a\n    listen: 127.0.0.1:1\n    backends:\n      - {address: 1.2.3.4:5, weight: x}\n",
            "f.yaml",
        )
    assert (
        str(e.value) == "f.yaml:5: services[0].backends[0].weight: must be a whole number (got 'x')"
    )


@pytest.mark.parametrize(
    ("snippet", "expected"),
    [
        ("listen: 127.0.0.1", "services[0].listen: '127.0.0.1' is not ADDRESS:PORT"),
        ("listen: 127.0.0.1:70000", "services[0].listen: port 70000 is out of range 1-65535"),
        ("listen: '::1:80'", "services[0].listen: '::1:80': write an IPv6 address as [addr]:port"),
        ("protocol: sctp", "services[0].protocol: must be one of 'tcp' or 'udp' (got 'sctp')"),
        ("scheduler: fastest", "services[0].scheduler: must be one of"),
        ("retries: 11", "services[0].retries: must be <= 10 (got 11)"),
        ("connect_timeout: soon", "services[0].connect_timeout: 'soon' is not a duration"),
        ("name: 'bad name'", "services[0].name: must be letters, digits"),
        (
            "scheduler: sh\n    scheduler_flags: [mh-port]",
            "services[0].scheduler_flags[0]: unknown flag 'mh-port' for sh (use sh-fallback, sh-port)",
        ),
        (
            "persistence: {netmask: 255.0.255.0}",
            "services[0].persistence.netmask: 255.0.255.0 is not a netmask",
        ),
        ("persistence: {netmask: 33}", "services[0].persistence.netmask: 33 is not a netmask"),
        (
            "persistence: {timeout: 500ms}",
            "services[0].persistence.timeout: must be a whole number of seconds",
        ),
        (
            "health_check: {type: tcp, path: /x}",
            "services[0].health_check.path: only applies to http checks",
        ),
        (
            "health_check: {type: http, path: x}",
            "services[0].health_check.path: must start with '/'",
        ),
        (
            "health_check: {type: tcp, interval: 1s, timeout: 2s}",
            "services[0].health_check.timeout: must not exceed the interval (1s)",
        ),
        (
            "health_check: {interval: 1s}",
            "services[0].health_check.type: required field is missing",
        ),
        (
            "health_check: {type: tcp, rise: 0}",
            "services[0].health_check.rise: must be >= 1 (got 0)",
        ),
        ("color: blue", "services[0].color: unknown field"),
    ],
)
def test_single_mistakes(snippet: str, expected: str) -> None:
    base = "services:\n  - name: s\n    listen: 127.0.0.1:8080\n    backends: [{address: 127.0.0.1:9000}]\n"
    lines = base.splitlines()
    keys = [line.split(":")[0].strip() for line in snippet.splitlines()]
    lines = [line for line in lines if line.strip().split(":")[0] not in keys]
    text = "\n".join(lines) + "\n    " + snippet + "\n"
    out = problems(text)
    assert any(p.startswith(expected) for p in out), out


def test_udp_specific_rules() -> None:
    out = problems(
        """
        services:
          - {name: u, protocol: udp, listen: 0.0.0.0:53, retries: 2, max_connections: 0}
        """
    )
    assert out == [
        "services[0].listen: a udp service needs a specific address, so that replies come from it",
        "services[0].retries: only applies to tcp services",
        "services[0].max_connections: a udp service needs a bounded flow table (>= 1)",
    ]


def test_same_port_different_protocols_is_fine_but_wildcards_overlap() -> None:
    parse_config(
        "services:\n - {name: a, listen: 127.0.0.1:53}\n - {name: b, protocol: udp, listen: 127.0.0.1:53}\n"
    )
    out = problems(
        "services:\n - {name: a, listen: 0.0.0.0:80}\n - {name: b, listen: 10.0.0.1:80}\n"
    )
    assert out == [
        "services[1].listen: tcp 10.0.0.1:80 is already used by services[0] (0.0.0.0:80)"
    ]


def test_thresholds() -> None:
    out = problems(
        """
        services:
          - name: s
            listen: 127.0.0.1:1
            backends:
              - {address: 10.0.0.1:1, resume_below: 3}
              - {address: 10.0.0.2:1, max_connections: 2, resume_below: 3}
        """
    )
    assert out == [
        "services[0].backends[0].resume_below: needs max_connections",
        "services[0].backends[1].resume_below: must not exceed max_connections (2)",
    ]


def test_netmask_forms() -> None:
    for mask, prefix in (("255.255.255.0", 24), ("/16", 16), (8, 8), ("32", 32)):
        cfg = parse_config(
            f"services:\n - name: s\n   listen: 10.0.0.1:80\n   persistence: {{netmask: '{mask}'}}\n"
        )
        p = cfg.services[0].persistence
        assert p is not None and p.prefix_len == prefix
    cfg = parse_config(
        "services:\n - name: s\n   listen: '[2001:db8::1]:80'\n   persistence: {netmask: 64}\n"
    )
    assert cfg.services[0].persistence is not None and cfg.services[0].persistence.prefix_len == 64
    out = problems(
        "services:\n - name: s\n   listen: '[2001:db8::1]:80'\n   persistence: {netmask: 255.255.0.0}\n"
    )
    assert out == [
        "services[0].persistence.netmask: an IPv6 service takes a prefix length (1-128), not a dotted mask"
    ]


def test_backend_admin_state() -> None:
    cfg = parse_config(
        "services:\n - name: s\n   listen: 10.0.0.1:80\n   backends: [{address: 10.0.0.2:80, state: drain}]\n"
    )
    assert cfg.services[0].backends[0].admin is AdminState.DRAIN
    assert cfg.services[0].backends[0].effective_weight == 0


def test_yaml_syntax_error_has_a_line() -> None:
    with pytest.raises(ConfigError) as e:
        parse_config("services:\n  - name: [unclosed\n", "x.yaml")
    assert str(e.value).startswith("x.yaml:3: invalid YAML")


def test_duplicate_yaml_keys_are_errors() -> None:
    out = problems("services:\n - name: a\n   name: b\n   listen: 10.0.0.1:80\n")
    assert "services[0].name: duplicate key" in out


@pytest.mark.parametrize("text", ["", "# nothing\n"])
def test_empty_file_is_an_empty_config(text: str) -> None:
    assert parse_config(text).services == ()


@pytest.mark.parametrize("text", ["[1, 2]", "just a string", "42"])
def test_top_level_must_be_a_mapping(text: str) -> None:
    assert problems(text) == ["the file must be a mapping with a 'services' list"]


def test_unknown_top_level_key() -> None:
    assert problems("servicez: []\n") == ["servicez: unknown field (did you mean 'services'?)"]


# --- fuzzing -------------------------------------------------------------------------------

_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(allow_nan=False),
    st.text(max_size=12), st.sampled_from(["127.0.0.1:80", "[::1]:1", "rr", "sh", "tcp", "udp", "2s", "ready"]),
)  # fmt: skip
_keys = st.sampled_from(
    ["name", "listen", "protocol", "scheduler", "scheduler_flags", "backends", "address", "weight",
     "persistence", "timeout", "netmask", "health_check", "type", "path", "rise", "fall", "interval",
     "state", "max_connections", "resume_below", "retries", "idle_timeout", "port", "services", "x"]
)  # fmt: skip
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_keys, inner, max_size=6),
    max_leaves=30,
)


@settings(max_examples=400, deadline=None)
@given(
    st.dictionaries(_keys, _values, max_size=4)
    | st.fixed_dictionaries({"services": st.lists(_values, max_size=4)})
)
def test_fuzzed_documents_never_crash_the_loader(doc: dict[str, object]) -> None:
    text = yaml.safe_dump(doc)
    try:
        parse_config(text)
    except ConfigError as e:
        assert e.problems and all(p.message for p in e.problems)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_fuzzed_text_never_crashes_the_loader(text: str) -> None:
    try:
        parse_config(text)
    except ConfigError as e:
        assert e.problems


def test_bundled_examples_are_valid() -> None:
    from pathlib import Path

    from lb.config import load_config

    root = Path(__file__).resolve().parent.parent
    for path in [*root.glob("examples/*.yaml"), root / "lb" / "examples" / "demo.yaml"]:
        assert load_config(path).services, path


def test_allowed_sources_are_networks() -> None:
    base = "services:\n  - {name: a, listen: 10.0.0.1:80, backends: [], allowed_sources: %s}\n"
    (s,) = parse_config(base % "[10.1.0.0/16, 192.168.1.7, '2001:db8::/32']").services
    assert [str(n) for n in s.allowed_sources] == ["10.1.0.0/16", "192.168.1.7/32", "2001:db8::/32"]
    assert problems(base % "[10.1.0.1/16]") == [
        "services[0].allowed_sources[0]: '10.1.0.1/16' is not a network in CIDR notation "
        "(10.1.0.1/16 has host bits set)"
    ]
    assert problems(base % "10.0.0.0/8") == [
        "services[0].allowed_sources: must be a list (got '10.0.0.0/8')"
    ]
