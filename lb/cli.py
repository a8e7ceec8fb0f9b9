"""The `lb` command."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from lb import __version__
from lb.config import ConfigError, load_config
from lb.model import Config


def _summary(config: Config) -> str:
    n = len(config.services)
    lines = [f"{config.source}: OK, {n} service{'' if n == 1 else 's'}"]
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
        print(f"{args.config}: {n} problem{'s' if n != 1 else ''}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(_summary(config))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from lb import log
    from lb.daemon import run

    log.setup(args.log_level, args.log_format)
    return run(Path(args.config), Path(args.pid_file) if args.pid_file else None)


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
