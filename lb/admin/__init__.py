"""The admin HTTP API (server.py), its JSON views (view.py), and the CLI's client (client.py)."""
