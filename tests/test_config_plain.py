"""The plain fast read of the config (issue 17): a file without anchors, aliases, merge
or duplicate keys is read from libyaml's events without nodes or line marks; everything
else, and every file with a problem, is read again in full so that problems keep their
`file:line: path: message` form. Both reads must give the same Config."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.scale import config as scale_config
from lb.config import (
    _NOT_PLAIN,
    ConfigError,
    _Located,
    _parse_endpoint,
    _parse_located,
    _plain_data,
    parse_config,
)
from lb.model import Endpoint

EXAMPLE = Path(__file__).parent.parent / "lb" / "examples" / "demo.yaml"

RICH = """\
shutdown_grace: 2s
admin: {listen: 127.0.0.1:9191}
services:
- name: web
  listen: 10.0.0.1:80
  scheduler: wrr
  persistence: {timeout: 300s, netmask: 24}
  health_check: {type: http, path: /healthz, interval: 2s, timeout: 1s, rise: 2, fall: 3}
  backends:
  - {address: 10.0.1.1:8080, weight: 3}
  - {address: "10.0.1.2:8080", weight: 0x1, state: drain}
  - address: '[fd00::1]:8080'
    max_connections: 100
- name: dns
  protocol: udp
  listen: 10.0.0.2:53
  idle_timeout: 30s
  backends: [{address: 10.0.2.1:53}]
"""


def never(i: int, item: object) -> None:
    raise AssertionError("no services")


@pytest.mark.parametrize("text", [RICH, EXAMPLE.read_text(), scale_config(50)])
def test_the_plain_read_gives_the_data_and_config_the_full_read_gives(text: str) -> None:
    taken: list[object] = []
    data = _plain_data(text, lambda i, item: taken.append(item))
    assert data == yaml.safe_load(text)
    assert taken == data["services"]
    assert parse_config(text, "x.yaml") == _parse_located(text, "x.yaml")


@pytest.mark.parametrize(
    "text",
    [
        "services: &s []\n",  # an anchor
        "a: &x 1\nb: *x\nservices: []\n",  # an alias
        "base: {scheduler: rr}\nservices: [{<<: {name: a}}]\n",  # a merge key
        "services: []\nservices: []\n",  # a duplicate key
        "services: !!seq []\n",  # a tag on a collection
        "{[1]: 2}\n",  # a key that is not a scalar
        "services: []\n---\nservices: []\n",  # two documents
        "",  # no document
        "services: [\n",  # invalid YAML
        "a: !!float nope\n",  # a scalar PyYAML cannot build
        "[" * 65 + "]" * 65 + "\n",  # nested past MAX_DEPTH
    ],
)
def test_what_is_not_plain_is_left_to_the_full_read(text: str) -> None:
    assert _plain_data(text, never) is _NOT_PLAIN


def test_a_problem_stops_the_plain_read_and_is_located_by_the_full_one() -> None:
    lines = scale_config(3).splitlines()
    at = [n for n, t in enumerate(lines) if "- address:" in t][12]  # services[1].backends[2]
    lines[at] = lines[at].replace(":8080", ":99999")
    text = "\n".join(lines) + "\n"
    taken: list[int] = []

    def take(i: int, item: object) -> None:
        taken.append(i)
        if i == 1:
            raise _Located

    assert _plain_data(text, take) is _NOT_PLAIN and taken == [0, 1]  # read no further
    with pytest.raises(ConfigError) as e:
        parse_config(text, "x.yaml")
    assert str(e.value).startswith(f"x.yaml:{at + 1}: services[1].backends[2].address")


@settings(max_examples=2000, deadline=None)
@given(
    st.one_of(
        st.text(max_size=30),
        st.builds(
            lambda octets, port, pad: ".".join(map(str, octets)) + pad + f":{port}",
            st.lists(st.integers(-1, 300), min_size=3, max_size=5),
            st.integers(-1, 70000),
            st.sampled_from(["", " ", "\x00", "0"]),
        ),
        st.ip_addresses(v=4).map(lambda ip: f"{ip}:80"),
    )
)
def test_the_fast_ipv4_endpoint_reads_as_endpoint_parse(text: str) -> None:
    """config's inet_pton path for ADDRESS:PORT accepts and refuses what
    Endpoint.parse (ipaddress) does, with the same result."""

    def read(parse: Callable[[str], Endpoint]) -> str:
        try:
            return repr(parse(text))
        except ValueError as e:
            return f"refused: {e}"

    assert read(_parse_endpoint.__wrapped__) == read(Endpoint.parse)
