"""`lb run`: serve a config file until SIGTERM; SIGHUP reloads it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from lb.config import ConfigError, load_config
from lb.controller import Controller
from lb.log import emit
from lb.model import Config
from lb.proxy.dataplane import ApplyError, UserspaceDataplane

log = logging.getLogger("lb")


def raise_fd_limit() -> None:
    """Every proxied connection holds two descriptors, every UDP flow one: use the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Daemon:
    def __init__(self, config_path: Path, pid_file: Path | None) -> None:
        self.config_path = config_path
        self.pid_file = pid_file
        self.controller = Controller(UserspaceDataplane())
        self.config = Config()
        self._stop = asyncio.Event()
        self._reloading: asyncio.Task[None] | None = None

    async def run(self) -> int:
        try:
            self.config = load_config(self.config_path)
        except ConfigError as e:
            print(e.render(), file=sys.stderr)
            return 2
        raise_fd_limit()
        if self.pid_file is not None:
            try:
                self.pid_file.write_text(f"{os.getpid()}\n")
            except OSError as e:
                print(
                    f"lb: cannot write the pid file {self.pid_file}: {e.strerror}", file=sys.stderr
                )
                return 1
        try:
            await self.controller.start(self.config)
        except ApplyError as e:
            for err in e.errors:
                print(f"lb: {err}", file=sys.stderr)
            await self.controller.shutdown(0)
            if self.pid_file is not None:
                self.pid_file.unlink(missing_ok=True)
            return 1
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._on_hup)
        emit(
            log,
            logging.INFO,
            "lb.started",
            f"serving {len(self.config.services)} services from {self.config_path}",
            services=len(self.config.services),
            config=str(self.config_path),
            pid=os.getpid(),
        )
        try:
            await self._stop.wait()
            if self._reloading is not None and not self._reloading.done():
                self._reloading.cancel()  # a reload must not bind anything past this point
                with contextlib.suppress(asyncio.CancelledError):
                    await self._reloading
            grace = self.config.shutdown_grace
            emit(
                log,
                logging.INFO,
                "lb.stopping",
                f"stopping: no new connections, {grace:g}s grace",
                grace=grace,
            )
            await self.controller.shutdown(grace)
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            if self.pid_file is not None:
                self.pid_file.unlink(missing_ok=True)
        emit(log, logging.INFO, "lb.stopped", "stopped")
        return 0

    def _on_hup(self) -> None:
        if self._reloading is None or self._reloading.done():
            self._reloading = asyncio.get_running_loop().create_task(self.reload())

    async def reload(self) -> None:
        try:
            config = load_config(self.config_path)
        except ConfigError as e:
            for p in e.problems:
                emit(
                    log,
                    logging.ERROR,
                    "config.invalid",
                    f"{p.where}: {p.message}" if p.path else p.message,
                    path=p.where,
                    line=p.line,
                )
            emit(
                log,
                logging.ERROR,
                "config.reload_rejected",
                f"reload of {self.config_path} rejected ({len(e.problems)} problems); "
                "the current config serves on",
            )
            return
        try:
            await self.controller.reload(config)
        except ApplyError as e:
            for err in e.errors:
                emit(
                    log,
                    logging.ERROR,
                    "listener.bind_failed",
                    str(err),
                    service=err.service,
                    listen=str(err.key),
                )
            emit(
                log,
                logging.ERROR,
                "config.reload_rejected",
                f"reload of {self.config_path} rejected; the current config serves on",
            )
            return
        self.config = config
        emit(
            log,
            logging.INFO,
            "config.reloaded",
            f"reloaded {self.config_path}: {len(config.services)} services",
            services=len(config.services),
        )


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """uvloop when it is installed, asyncio's own loop otherwise."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; this is the fallback
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def run(config_path: Path, pid_file: Path | None) -> int:
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(Daemon(config_path, pid_file).run())
