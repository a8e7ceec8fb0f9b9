"""What the fuzzers found (tests/fuzz/fuzz_*.py), each kept as a regression test; the
inputs are also in the corpus, so that every fuzzing run tries them again."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import pytest

from lb.config import ConfigError, parse_config
from tests.support.net import free_port
from tests.test_admin_server import running, web_config

SCALARS = {
    "an empty float": "shutdown_grace: !!float ''\n",
    "an empty int": "services: [{name: a, listen: '127.0.0.1:1', retries: !!int ''}]\n",
    "a sign alone": "shutdown_grace: !!int '+'\n",
    "not a float": "shutdown_grace: !!float abc\n",
    "not a bool": "admin: {enabled: !!bool maybe}\n",
    "not a timestamp": "x: !!timestamp soon\n",
    "no such date": "x: !!timestamp 2020-13-45\n",
    "an int of 5,000 digits": "shutdown_grace: " + "9" * 5000 + "\n",
}


@pytest.mark.parametrize("text", SCALARS.values(), ids=SCALARS.keys())
def test_a_scalar_yaml_cannot_build_is_invalid_yaml_not_a_crash(text: str) -> None:
    """PyYAML raises IndexError, ValueError, KeyError or AttributeError for these: they
    escaped the loader (a traceback from `lb check`, a reload's loader dying)."""
    with pytest.raises(ConfigError) as e:
        parse_config(text, "t.yaml")
    (problem,) = e.value.problems
    assert problem.message.startswith("invalid YAML: ") and "is not a valid !!" in problem.message
    assert problem.line == 1


async def test_a_body_cut_short_is_a_4xx_without_a_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A POST whose client half-closes before its Content-Length is reached: aiohttp's
    read raises ConnectionResetError, which was logged with a traceback as a 500."""
    async with running(tmp_path, web_config(free_port(), [])) as (_, url):
        host, port = url.removeprefix("http://").rsplit(":", 1)
        with caplog.at_level(logging.DEBUG):
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(
                b"POST /api/v1/services/web/backends/127.0.0.1:1 HTTP/1.1\r\nHost: lb\r\n"
                b"Content-Length: 100\r\n\r\n{}"
            )
            writer.write_eof()
            answer = await asyncio.wait_for(reader.read(), 10)
            writer.close()
    if answer:  # aiohttp may already have closed the connection
        head, _, body = answer.partition(b"\r\n\r\n")
        status = int(head.split()[1])
        assert 400 <= status < 500 and json.loads(body)["status"] == status, answer
    assert not [r for r in caplog.records if r.exc_info and r.levelno >= logging.INFO]
