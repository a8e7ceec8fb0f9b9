"""The `lb` command end to end: check, start-up errors, SIGTERM grace, SIGHUP reload."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import tempfile
from pathlib import Path

import pytest

from lb.daemon import Daemon
from lb.model import Config
from tests.support.net import TcpBackend, free_port, read_line
from tests.support.proc import LbProcess, run_cli
from tests.support.root import require_root


def write(path: Path, services: list[tuple[str, int, list[str]]], extra: str = "") -> Path:
    out = extra
    if "admin:" not in extra:  # never the default port: tests must not meet a stray lb
        out += f"admin: {{listen: 127.0.0.1:{free_port()}}}\n"
    out += "services:\n"
    for name, port, backends in services:
        out += f"  - name: {name}\n    listen: 127.0.0.1:{port}\n    scheduler: rr\n    backends:"
        out += "".join(f"\n      - {{address: '{b}'}}" for b in backends) if backends else " []"
        out += "\n"
    path.write_text(out)
    return path


async def connect_refused(port: int) -> bool:
    try:
        _, w = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return True
    w.close()
    return False


async def test_check_accepts_a_good_file(tmp_path: Path) -> None:
    cfg = write(tmp_path / "lb.yaml", [("web", 8080, ["127.0.0.1:9001", "127.0.0.1:9002"])])
    code, out, err = await run_cli("check", "-c", str(cfg))
    assert code == 0, err
    assert "OK, 1 service\n" in out and "web: tcp 127.0.0.1:8080 rr" in out


async def test_check_reports_every_problem_and_exits_2(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(
        "services:\n  - name: web\n    listen: 127.0.0.1:8080\n    scheduler: rr\n"
        "    scheduler_flags: [sh-port]\n    backends:\n      - {address: 127.0.0.1:1, weight: -1}\n"
    )
    code, out, err = await run_cli("check", "-c", str(cfg))
    assert code == 2 and out == ""
    assert f"{cfg}:5: services[0].scheduler_flags: the rr scheduler takes no flags" in err
    assert f"{cfg}:7: services[0].backends[0].weight: must be >= 0 (got -1)" in err
    assert err.strip().endswith("2 problems")


async def test_run_refuses_a_bad_file_with_exit_2(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    port = free_port()
    cfg.write_text(f"services:\n  - name: web\n    listen: 127.0.0.1:{port}\n    weigth: 1\n")
    code, _, err = await run_cli("run", "-c", str(cfg))
    assert code == 2
    assert "services[0].weigth: unknown field" in err
    assert await connect_refused(port)


async def test_run_with_a_missing_file(tmp_path: Path) -> None:
    code, _, err = await run_cli("run", "-c", str(tmp_path / "nope.yaml"))
    assert code == 2
    assert "cannot read the config file: No such file or directory" in err


async def test_address_in_use_is_one_line_and_leaves_nothing_bound(tmp_path: Path) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    busy_port = busy.getsockname()[1]
    free = free_port()
    cfg = write(tmp_path / "lb.yaml", [("a", free, []), ("b", busy_port, [])])
    code, _, err = await run_cli("run", "-c", str(cfg))
    busy.close()
    assert code == 1
    lines = [line for line in err.splitlines() if line.startswith("lb:")]
    assert lines == [
        f"lb: cannot listen on tcp 127.0.0.1:{busy_port} for service b: address already in use"
    ]
    s = socket.socket()
    s.bind(("127.0.0.1", free))  # service a's port was not left bound
    s.close()


async def test_privileged_port_without_privileges(tmp_path: Path) -> None:
    require_root()  # to drop to nobody
    start = int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    if start <= 80:
        pytest.skip(f"ip_unprivileged_port_start is {start}: port 80 needs no privilege here")
    with tempfile.TemporaryDirectory() as shared:  # readable by nobody, unlike tmp_path
        os.chmod(shared, 0o755)
        cfg = write(Path(shared) / "lb.yaml", [("web", 80, [])])
        os.chmod(cfg, 0o644)
        code, _, err = await run_cli(
            "run",
            "-c",
            str(cfg),
            prefix=["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"],
        )
    assert code == 1
    assert (
        f"lb: cannot listen on tcp 127.0.0.1:80 for service web: permission denied "
        f"(ports below {start} need root or CAP_NET_BIND_SERVICE)"
    ) in err


async def test_sigterm_stops_accepting_and_lets_connections_finish(tmp_path: Path) -> None:
    backend = await TcpBackend("A").start()
    port = free_port()
    cfg = write(tmp_path / "lb.yaml", [("web", port, [backend.address])], "shutdown_grace: 20s\n")
    lb = await LbProcess.start(cfg)
    try:
        await lb.wait_event("lb.started")
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await reader.readline() == b"A\n"
        lb.signal(signal.SIGTERM)
        await lb.wait_event("lb.stopping")
        assert await connect_refused(port)  # no new connections...
        writer.write(b"ping")  # ...while the open one carries on
        assert await asyncio.wait_for(reader.readexactly(4), 2) == b"ping"
        await asyncio.sleep(0.2)
        assert lb.proc.returncode is None  # still waiting for it
        writer.close()
        assert await lb.wait() == 0
        assert not lb.pid_file.exists()
    finally:
        await lb.stop()


async def test_shutdown_grace_runs_out_and_resets(tmp_path: Path) -> None:
    backend = await TcpBackend("A").start()
    port = free_port()
    cfg = write(tmp_path / "lb.yaml", [("web", port, [backend.address])], "shutdown_grace: 500ms\n")
    lb = await LbProcess.start(cfg)
    try:
        await lb.wait_event("lb.started")
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await reader.readline() == b"A\n"
        start = asyncio.get_running_loop().time()
        lb.signal(signal.SIGTERM)
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(), 5)
        assert asyncio.get_running_loop().time() - start >= 0.45
        assert await lb.wait() == 0
        writer.close()
    finally:
        await lb.stop()


async def test_sighup_reload_keeps_listeners_and_connections(tmp_path: Path) -> None:
    a, b, c = [await TcpBackend(n).start() for n in "ABC"]
    web, other, new = free_port(), free_port(), free_port()
    cfg = write(
        tmp_path / "lb.yaml", [("web", web, [a.address, b.address]), ("other", other, [c.address])]
    )
    lb = await LbProcess.start(cfg)
    try:
        await lb.wait_event("lb.started")
        reader, writer = await asyncio.open_connection("127.0.0.1", web)
        assert await reader.readline() == b"B\n"  # list B A
        # B leaves web, "other" goes, "new" comes.
        write(cfg, [("web", web, [a.address]), ("new", new, [c.address])])
        n = len(lb.events)
        lb.signal(signal.SIGHUP)
        await lb.wait_event("config.reloaded", after=n)
        writer.write(b"same conn")  # web's listener and this connection survived
        assert await asyncio.wait_for(reader.readexactly(9), 2) == b"same conn"
        assert [await read_line("127.0.0.1", web) for _ in range(3)] == ["A"] * 3
        assert await read_line("127.0.0.1", new) == "C"
        assert await connect_refused(other)
        writer.close()
    finally:
        await lb.stop()


async def test_invalid_reload_is_rejected_and_the_old_config_serves_on(tmp_path: Path) -> None:
    a = await TcpBackend("A").start()
    port = free_port()
    cfg = write(tmp_path / "lb.yaml", [("web", port, [a.address])])
    lb = await LbProcess.start(cfg)
    try:
        await lb.wait_event("lb.started")
        cfg.write_text(cfg.read_text().replace("scheduler: rr", "scheduler: fastest"))
        n = len(lb.events)
        lb.signal(signal.SIGHUP)
        err = await lb.wait_event("config.invalid", after=n)
        line = cfg.read_text().splitlines().index("    scheduler: fastest") + 1
        assert err["path"] == "services[0].scheduler" and err["line"] == line
        await lb.wait_event("config.reload_rejected", after=n)
        assert await read_line("127.0.0.1", port) == "A"
    finally:
        await lb.stop()


async def test_reload_that_cannot_bind_changes_nothing(tmp_path: Path) -> None:
    a, b = await TcpBackend("A").start(), await TcpBackend("B").start()
    port = free_port()
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    cfg = write(tmp_path / "lb.yaml", [("web", port, [a.address])])
    lb = await LbProcess.start(cfg)
    try:
        await lb.wait_event("lb.started")
        write(cfg, [("web", port, [b.address]), ("clash", busy.getsockname()[1], [])])
        n = len(lb.events)
        lb.signal(signal.SIGHUP)
        failed = await lb.wait_event("listener.bind_failed", after=n)
        assert "address already in use" in failed["msg"]
        await lb.wait_event("config.reload_rejected", after=n)
        assert [await read_line("127.0.0.1", port) for _ in range(2)] == ["A", "A"]  # web unchanged
    finally:
        busy.close()
        await lb.stop()


async def test_lb_reload_command_validates_first(tmp_path: Path) -> None:
    a, b = await TcpBackend("A").start(), await TcpBackend("B").start()
    port = free_port()
    cfg = write(tmp_path / "lb.yaml", [("web", port, [a.address])])
    lb = await LbProcess.start(cfg)
    try:
        await lb.wait_event("lb.started")
        bad = tmp_path / "bad.yaml"
        bad.write_text("services: [{name: web}]\n")
        code, _, err = await run_cli("reload", "--pid-file", str(lb.pid_file), "-c", str(bad))
        assert code == 2 and "services[0].listen: required field is missing" in err
        write(cfg, [("web", port, [b.address])])
        n = len(lb.events)
        code, out, _ = await run_cli("reload", "--pid-file", str(lb.pid_file), "-c", str(cfg))
        assert code == 0 and "reload" in out
        await lb.wait_event("config.reloaded", after=n)
        assert await read_line("127.0.0.1", port) == "B"
    finally:
        await lb.stop()


async def test_signals_while_starting_are_handled_not_fatal(tmp_path: Path) -> None:
    """A SIGHUP that lands while lb starts (a slow kernel, or a supervisor reacting to
    lb.started before run() resumes) reloads once started; SIGTERM then stops cleanly.
    Without handlers installed first, either signal's default action kills the process."""
    first, second = free_port(), free_port()
    cfg = write(tmp_path / "lb.yaml", [("web", first, [])])

    class SignalledWhileStarting(Daemon):
        async def start(self, config: Config) -> None:
            await super().start(config)
            write(cfg, [("web", second, [])])  # changed after start read it
            os.kill(os.getpid(), signal.SIGHUP)
            await asyncio.sleep(0.05)  # delivered now, still inside start()

    d = SignalledWhileStarting(cfg, None)
    run = asyncio.create_task(d.run())
    for _ in range(100):
        if d.config.services and d.config.services[0].listen.port == second:
            break
        await asyncio.sleep(0.05)
    assert d.config.services[0].listen.port == second  # the pending reload happened
    os.kill(os.getpid(), signal.SIGTERM)
    assert await asyncio.wait_for(run, 10) == 0
