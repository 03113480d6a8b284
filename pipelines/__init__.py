"""Prefect orchestration of the DVC pipeline (flows.py), its schedules (serve.py) and DVC helpers."""
