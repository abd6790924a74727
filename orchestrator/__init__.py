"""psat's orchestrator: the only place Ray and MLflow live.

The top level holds the entry points and one module per job a `psat` verb runs; the folders
beneath hold what the jobs are built from, and never import the top level
(`tests/test_layout.py` pins it).

    cli.py            the `psat` command: argparse, the JOBS table, one-line refusals
    submit.py         psat submit      (Ray Jobs client)
    train_members.py  psat train       (the members, concurrently, on Ray Train)
    sweep.py          psat sweep       (Ray Tune; its plumbing is training/tune.py)
    aggregate.py      psat aggregate   (evaluate, report, register)
    evaluate.py       psat evaluate    (a registered ensemble)
    reproduce.py      psat reproduce   (the paper's tables)

    config/      the job's YAML model, torch-free: file, schema, cluster, locations
    runtime/     Ray and MLflow plumbing: reach, ray_session, signals, shards, locking,
                 tracking (every psat.* tag), progress
    training/    plan, fit (Ray-free), backend (torch-free), trainer, driver, tune
    evaluation/  rows, tasks (rows as Ray tasks), report, figures, claims, reproduction
    registry/    psat_model (the served model, stored with every version), register,
                 pull, serve
"""
