"""Hostile config files: every bound of the loader refuses with a clear problem (exit 2),
never a spin, a traceback or a NaN taken for a duration (issue 20, defects 1-4)."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import pytest

from lb import config as config_module
from lb.config import ConfigError, parse_config
from lb.loader import load_isolated
from tests.support.proc import run_cli

SERVICE = """\
services:
- name: web
  listen: 127.0.0.1:8080
  backends: [{address: 127.0.0.1:9001}]
"""


def alias_bomb(levels: int) -> str:
    """The 'billion laughs' of YAML: each level lists the one below nine times."""
    lines = ['l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * 9) + "]")
    lines.append(f"services: *l{levels - 1}")
    return "\n".join(lines) + "\n"


def merge_bomb(levels: int) -> str:
    lines = ["m0: &m0 {a: 1}"]
    for i in range(1, levels):
        lines.append(f"m{i}: &m{i} {{p: *m{i - 1}, q: *m{i - 1}, <<: *m{i - 1}}}")
    return "\n".join(lines) + "\nservices: []\n"


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse_config(text, "t.yaml")
    return [f"{p.where}: {p.message}" if p.path else p.message for p in e.value.problems]


@pytest.mark.parametrize("bomb", [alias_bomb(9), merge_bomb(30)], ids=["aliases", "merge-keys"])
def test_an_alias_bomb_is_refused_at_once(bomb: str) -> None:
    started = time.monotonic()
    (problem,) = problems(bomb)
    assert "aliases and merge keys expand to" in problem and "refused" in problem
    assert time.monotonic() - started < 5  # it used to spin for minutes (eight levels: 33 s)


def test_a_recursive_alias_is_a_problem_not_a_recursion_error() -> None:
    assert problems("services: &a [*a]\n") == [
        "an alias refers to a node that contains it (recursive)"
    ]


def test_nesting_is_bounded() -> None:
    deep = "services: " + "[" * 100 + "]" * 100 + "\n"
    assert problems(deep) == ["nested deeper than 64 levels"]


def test_aliases_within_the_budget_still_load() -> None:
    """Sharing one backend list between services is what anchors are for."""
    pool = "&pool [{address: 127.0.0.1:9001}, {address: 127.0.0.1:9002}]"
    text = "services:\n" + "".join(
        f"- {{name: s{i}, listen: 127.0.0.1:{8000 + i}, backends: {pool if i == 0 else '*pool'}}}\n"
        for i in range(50)
    )
    services = parse_config(text).services
    assert len(services) == 50 and all(len(s.backends) == 2 for s in services)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("shutdown_grace", ".nan", "shutdown_grace: must be a number of seconds, not NaN"),
        ("shutdown_grace", ".inf", "shutdown_grace: must be at most 365 days (31536000s)"),
        ("shutdown_grace", "-.inf", "shutdown_grace: must not be negative"),
        ("shutdown_grace", "9" * 400, "shutdown_grace: must be at most 365 days (31536000s)"),
        ("shutdown_grace", "'" + "9" * 400 + "s'", "shutdown_grace: must be at most 365 days"),
    ],
)
def test_top_level_durations_are_finite_and_bounded(field: str, value: str, message: str) -> None:
    (problem,) = problems(f"{field}: {value}\n" + SERVICE)
    assert problem.startswith(message)


@pytest.mark.parametrize(
    ("key", "yaml_value", "path"),
    [
        ("connect_timeout", ".nan", "services[0].connect_timeout"),
        ("idle_timeout", ".nan", "services[0].idle_timeout"),
        ("idle_timeout", ".inf", "services[0].idle_timeout"),
        ("health_check", "{type: tcp, interval: .nan}", "services[0].health_check.interval"),
        ("health_check", "{type: tcp, timeout: .nan}", "services[0].health_check.timeout"),
        ("persistence", "{timeout: .inf}", "services[0].persistence.timeout"),
        ("persistence", "{timeout: .nan}", "services[0].persistence.timeout"),
        ("persistence", "{timeout: " + "9" * 400 + "}", "services[0].persistence.timeout"),
        ("persistence", "{timeout: 2592001}", "services[0].persistence.timeout"),
        ("max_connections", "9" * 400, "services[0].max_connections"),
    ],
)
def test_service_numbers_are_finite_and_in_range(key: str, yaml_value: str, path: str) -> None:
    got = problems(SERVICE + f"  {key}: {yaml_value}\n")
    assert [p.split(":")[0] for p in got] == [path], got


def test_a_bounded_persistence_timeout_loads() -> None:
    (svc,) = parse_config(SERVICE + "  persistence: {timeout: 2592000}\n").services
    assert svc.persistence is not None and svc.persistence.timeout == 2592000
    assert math.isfinite(svc.connect_timeout)


def test_problems_past_the_cap_are_counted_not_listed() -> None:
    text = "services:\n" + "".join(
        f"- {{name: s{i}, listen: 127.0.0.1:{8000 + i}, weight: 1}}\n" for i in range(150)
    )
    with pytest.raises(ConfigError) as e:
        parse_config(text, "t.yaml")
    assert len(e.value.problems) == 150
    lines = e.value.render().splitlines()
    assert len(lines) == 101 and lines[-1] == "t.yaml: ... and 50 more problems"


def test_a_file_over_the_size_limit_is_refused_unread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(config_module, "MAX_FILE_BYTES", 1000)
    big = tmp_path / "big.yaml"
    big.write_text(SERVICE + "#" * 2000 + "\n")
    with pytest.raises(ConfigError) as e:
        config_module.load_config(big)
    assert "more than 1,000" in e.value.render()


@pytest.mark.parametrize(
    "text", [alias_bomb(9), "services: &a [*a]\n", "shutdown_grace: .nan\n" + SERVICE]
)
async def test_lb_check_exits_2_with_a_clear_line(tmp_path: Path, text: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    code, out, err = await run_cli("check", "-c", str(path))
    assert code == 2, (out, err)
    assert "Traceback" not in err and f"{path}:" in err


async def test_the_isolated_loader_gives_the_config_or_every_problem(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(SERVICE)
    bad.write_text(alias_bomb(9))
    assert (await load_isolated(good)).services[0].name == "web"
    with pytest.raises(ConfigError) as e:
        await load_isolated(bad)
    assert "aliases and merge keys" in e.value.render()


async def test_the_isolated_loader_kills_a_load_past_its_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(SERVICE)
    children: list[int] = []
    fork = os.fork

    def spy() -> int:
        pid = fork()
        if pid:
            children.append(pid)
        return pid

    monkeypatch.setattr(os, "fork", spy)  # lb.loader calls os.fork
    with pytest.raises(ConfigError) as e:
        await load_isolated(good, budget=0.0001)
    assert "loading took longer than 0.0001s: refused" in e.value.render()
    (pid,) = children
    assert not Path(f"/proc/{pid}").exists()  # killed and reaped: no zombie left
    assert (await load_isolated(good)).services[0].name == "web"
