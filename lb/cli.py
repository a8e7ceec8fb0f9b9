"""The `lb` command."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from lb import __version__
from lb.admin.client import AdminClient, AdminError
from lb.admin.listing import render
from lb.config import ConfigError, load_config
from lb.model import AdminSettings, Config, Mode


def _summary(config: Config) -> str:
    n = len(config.services)
    lines = [f"{config.path}: OK, {n} service{'' if n == 1 else 's'}"]
    for s in config.services:
        flags = f" ({', '.join(f'{s.scheduler}-{f}' for f in sorted(s.flags))})" if s.flags else ""
        persist = f", persistent {s.persistence.timeout}s" if s.persistence else ""
        lines.append(
            f"  {s.name}: {s.protocol} {s.listen} {s.scheduler}{flags}{persist} -> "
            + (", ".join(f"{b.address} w{b.weight}" for b in s.backends) or "no backends")
        )
    return "\n".join(lines)


def cmd_check(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as e:
        n = len(e.problems)
        print(e.render(), file=sys.stderr)
        least = "" if e.complete else "at least "  # reading stopped at the cap
        print(f"{args.config}: {least}{n:,} problem{'s' if n != 1 else ''}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(_summary(config))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from lb import log
    from lb.daemon import run

    log.setup(args.log_level, args.log_format)
    from lb.daemon import SourceOptions

    source = SourceOptions(args.source, args.kubeconfig, args.hostname_override)
    return run(
        Path(args.config), Path(args.pid_file) if args.pid_file else None, args.dataplane, source
    )


def cmd_reload(args: argparse.Namespace) -> int:
    if args.config:
        try:
            load_config(args.config)
        except ConfigError as e:
            print(e.render(), file=sys.stderr)
            print(f"{args.config}: not reloading an invalid config", file=sys.stderr)
            return 2
    try:
        pid = int(Path(args.pid_file).read_text().strip())
    except (OSError, ValueError) as e:
        print(f"lb: cannot read the pid file {args.pid_file}: {e}", file=sys.stderr)
        return 1
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        print(f"lb: no process {pid} (stale pid file {args.pid_file}?)", file=sys.stderr)
        return 1
    except PermissionError:
        print(f"lb: not allowed to signal process {pid}", file=sys.stderr)
        return 1
    print(f"lb: asked process {pid} to reload")
    return 0


def _admin_client(args: argparse.Namespace) -> AdminClient:
    """Where the admin API is: --admin, then $LB_ADMIN, then the config's admin.listen."""
    base = args.admin or os.environ.get("LB_ADMIN")
    token_file = args.token_file or os.environ.get("LB_ADMIN_TOKEN_FILE")
    settings = AdminSettings()
    if args.config:
        try:
            settings = load_config(args.config).admin
        except ConfigError as e:
            raise AdminError(f"cannot use {args.config}: {e.problems[0].message}") from None
    if base is None:
        base = f"http://{settings.listen}"
    elif "://" not in base:
        base = f"http://{base}"
    token = None
    path = token_file or settings.token_file
    if path:
        try:
            token = Path(path).read_text().strip()
        except OSError as e:
            raise AdminError(f"cannot read the token file {path}: {e.strerror}") from None
    return AdminClient(base, token)


def cmd_list(args: argparse.Namespace) -> int:
    try:
        doc = _admin_client(args).listing()
    except AdminError as e:
        print(f"lb: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    services = doc["services"]
    mode = "stats" if args.stats else "rate" if args.rate else ""
    print(
        render(
            services,
            numeric=args.numeric,
            mode=mode,
            exact=args.exact,
            persistent=args.persistent_conn,
            kernel=doc.get("kernel"),
        )
    )
    return 0


def _edit(args: argparse.Namespace, body: dict[str, object]) -> int:
    try:
        b = _admin_client(args).edit(args.service, args.backend, body)
    except AdminError as e:
        print(f"lb: {e}", file=sys.stderr)
        return 1
    print(
        f"{args.service} {b.get('address', args.backend)}: {b.get('state')}, "
        f"weight {b.get('weight')} (effective {b.get('effective_weight')})"
    )
    return 0


def cmd_drain(args: argparse.Namespace) -> int:
    return _edit(args, {"state": "drain"})


def cmd_maint(args: argparse.Namespace) -> int:
    return _edit(args, {"state": "maint"})


def cmd_ready(args: argparse.Namespace) -> int:
    return _edit(args, {"state": "ready"})


def cmd_set_weight(args: argparse.Namespace) -> int:
    return _edit(args, {"weight": args.weight})


def cmd_reset(args: argparse.Namespace) -> int:
    return _edit(args, {"reset": True})


def cmd_offload_plan(args: argparse.Namespace) -> int:
    from offload.commands import plan

    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(e.render(), file=sys.stderr)
        return 2
    print(plan(config, Mode(args.dataplane or config.dataplane)))
    return 0


def cmd_cleanup(args: argparse.Namespace) -> int:
    from offload.commands import run_cleanup

    device = args.device
    if device is None and args.config:
        try:
            device = load_config(args.config).offload.device
        except ConfigError as e:
            print(e.render(), file=sys.stderr)
            return 2
    try:
        for line in run_cleanup(device or "lb0"):
            print(line)
    except PermissionError:
        print("lb: cleanup needs root (CAP_NET_ADMIN)", file=sys.stderr)
        return 1
    return 0


def _weight(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is out of range 0-65535")
    return value


def cmd_demo(args: argparse.Namespace) -> int:
    from lb.demo import main as demo

    return demo(args.connections)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lb", description="L4 load balancer (TCP/UDP) with IPVS semantics"
    )
    p.add_argument("--version", action="version", version=f"lb {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("check", help="validate a config file (exit 2 if invalid)")
    c.add_argument("-c", "--config", required=True, help="the YAML config file")
    c.add_argument("-q", "--quiet", action="store_true", help="print nothing when valid")
    c.set_defaults(func=cmd_check)

    r = sub.add_parser("run", help="serve a config file until SIGTERM (SIGHUP reloads it)")
    r.add_argument("-c", "--config", required=True, help="the YAML config file")
    r.add_argument("--pid-file", help="write the process id here (for `lb reload`)")
    r.add_argument(
        "--dataplane",
        choices=[str(m) for m in Mode],
        help="override the config's dataplane: userspace, ipvs (kernel IPVS, required), "
        "nftables (kernel nftables NAT, required), auto (userspace, stable services "
        "promoted to IPVS, or to nftables where the kernel has no IPVS)",
    )
    r.add_argument(
        "--source",
        choices=["file", "kubernetes"],
        help="override the config's source of services: file (its `services`), kubernetes "
        "(Services and EndpointSlices, as a node proxy)",
    )
    r.add_argument(
        "--kubeconfig",
        help="with --source kubernetes: this kubeconfig (default $KUBECONFIG, else the "
        "in-cluster service account)",
    )
    r.add_argument(
        "--hostname-override",
        metavar="NODE",
        help="with --source kubernetes: this node's name (default $NODE_NAME, else the host name)",
    )
    r.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    r.add_argument(
        "--log-format",
        default="auto",
        choices=["auto", "json", "text"],
        help="auto: text on a terminal, JSON lines otherwise",
    )
    r.set_defaults(func=cmd_run)

    rl = sub.add_parser("reload", help="validate the config, then ask a running lb to reload it")
    rl.add_argument("--pid-file", required=True, help="the pid file `lb run --pid-file` wrote")
    rl.add_argument("-c", "--config", help="validate this file first; refuse to reload if invalid")
    rl.set_defaults(func=cmd_reload)

    off = sub.add_parser("offload", help="kernel offload: `lb offload plan -c lb.yaml`")
    off_sub = off.add_subparsers(dest="offload_command", required=True, metavar="COMMAND")
    op = off_sub.add_parser(
        "plan",
        help="print what the kernel would be given (ipvsadm-save lines, or the nft script "
        "with --dataplane nftables), no root needed",
    )
    op.add_argument("-c", "--config", required=True)
    op.add_argument(
        "--dataplane",
        choices=[str(m) for m in Mode],
        help="as `lb run --dataplane`",
    )
    op.set_defaults(func=cmd_offload_plan)

    cu = sub.add_parser(
        "cleanup",
        help="remove lb's IPVS services, its nftables tables, its dummy device and the "
        "policy routing of source: transparent",
    )
    cu.add_argument("-c", "--config", help="read offload.device from this config")
    cu.add_argument("--device", help="the dummy device (default lb0)")
    cu.set_defaults(func=cmd_cleanup)

    admin = argparse.ArgumentParser(add_help=False)
    admin.add_argument(
        "--admin", metavar="URL", help="the admin API (default: from -c, else 127.0.0.1:9090)"
    )
    admin.add_argument(
        "-c", "--config", help="read the admin address and token file from this config"
    )
    admin.add_argument(
        "--token-file", help="bearer token for changes (default: the config's admin.token_file)"
    )

    ls = sub.add_parser("list", parents=[admin], help="show services and backends, like ipvsadm -L")
    ls.add_argument("-n", "--numeric", action="store_true", help="numeric addresses and ports")
    group = ls.add_mutually_exclusive_group()
    group.add_argument("--stats", action="store_true", help="connection, packet and byte counters")
    group.add_argument(
        "--rate", action="store_true", help="rates: connections, packets, bytes per second"
    )
    group.add_argument(
        "--persistent-conn",
        action="store_true",
        help="persistence templates per backend (PersistConn), on whichever path holds them",
    )
    ls.add_argument("--exact", action="store_true", help="exact numbers (no K/M/G)")
    ls.add_argument("--json", action="store_true", help="the admin API's JSON")
    ls.set_defaults(func=cmd_list)

    for name, func, text in (
        ("drain", cmd_drain, "no new connections to BACKEND; open ones finish (weight 0)"),
        ("maint", cmd_maint, "maintenance: like drain, and health checks stop"),
        ("ready", cmd_ready, "back in service after drain or maint"),
        ("reset", cmd_reset, "drop runtime edits of BACKEND: the config file's values apply"),
    ):
        edit = sub.add_parser(name, parents=[admin], help=text)
        edit.add_argument("service")
        edit.add_argument("backend", help="ADDRESS:PORT as in the config")
        edit.set_defaults(func=func)
    sw = sub.add_parser("set-weight", parents=[admin], help="set BACKEND's weight (0-65535) live")
    sw.add_argument("service")
    sw.add_argument("backend", help="ADDRESS:PORT as in the config")
    sw.add_argument("weight", type=_weight)
    sw.set_defaults(func=cmd_set_weight)

    d = sub.add_parser(
        "demo", help="start example backends and a balancer, show traffic being spread"
    )
    d.add_argument("-n", "--connections", type=int, default=12)
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
