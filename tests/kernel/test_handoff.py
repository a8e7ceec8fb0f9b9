"""Promote to IPVS and demote back under continuous client load: zero failed connections,
zero lost bytes (the same scenario runs natively with nftables: tests/test_nft_offload.py)."""

from __future__ import annotations

from pathlib import Path

from tests.support.netns import Topology, run_in
from tests.support.traffic import Backends, promote_and_demote_under_load


async def test_promote_and_demote_under_load_lose_nothing(
    topo: Topology, backends: Backends, tmp_path: Path
) -> None:
    await promote_and_demote_under_load(topo, tmp_path)


async def test_a_persistent_client_keeps_its_backend_through_every_move(
    topo: Topology, backends: Backends, tmp_path: Path
) -> None:
    """Promote (userspace's templates into IPVS through its sync daemon, in the hold that
    creates the service), demote (IPVS's templates from /proc back into userspace) and
    promote again, under load: every client keeps its backend. It starts where an lb was
    killed in a hand-over: its backup sync daemon still runs, and is taken back."""
    for step in (
        ["ip", "link", "add", "lb0", "type", "dummy"],
        ["ip", "link", "set", "lb0", "multicast", "on", "up"],
        ["ipvsadm", "--start-daemon", "backup", "--mcast-interface", "lb0", "--syncid", "76"],
    ):
        run_in(topo, *step)
    await promote_and_demote_under_load(topo, tmp_path, persistent=True)
    # the daemon listens only while a service is handed over: none is left
    assert "backup" not in run_in(topo, "ipvsadm", "-L", "--daemon")
