"""End to end (train members, aggregate, register): `python -m jobs.run --config F`."""

from orchestrator.cli import job_main

if __name__ == "__main__":
    raise SystemExit(job_main("run"))
