"""Active health checks: a pure state machine (state.py), probes and their runner."""
