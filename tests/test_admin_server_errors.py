"""Every admin error is a JSON 4xx, for the HTTP parser's refusals too, with no traceback
for a client's mistake (issue 20, defects 6 and 7)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from tests.support.net import free_port, http_exchange
from tests.test_admin_server import running, web_config


async def exchange(url: str, request: bytes) -> tuple[int, dict[str, object]]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    status, head, body = await http_exchange(host, int(port), request)
    assert b"application/json" in head, head
    return status, json.loads(body)


BAD_REQUESTS = {
    "oversized header": b"GET /healthz HTTP/1.1\r\nHost: lb\r\nX: " + b"a" * 20000 + b"\r\n\r\n",
    "oversized request line": b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: lb\r\n\r\n",
    "unknown method": b"FOO\x01 / HTTP/1.1\r\nHost: lb\r\n\r\n",
    "content-length with chunked": (
        b"POST /api/v1/services/web/backends/x HTTP/1.1\r\nHost: lb\r\n"
        b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    ),
    "negative content-length": (
        b"POST /api/v1/services/web/backends/x HTTP/1.1\r\nHost: lb\r\nContent-Length: -1\r\n\r\n"
    ),
    "http/1.1 without host": b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n",
    "not http at all": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
}


@pytest.mark.parametrize("request_bytes", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
async def test_what_the_http_parser_refuses_is_a_json_4xx_without_a_traceback(
    tmp_path: Path, request_bytes: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    async with running(tmp_path, web_config(free_port(), [])) as (_, url):
        with caplog.at_level(logging.DEBUG):
            status, body = await exchange(url, request_bytes)
        assert 400 <= status < 500 and body["status"] == status and body["error"]
        assert not [r for r in caplog.records if r.exc_info and r.levelno >= logging.INFO]


async def test_a_non_ascii_bearer_token_is_a_401_not_a_500(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    admin = f"{{listen: 127.0.0.1:{free_port()}, token_file: {token}}}"
    async with running(tmp_path, web_config(free_port(), [], admin=admin)) as (_, url):
        request = (
            b"POST /api/v1/services/web/backends/127.0.0.1:1 HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n"
            b"Authorization: Bearer \xc3\xa9\xff\xfe\r\nContent-Length: 2\r\n\r\n{}"
        )
        status, body = await exchange(url, request)
        assert status == 401 and body["error"] == "a bearer token is required"
        good = request.replace(b"\xc3\xa9\xff\xfe", b"s3cret")
        status, body = await exchange(url, good)
        assert status == 400  # past the token: the empty edit is refused on its merits


async def test_deeply_nested_json_under_the_size_limit_is_a_400(tmp_path: Path) -> None:
    async with running(tmp_path, web_config(free_port(), [])) as (_, url):
        nested = b"[" * 8000 + b"]" * 8000
        request = (
            b"POST /api/v1/services/web/backends/127.0.0.1:1 HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n"
            b"Content-Length: " + str(len(nested)).encode() + b"\r\n\r\n" + nested
        )
        status, body = await exchange(url, request)
        assert status == 400 and "nested too deeply" in str(body["error"])
