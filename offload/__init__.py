"""Kernel offload dataplanes (IPVS, nftables) and the offload manager: see
docs/dataplanes/ipvs.md and docs/dataplanes/nftables.md."""
