"""Ray and MLflow plumbing the jobs share: what answers (`reach`), what fits (`capacity`),
joining or starting Ray (`ray_session`), signals, data shards, job locks, MLflow runs and every
psat.* tag (`tracking`), progress events (`progress`). A docstring only: importing one module
must not import the others (the progress board's actor loads `progress` alone)."""
