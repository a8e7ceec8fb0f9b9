"""Kubernetes as a source of services (lb run --source kubernetes)."""
