"""Where a job's Ray processes post progress and its driver reads it: a `ProgressBoard` actor.

Training workers post each model's start and epochs (`training.trainer`), evaluation
tasks each finished attack (`evaluation.tasks`). The board's own process imports this
module only: Ray and the standard library, not torch.
"""

from __future__ import annotations

import time

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy


@ray.remote(num_cpus=0)
class ProgressBoard:
    """Where models' rank-0 workers (and evaluation rows) post events; the driver reads them."""

    def __init__(self) -> None:
        self.events: list[dict] = []

    def post(self, event: dict) -> None:
        self.events.append(dict(event, time=time.time()))

    def since(self, index: int) -> list[dict]:
        return self.events[index:]


class BoardReader:
    """The driver's side of a :class:`ProgressBoard`: each call returns the events posted since
    the previous call."""

    def __init__(self, board: ray.actor.ActorHandle) -> None:
        self.board, self.seen = board, 0

    def __call__(self) -> list[dict]:
        events = ray.get(self.board.since.remote(self.seen))
        self.seen += len(events)
        return events


def board_here(name: str | None = None) -> ray.actor.ActorHandle:
    """A new ProgressBoard on the driver's node (as Ray Train places its controllers): a job's
    progress lives as long as its driver, whatever other node is lost."""
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ProgressBoard.options(name=name, scheduling_strategy=here).remote()
