"""Health probes: TCP connect and HTTP GET. Each returns (healthy, reason), or raises
CannotProbe when lb itself lacks what a probe needs (lb.exhaustion): that says nothing
of the backend."""

from __future__ import annotations

import asyncio
import os
import socket

import aiohttp

from lb.exhaustion import resource_of
from lb.model import CheckKind, Endpoint, HealthCheck


class CannotProbe(Exception):
    """The probe could not run: lb is out of `resource`."""

    def __init__(self, resource: str, reason: str) -> None:
        super().__init__(reason)
        self.resource = resource
        self.reason = reason


def _failed(e: OSError) -> tuple[bool, str]:
    resource = resource_of(e)
    if resource is not None:
        raise CannotProbe(resource, _explain(e)) from e
    return False, _explain(e)


async def tcp_probe(target: Endpoint, limit: float) -> tuple[bool, str]:
    loop = asyncio.get_running_loop()
    family = socket.AF_INET if target.family == 4 else socket.AF_INET6
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as e:
        return _failed(e)
    sock.setblocking(False)
    try:
        async with asyncio.timeout(limit):
            await loop.sock_connect(sock, target.sockaddr())
    except TimeoutError:
        return False, f"connect timed out after {limit:g}s"
    except OSError as e:
        return _failed(e)
    finally:
        sock.close()
    return True, "connected"


async def http_probe(
    session: aiohttp.ClientSession, target: Endpoint, path: str, limit: float
) -> tuple[bool, str]:
    url = f"http://{target}{path}"
    try:
        async with session.get(
            url, allow_redirects=False, timeout=aiohttp.ClientTimeout(total=limit)
        ) as resp:
            await resp.read()
            if 200 <= resp.status < 400:
                return True, f"HTTP {resp.status}"
            return False, f"HTTP {resp.status}"
    except TimeoutError:
        return False, f"no answer within {limit:g}s"
    except aiohttp.ClientOSError as e:  # a ClientError that is also an OSError
        if resource_of(e) is None:
            return False, str(e) or type(e).__name__
        return _failed(e)
    except aiohttp.ClientError as e:
        return False, str(e) or type(e).__name__
    except OSError as e:
        return _failed(e)


def _explain(e: OSError) -> str:
    """ "connection refused", not "[Errno 111] Connect call failed ('1.2.3.4', 80)"."""
    return os.strerror(e.errno).lower() if e.errno else str(e)


async def probe(
    check: HealthCheck, backend: Endpoint, session: aiohttp.ClientSession
) -> tuple[bool, str]:
    target = Endpoint(backend.ip, check.port) if check.port else backend
    if check.kind is CheckKind.HTTP:
        return await http_probe(session, target, check.path, check.timeout)
    return await tcp_probe(target, check.timeout)
