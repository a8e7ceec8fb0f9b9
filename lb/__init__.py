"""lb: an L4 load balancer with IPVS semantics, in userspace and offloaded to the kernel."""

__version__ = "0.1.0"
