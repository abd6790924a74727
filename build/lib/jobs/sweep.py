"""Sweep embedding dimension and PGD settings with Ray Tune: `python -m jobs.sweep --config F`."""

from orchestrator.cli import job_main

if __name__ == "__main__":
    raise SystemExit(job_main("sweep"))
