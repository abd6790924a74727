"""The paper's comparisons (Tables 1, 3, 4, 6, Figure 2): `python -m jobs.reproduce --config F`."""

from orchestrator.cli import job_main

if __name__ == "__main__":
    raise SystemExit(job_main("reproduce"))
