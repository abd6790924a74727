"""The MLflow Model Registry: the served model (`psat_model`, stored as code with every
version), registration and aliases (`register`), pulling and verifying (`pull`), serving
(`serve`)."""
