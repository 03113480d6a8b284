"""Prefect orchestration of the DVC pipeline (flows.py), its schedules (serve.py) and DVC helpers."""

import os

# Prefect's server telemetry (a background service of the ephemeral server every flow run starts when no
# PREFECT_API_URL is set) writes its session row into a fresh SQLite database while the run writes its own:
# the first run on a new PREFECT_HOME printed a ~100-line `sqlite3.OperationalError: database is locked`
# traceback, and the heartbeat it sends needs the internet. Off unless the user sets it; set before Prefect is
# imported, which reads its settings once.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
