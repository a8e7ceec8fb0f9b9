"""Kernel offload dataplanes (IPVS, nftables): see issues 4 and 5."""
