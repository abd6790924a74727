"""Evaluating rows as Ray tasks: each `rows.Row` (a model alone, or an ensemble under a
strategy) evaluated by psat's protocol, with progress, into a `RowResult`.

    rows + checkpoints -> one Ray task per row (a GPU one with resources.use_gpu) ->
    `evaluation.suite` (psat_core.attacks.suites) through psat_core.metrics.evaluate_per_sample,
    seeded by `row_seed` -> RowResult per row; the tasks post every finished attack to a
    ProgressBoard, and the driver prints it.

The aggregation and the reproduction jobs both evaluate through `evaluate_rows`; the tables
and plots made of the results are `report`'s and `figures`'.
"""

from __future__ import annotations

import tempfile
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs
import ray
import torch

from orchestrator.config import JobConfig
from orchestrator.config.locations import local_path
from orchestrator.evaluation.rows import Row
from orchestrator.runtime.progress import BoardReader, board_here
from orchestrator.runtime.shards import read_arrays
from psat_core.accounting import trained_parameters
from psat_core.attacks.adaptive import member_examples
from psat_core.attacks.suites import attack_suite, paper_view, transfer_crafters
from psat_core.checkpoint import ensemble_from_checkpoints, read_spec
from psat_core.ensemble import PSATEnsemble
from psat_core.metrics import (
    PerSampleResult,
    Progress,
    evaluate_per_sample,
    example_scores,
    standard_error,
    summarize,
)

# norm -> (candidates, N, *): adversarial examples against members (`member_examples`)
Examples = dict[str, torch.Tensor]


@dataclass(frozen=True)
class RowResult:
    """One evaluated row.

    ``row``: Table 1's columns and every attack (the accuracy after it and the attacks of its
    norm before it) -> fraction; ``paper``: Table 1's columns under the paper's protocol, read
    off the same run (`psat_core.attacks.suites.paper_view`); ``choice`` (ensembles): input
    (``clean`` or an attack) -> member -> fraction of the images it answered; ``seconds``: the
    evaluation's wall time; ``scores``: protocol (``full``, ``paper``) -> Table 1's columns
    image by image (`psat_core.metrics.example_scores`), for standard errors and paired
    comparisons.
    """

    row: dict[str, float]
    paper: dict[str, float]
    choice: dict[str, dict[str, float]]
    parameters: int
    samples: int
    device: str
    seconds: float
    scores: dict[str, dict[str, list[float]]]

    def under(self, protocol: str) -> dict[str, float]:
        """The row under ``"paper"`` (the paper's protocol) or ``"full"`` (the suite's)."""
        return self.paper if protocol == "paper" else self.row

    def examples(self, protocol: str) -> dict[str, torch.Tensor]:
        """Table 1's columns image by image under `protocol`."""
        return {column: torch.tensor(v) for column, v in self.scores[protocol].items()}

    def errors(self, protocol: str) -> dict[str, float]:
        """The standard error of each of Table 1's columns under `protocol`."""
        return {column: standard_error(v) for column, v in self.examples(protocol).items()}


def row_seed(data_seed: int, models: Iterable[str]) -> int:
    """The attacks' seed for a row of ``models``: the same weights evaluated twice, or a
    one-member ensemble and its member, draw the same random starts."""
    return zlib.crc32(f"{data_seed}/{','.join(sorted(models))}".encode())


def final_attacks(
    job: JobConfig, ensemble: bool, seed: int, member_examples: Examples | None = None
) -> dict:
    """The attacks of a final evaluation, by ``"<norm>/<attack>"``: `evaluation.suite`
    (psat_core.attacks.suites) at the `attacks.eval` radii and budgets. Every norm's accuracy is the
    per-example worst over its attacks. ``member_examples``: see `attack_suite`."""
    evaluation = job.evaluation
    return attack_suite(
        evaluation.suite,
        job.attack_configs("eval"),
        ensemble=ensemble,
        apgd_steps=evaluation.apgd_steps,
        gate_temperature=evaluation.gate_temperature,
        seed=seed,
        member_examples=member_examples,
    )


def lenders(job: JobConfig, rows: Sequence[Row]) -> tuple[dict[str, list[str]], set[str]]:
    """Ensemble row -> the member rows (one per member, in its order) whose adversarial
    examples its transfer attack scores instead of crafting them again: every ensemble row all
    of whose members are rows of their own, under a suite with a transfer attack. Second, the
    member rows that lend."""
    if not any(name.endswith("/transfer") for name in final_attacks(job, True, 0)):
        return {}, set()
    alone = {row.models[0]: row.key for row in rows if row.strategy is None}
    found = {
        row.key: [alone.get(model) for model in row.models]
        for row in rows
        if row.strategy is not None
    }
    borrowers = {key: members for key, members in found.items() if all(members)}
    return borrowers, {member for members in borrowers.values() for member in members}


def eval_device(job: JobConfig) -> torch.device:
    """Where an evaluation task runs: its GPU with ``resources.use_gpu``, else the CPU with
    ``resources.torch_threads`` threads."""
    torch.set_num_threads(job.resources.torch_threads)
    use_cuda = job.resources.use_gpu and torch.cuda.is_available()
    return torch.device("cuda" if use_cuda else "cpu")


@contextmanager
def staged(members: Mapping[str, str]) -> Iterator[dict[str, Path]]:
    """Local directories of the member checkpoints: local paths as they are, URIs (``s3://``,
    ``gs://``, ...) copied into a temporary directory that lives as long as the block."""
    with tempfile.TemporaryDirectory(prefix="psat-members-") as tmp:
        local = {}
        for name, location in members.items():
            if (path := local_path(location)) is not None:
                local[name] = path
                continue
            fs, path = pafs.FileSystem.from_uri(location)
            if fs.get_file_info(path).type != pafs.FileType.Directory:
                raise FileNotFoundError(f"member {name!r}: no checkpoint directory at {location}")
            local[name] = Path(tmp) / name
            local[name].mkdir()
            pafs.copy_files(path, str(local[name]), source_filesystem=fs)
        yield local


def evaluate_ensemble(
    job: JobConfig,
    ensemble: PSATEnsemble,
    images: torch.Tensor,
    labels: torch.Tensor,
    progress: Progress | None = None,
    member_examples: Examples | None = None,
) -> tuple[PerSampleResult, dict[str, dict[str, float]]]:
    """The ensemble's per-example results under its current strategy, and which member
    answered how often, on clean inputs and under each attack. ``member_examples``: see
    `attack_suite`."""
    seed = row_seed(job.data.seed, ensemble.names)
    result = evaluate_per_sample(
        ensemble,
        images,
        labels,
        final_attacks(job, ensemble=True, seed=seed, member_examples=member_examples),
        probe=lambda x: ensemble.forward_with_choice(x)[1],
        seed=seed,
        progress=progress,
    )
    choice = {
        key: {name: (answered == i).float().mean().item() for i, name in enumerate(ensemble.names)}
        for key, answered in result.probes.items()
    }
    return result, choice


def evaluate_row(
    job_dict: dict,
    checkpoints: dict[str, str],
    strategy: str | None,
    eval_uri: str,
    board: ray.actor.ActorHandle | None = None,
    key: str = "",
    lend: bool = False,
    *lent: Examples,
) -> tuple[RowResult, Examples | None]:
    """One row on the eval split, where it is called (:data:`evaluate_row_task` is its Ray
    task): a single model (``strategy`` None) or the ensemble of ``checkpoints``. Each
    finished attack is posted to ``board`` as row ``key``.

    ``lend`` (a single model): also return, per norm, the transfer crafters' examples against
    it on every image (`psat_core.attacks.adaptive.member_examples`), reusing its own evaluation's;
    ``lent`` (an ensemble): those of each member, in the order of ``checkpoints``, which its
    transfer attack then scores instead of crafting them again. Else the second value is None.
    """
    job = JobConfig.model_validate(job_dict)
    device = eval_device(job)
    started = time.monotonic()
    with staged(checkpoints) as dirs:
        ensemble = ensemble_from_checkpoints(dirs).to(device)
        # Table 1's count: what each model trained (AT_mng's noise generator included)
        parameters = sum(trained_parameters(read_spec(d)) for d in dirs.values())
    data = read_arrays(eval_uri)
    images, labels = data.to_float(), data.labels
    progress = None if board is None else progress_to(board.post.remote, key)
    lending = None
    if strategy is None:
        seed = row_seed(job.data.seed, checkpoints)
        attacks = final_attacks(job, ensemble=False, seed=seed)
        model = ensemble.members[0]
        crafters = transfer_crafters(attacks) if lend else {}
        keep = [name for names in crafters.values() for name in names]
        per = evaluate_per_sample(
            model, images, labels, attacks, seed=seed, progress=progress, keep=keep
        )
        if lend:
            on = images.to(device), labels.to(device)
            lending = {n: member_examples(model, *on, per, c, seed) for n, c in crafters.items()}
        choice = {}
    else:
        ensemble.strategy = strategy
        borrowed = _borrowed(lent, len(images)) if lent else None
        per, choice = evaluate_ensemble(job, ensemble, images, labels, progress, borrowed)
    views = {"full": per, "paper": paper_view(per)}
    result = RowResult(
        row=summarize(per),
        paper=summarize(views["paper"]),
        choice=choice,
        parameters=parameters,
        samples=len(labels),
        device=str(device),
        seconds=time.monotonic() - started,
        scores={
            protocol: {column: v.tolist() for column, v in example_scores(view).items()}
            for protocol, view in views.items()
        },
    )
    return result, lending


def _borrowed(lent: tuple[Examples, ...], images: int) -> Examples:
    """The members' examples of each norm, stacked member after member."""
    for examples in lent:
        for norm, found in examples.items():
            if found.shape[1] != images:
                raise ValueError(f"{norm}: examples of {found.shape[1]} images, not {images}")
    return {norm: torch.cat([examples[norm] for examples in lent]) for norm in lent[0]}


evaluate_row_task = ray.remote(num_returns=2)(evaluate_row)


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes}m {seconds:02d}s" if minutes else f"{seconds}s"


def progress_to(post: Callable[[dict], object], key: str) -> Progress:
    """A protocol progress callback that hands each finished attack of row ``key`` to ``post``
    as an event (see `progress_line`)."""

    def progress(attack: str, robust: int, total: int, left: float) -> None:
        post({"row": key, "attack": attack, "robust": robust, "total": total, "left": left})

    return progress


def progress_line(event: Mapping) -> str:
    """``[member.linf] linf/apgd-t: 212/360 still robust, ~3m 10s left in this row``."""
    return (
        f"[{event['row']}] {event['attack']}: {event['robust']}/{event['total']} still robust, "
        f"~{_duration(event['left'])} left in this row"
    )


def evaluate_rows(
    job: JobConfig,
    rows: Sequence[Row],
    checkpoints: Mapping[str, str],
    eval_uri: str,
    echo: Callable[[str], None] = print,
) -> dict[str, RowResult]:
    """Every row as a Ray task on the connected cluster (`evaluation.concurrent_rows` at
    once), its models' ``checkpoints`` (name -> location), printing each finished attack.
    Member rows that lend their examples (`lenders`) run first; an ensemble row starts once
    its members' rows have ended."""
    res = job.resources
    task = evaluate_row_task.options(num_cpus=res.cpus_per_worker, num_gpus=res.gpus)
    board = board_here()
    new_events = BoardReader(board)
    job_dict = job.model_dump()
    borrowers, lending = lenders(job, rows)

    def drain() -> None:
        for event in new_events():
            echo(progress_line(event))

    by_key = {row.key: row for row in rows}
    waiting = sorted(by_key, key=lambda key: key not in lending)  # stable: lenders first
    refs, lent, pending, ended = {}, {}, {}, set()
    at_once = job.evaluation.concurrent_rows or len(waiting)
    try:
        while waiting or pending:
            ready = [k for k in waiting if set(borrowers.get(k, ())) <= ended]
            for key in ready[: max(at_once - len(pending), 0)]:
                waiting.remove(key)
                row = by_key[key]
                models = {name: checkpoints[name] for name in row.models}
                borrowed = [lent[member] for member in borrowers.get(key, ())]
                refs[key], lent[key] = task.remote(
                    job_dict, models, row.strategy, eval_uri, board, key, key in lending,
                    *borrowed,
                )  # fmt: skip
                pending[refs[key]] = key
            done, _ = ray.wait(list(pending), num_returns=1, timeout=2.0)  # a row ends, or 2 s
            ended.update(pending.pop(ref) for ref in done)
            drain()
        results = {key: ray.get(ref) for key, ref in refs.items()}
        drain()
    finally:
        ray.kill(board)
    for key, result in results.items():
        echo(f"[{key}] evaluated in {_duration(result.seconds)}")
    return results
