"""Training models: what to train (`plan`), one model's fit without Ray (`fit`), Ray Train's
single-worker backend (`backend`, torch-free), the per-worker loop and its trainer
(`trainer`), models driven concurrently from the job (`driver`), Ray Tune's side of a sweep
(`tune`). A docstring only: Ray Train's controller unpickles `backend` alone."""
