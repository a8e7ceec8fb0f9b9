"""`lb run`: serve a config file until SIGTERM; SIGHUP reloads it."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import logging
import os
import resource
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from socket import gethostname

from lb.admin.server import AdminServer, AdminSetupError, Readiness, bind_admin, read_token
from lb.config import ConfigError, load_config
from lb.controller import Controller
from lb.k8s.api import Api, ApiError
from lb.k8s.health import ProxyHealth
from lb.k8s.health_server import HealthServers
from lb.k8s.source import KubernetesSource, SourceMetrics
from lb.loader import load_isolated
from lb.log import emit
from lb.metrics import Metrics
from lb.model import Config, Mode, Service
from lb.proxy.dataplane import ApplyError, UserspaceDataplane
from lb.proxy.sockets import BindError
from lb.rates import INTERVAL, PRUNE_ROUNDS, RateEstimator
from offload.kernel import KernelUnavailable, open_kernel
from offload.manager import OffloadManager
from offload.policy import OffloadPolicy

log = logging.getLogger("lb")


def raise_fd_limit() -> None:
    """Every proxied connection holds two descriptors, every UDP flow one: use the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class StartError(Exception):
    """lb could not start; one line per reason."""

    def __init__(self, lines: list[str]) -> None:
        self.lines = lines
        super().__init__("; ".join(lines))


@dataclass(frozen=True, slots=True)
class SourceOptions:
    """Command-line overrides of where services come from."""

    source: str | None = None  # file | kubernetes; None: the config's `source`
    kubeconfig: str | None = None
    node_name: str | None = None


class Daemon:
    def __init__(
        self,
        config_path: Path,
        pid_file: Path | None,
        dataplane: str | None = None,
        source: SourceOptions | None = None,
    ) -> None:
        self.config_path = config_path
        self.pid_file = pid_file
        self.mode_override = dataplane
        self.source_options = source or SourceOptions()
        self.kubernetes: KubernetesSource | None = None
        self._api: Api | None = None
        self._from_kubernetes: tuple[Service, ...] = ()  # the services it applied last
        self.userspace = UserspaceDataplane()
        self.dataplane = OffloadManager(self.userspace, on_sync=self._on_sync)
        self.controller = Controller(self.dataplane)
        self.metrics = Metrics(
            self.dataplane.observe,
            lambda: (s.key for s in self.controller.config.services),
            lambda: self.controller.monitors,
        )
        self.rates = RateEstimator()
        self.readiness = Readiness()
        self.admin: AdminServer | None = None
        self.config = Config()
        self._stop = asyncio.Event()
        self._reloading: asyncio.Task[None] | None = None
        self._serving = False  # start() done: a SIGHUP reloads now, else once it is
        self._hup_pending = False
        self._sampler: asyncio.Task[None] | None = None

    def _on_sync(self, dataplane: str, seconds: float) -> None:
        self.metrics.record_sync(dataplane, seconds)

    async def run(self) -> int:
        """`lb run`: start, serve until SIGTERM/SIGINT (SIGHUP reloads), stop. The exit code."""
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
        loop = asyncio.get_running_loop()
        # handlers first: a SIGHUP or SIGTERM that arrives while starting (even right after
        # lb.started, before this coroutine resumes) must not hit the default action
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._on_hup)
        try:
            try:
                await self.start(self.config)
            except StartError as e:
                for line in e.lines:
                    print(f"lb: {line}", file=sys.stderr)
                return 1
            self._serving = True
            if self._hup_pending:  # the file may have changed after start read it
                self._on_hup()
            await self._stop.wait()
            await self.stop()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            if self.pid_file is not None:
                self.pid_file.unlink(missing_ok=True)
        return 0

    async def start(self, config: Config) -> None:
        """Bind the admin API and every listener and apply `config`; StartError if not all
        of it can be done (then nothing is left bound)."""
        self.config = config
        await self._enable_offload(config)
        settings = config.admin
        self.metrics.backends = settings.backend_metrics
        if settings.enabled:
            try:
                token = read_token(settings)
                sock = bind_admin(settings)
            except AdminSetupError as e:
                raise StartError([str(e)]) from None
            self.admin = AdminServer(
                settings=settings,
                controller=self.controller,
                metrics=self.metrics,
                rates=self.rates,
                readiness=self.readiness,
                token=token,
            )
            await self.admin.start(sock)
        try:
            await self.controller.start(config)
        except ApplyError as e:
            await self.controller.shutdown(0)
            if self.admin is not None:
                await self.admin.stop()
            raise StartError([str(err) for err in e.errors]) from None
        if self._source_of(config) == "kubernetes":
            try:
                await self._start_kubernetes(config)
            except StartError:
                await self.controller.shutdown(0)
                if self.admin is not None:
                    await self.admin.stop()
                raise
        else:
            self.readiness.set_ready()
        # What start-up made (config, services, listeners) lives as long as lb: out of the
        # collector's way, so that its full passes do not walk it again and again.
        gc.freeze()
        self._sampler = asyncio.get_running_loop().create_task(self._sample_rates())
        emit(
            log,
            logging.INFO,
            "lb.started",
            (
                f"serving services from Kubernetes (node {self.kubernetes.node_name})"
                if self.kubernetes is not None
                else f"serving {len(config.services)} services from {self.config_path}"
            )
            + (f", admin API on http://{settings.listen}" if self.admin else ""),
            services=len(config.services),
            config=str(self.config_path),
            admin=str(settings.listen) if self.admin else None,
            pid=os.getpid(),
        )

    def _source_of(self, config: Config) -> str:
        return self.source_options.source or config.source

    async def _start_kubernetes(self, config: Config) -> None:
        """Connect to the API and start the informers; the dataplanes get the services
        after the start-up gate (readiness says so until then)."""
        if config.services:
            raise StartError(
                [f"{self.config_path}: services must be empty when the source is kubernetes"]
            )
        k = config.kubernetes
        o = self.source_options
        node_name = o.node_name or k.node_name or os.environ.get("NODE_NAME") or gethostname()
        try:
            api = await Api.connect(o.kubeconfig or k.kubeconfig)
        except ApiError as e:
            raise StartError([f"kubernetes: {e}"]) from None
        self._api = api
        health = HealthServers(ProxyHealth(2 * k.sync_period))  # kube-proxy's timeout
        if k.healthz_address is not None:
            try:
                await health.start_proxy(k.healthz_address)
            except OSError as e:  # as kube-proxy: said, and lb serves on without it
                emit(
                    log,
                    logging.ERROR,
                    "k8s.healthz_failed",
                    f"cannot serve /healthz and /livez on {k.healthz_address}: {e.strerror or e}",
                )
        self.kubernetes = KubernetesSource.from_api(
            api,
            node_name,
            k,
            self._apply_kubernetes,
            metrics=SourceMetrics(self.metrics.registry),
            health=health,
        )
        self.readiness.set_not_ready("waiting for the first sync from the Kubernetes API")
        self.kubernetes.start()
        asyncio.get_running_loop().create_task(self._ready_after_first_sync(self.kubernetes))

    async def _ready_after_first_sync(self, source: KubernetesSource) -> None:
        await source.first_sync()
        self.readiness.set_ready()
        gc.freeze()  # as at the end of start(): what the first sync made lives on

    async def _apply_kubernetes(self, services: tuple[Service, ...]) -> None:
        """The services from Kubernetes, with the file's settings. A service whose
        listener cannot be bound is left out (and said so), not the whole sync."""
        try:
            await self.controller.reload(replace(self.config, services=services))
        except ApplyError as e:
            refused = {err.key for err in e.errors}
            for err in e.errors:
                _bind_failed(err, "; the service is left out")
            services = tuple(s for s in services if s.key not in refused)
            await self.controller.reload(replace(self.config, services=services))
        self._from_kubernetes = services

    async def _enable_offload(self, config: Config) -> None:
        """Open the kernel dataplane the mode asks for: `ipvs` and `nftables` insist, `auto`
        takes IPVS, else nftables, else keeps every service in userspace."""
        mode = Mode(self.mode_override or config.dataplane)
        o = config.offload
        policy = OffloadPolicy(mode, o.hold_down, o.churn_limit)
        if mode is Mode.USERSPACE:
            self.dataplane.enable(policy, None, None, o.drain_timeout, o.affinity_wait)
            return
        try:
            kernel, host = await open_kernel(mode, o.device, o.drain_timeout, o.flow_threshold)
        except KernelUnavailable as e:
            if mode is not Mode.AUTO:
                raise StartError([f"dataplane {mode}: {e}"]) from None
            policy.unavailable = f"no kernel dataplane: {e}"
            emit(
                log,
                logging.WARNING,
                "offload.unavailable",
                f"dataplane auto: no kernel dataplane ({e}); every service stays in userspace",
            )
            self.dataplane.enable(policy, None, None, o.drain_timeout, o.affinity_wait)
            return
        self.dataplane.enable(policy, kernel, host, o.drain_timeout, o.affinity_wait)
        emit(
            log,
            logging.INFO,
            "offload.enabled",
            f"dataplane {mode}: {kernel.name} ready on {o.device} ({kernel.fastpath_note()})",
            mode=str(mode),
            kernel=kernel.name,
            device=o.device,
        )

    async def stop(self) -> None:
        """Not ready any more; no new connections; open ones get the grace period."""
        self.readiness.set_not_ready("stopping")
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
        if self.kubernetes is not None:
            await self.kubernetes.stop()
            await self.kubernetes.health.close()
        if self._api is not None:
            await self._api.close()
        await self.controller.shutdown(grace)
        if self._sampler is not None:
            self._sampler.cancel()
        if self.admin is not None:
            await self.admin.stop()
        emit(log, logging.INFO, "lb.stopped", "stopped")

    async def _sample_rates(self) -> None:
        """Feed the rate estimator every 2 s, as the kernel's estimator runs: only the
        services whose counters moved (idle ones cost nothing). What dataplanes no longer
        carry is forgotten every PRUNE_ROUNDS (a walk of every service known: each round,
        it was most of an idle lb's CPU at 10,000 services)."""
        loop = asyncio.get_running_loop()
        for n in itertools.count(1):
            self.rates.round(loop.time(), self.dataplane.active())
            if n % PRUNE_ROUNDS == 0:
                self.rates.prune(self.dataplane.carries)
            await asyncio.sleep(INTERVAL)

    def _on_hup(self) -> None:
        if not self._serving or (self._reloading is not None and not self._reloading.done()):
            self._hup_pending = True  # the file may change after it is read: read it again
            return
        self._reloading = asyncio.get_running_loop().create_task(self.reload())

    async def reload(self) -> None:
        """Reload until no SIGHUP came in meanwhile."""
        self._hup_pending = True
        while self._hup_pending:
            self._hup_pending = False
            try:
                await self._reload()
            except Exception as e:  # a bug: say so loudly, keep serving
                log.exception("reload failed")
                self._reload_failed(f"reload of {self.config_path} failed: {type(e).__name__}: {e}")

    async def _reload(self) -> None:
        try:  # in a child process: serving, checks, the admin API and signals go on
            config = await load_isolated(self.config_path)
        except ConfigError as e:
            for p in e.listed:
                where = f"{p.where}: " if p.path else ""
                emit(
                    log,
                    logging.ERROR,
                    "config.invalid",
                    where + p.message,
                    path=p.where,
                    line=p.line,
                )
            self._reload_failed(
                f"reload of {self.config_path} rejected ({len(e.problems)} problems"
                + (f", {e.unlisted} not listed)" if e.unlisted else ")")
            )
            return
        if self.kubernetes is not None:
            if config.services:
                self._reload_failed(
                    f"reload of {self.config_path} rejected: services must be empty when the "
                    "source is kubernetes"
                )
                return
            config = replace(config, services=self._from_kubernetes)
        try:
            await self.controller.reload(config)
        except ApplyError as e:
            for err in e.errors:
                _bind_failed(err)
            self._reload_failed(f"reload of {self.config_path} rejected")
            return
        if (config.dataplane, config.offload) != (self.config.dataplane, self.config.offload):
            emit(
                log,
                logging.WARNING,
                "offload.unchanged",
                "the dataplane or offload settings changed: they take effect when lb restarts",
            )
        if (config.source, config.kubernetes) != (
            self.config.source,
            self.config.kubernetes,
        ):
            emit(
                log,
                logging.WARNING,
                "source.unchanged",
                "the source or kubernetes settings changed: they take effect when lb restarts",
            )
        if config.admin != self.config.admin:
            emit(
                log,
                logging.WARNING,
                "admin.unchanged",
                "the admin settings changed: they take effect when lb restarts",
            )
        self.config = replace(config, services=()) if self.kubernetes else config
        self.metrics.reloads.labels("success").inc()
        n = len(config.services)
        emit(
            log,
            logging.INFO,
            "config.reloaded",
            f"reloaded {self.config_path}: {n} services",
            services=n,
        )

    def _reload_failed(self, message: str) -> None:
        self.metrics.reloads.labels("failure").inc()
        emit(
            log, logging.ERROR, "config.reload_rejected", f"{message}; the current config serves on"
        )


def _bind_failed(err: BindError, then: str = "") -> None:
    emit(
        log,
        logging.ERROR,
        "listener.bind_failed",
        f"{err}{then}",
        service=err.service,
        listen=str(err.key),
    )


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """uvloop when it is installed, asyncio's own loop otherwise."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; this is the fallback
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def run(
    config_path: Path,
    pid_file: Path | None,
    dataplane: str | None = None,
    source: SourceOptions | None = None,
) -> int:
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(Daemon(config_path, pid_file, dataplane, source).run())
