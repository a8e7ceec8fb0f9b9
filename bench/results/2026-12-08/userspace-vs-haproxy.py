"""The run of bench/results/2026-12-08/userspace-vs-haproxy.md: the bench's data plane
(`python -m bench --only dataplane ...`) with one more peer, `lb userspace (HEAD)`: lb
userspace as last committed (`git archive HEAD lb offload`, put first on PYTHONPATH), beside
the working tree's, in the same rounds: before and after a change, side by side.

    PYTHONPATH=. .venv/bin/python bench/results/2026-12-08/userspace-vs-haproxy.py ARGS

(as root, from the repository root; ARGS as `python -m bench` takes them, the new peer's
name among --peers).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import bench.__main__ as cli
import bench.dataplane
from bench import peers

BEFORE = "lb userspace (HEAD)"


def main(argv: list[str]) -> int:
    root = Path(__file__).resolve().parents[3]
    with tempfile.TemporaryDirectory(prefix="lb-head-") as head:
        archive = subprocess.run(
            ["git", "-C", str(root), "archive", "HEAD", "lb", "offload"],
            capture_output=True, check=True,
        ).stdout  # fmt: skip
        subprocess.run(["tar", "-x", "-C", head], input=archive, check=True)
        made = peers.all_peers()
        extra = peers.LbAt(BEFORE, head)
        extra.plain = "lb userspace"  # results.json `options`: HEAD / working tree, per round

        def all_peers() -> dict[str, peers.Peer]:
            return {**made, BEFORE: extra}

        peers.all_peers = all_peers
        bench.dataplane.all_peers = all_peers  # type: ignore[attr-defined]
        cli.ALL_PEERS = (*cli.ALL_PEERS, BEFORE)  # type: ignore[attr-defined]
        return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
