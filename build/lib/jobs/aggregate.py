"""Evaluate, log and register the PSAT ensemble: `python -m jobs.aggregate --config F`."""

from orchestrator.cli import job_main

if __name__ == "__main__":
    raise SystemExit(job_main("aggregate"))
