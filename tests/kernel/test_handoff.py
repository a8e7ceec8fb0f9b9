"""Promote to IPVS and demote back under continuous client load: zero failed connections,
zero lost bytes (the same scenario runs natively with nftables: tests/test_nft_offload.py)."""

from __future__ import annotations

from pathlib import Path

from tests.support.netns import Topology
from tests.support.traffic import Backends, promote_and_demote_under_load


async def test_promote_and_demote_under_load_lose_nothing(
    topo: Topology, backends: Backends, tmp_path: Path
) -> None:
    await promote_and_demote_under_load(topo, tmp_path)
