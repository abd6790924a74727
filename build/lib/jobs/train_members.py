"""Train the l_inf, l_2 and l_1 members concurrently: `python -m jobs.train_members --config F`."""

from orchestrator.cli import job_main

if __name__ == "__main__":
    raise SystemExit(job_main("train"))
