"""Helpers shared by the tests; nothing here is collected as a test.

- net: loopback backends, free ports, an in-process balancer, `eventually`
- netns: the one namespace topology (client | balancer | backends), `run_in`, `socket_in`
- traffic: backends that say who they saw, clients that ask from an address, `lb run` in a
  namespace (the native namespace tests and the kernel tier)
- proc: the real `lb` command in a subprocess
- root: `require_root` and the CI flag
- vs: a VirtualService harness for the scheduler and persistence tests
- doubles: a recording dataplane for the controller tests
- fake_ipvs: an in-memory IPVS for the IPVS dataplane tests
- kube_double: a Kubernetes API server double speaking the real wire protocol
"""
