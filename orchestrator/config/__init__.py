"""What a job is configured with, torch-, Ray- and MLflow-free (Ray's actors unpickle it).

`file` reads a bounded, alias-free YAML file and ``--set`` overrides; `schema` is the pydantic
model of a job, one section per class (a new field goes there, with its default and its
check); `cluster` refuses locations that would not outlive a Ray job; `locations` decides
between local paths and URIs. This package imports no other part of psat's orchestrator.
"""

from orchestrator.config.cluster import check_cluster_locations, in_ray_job
from orchestrator.config.file import ConfigError, parse_overrides, read_config_file
from orchestrator.config.schema import (
    JobConfig,
    SweepRange,
    TrackingConfig,
    deep_merge,
    load_config,
    parse_config,
)

__all__ = [
    "ConfigError",
    "JobConfig",
    "SweepRange",
    "TrackingConfig",
    "check_cluster_locations",
    "deep_merge",
    "in_ray_job",
    "load_config",
    "parse_config",
    "parse_overrides",
    "read_config_file",
]
