"""Evaluating rows as Ray tasks: each `rows.Row` (a model alone, or an ensemble under a
strategy) evaluated by psat's protocol, with progress, into a `RowResult`.

    rows + checkpoints -> each row's images in chunks of `evaluation.chunk_images`, one Ray
    task per chunk (a GPU one with resources.use_gpu) -> `evaluation.suite`
    (psat_core.attacks.suites) through psat_core.metrics.evaluate_per_sample, seeded by
    `row_seed` and the images' positions -> chunks merged in image order -> RowResult per row;
    the driver shows each row's progress as its chunks end (`RowProgress`).

The aggregation and the reproduction jobs both evaluate through `evaluate_rows`; the tables
and plots made of the results are `report`'s and `figures`'.
"""

from __future__ import annotations

import dataclasses
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
from orchestrator.runtime.shards import read_arrays
from orchestrator.runtime.terminal import StatusLine, duration
from psat_core.accounting import trained_parameters
from psat_core.attacks.adaptive import member_examples
from psat_core.attacks.suites import attack_suite, paper_view, transfer_crafters
from psat_core.checkpoint import ensemble_from_checkpoints, read_spec
from psat_core.ensemble import PSATEnsemble
from psat_core.metrics import (
    PerSampleResult,
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
    (``clean`` or an attack) -> member -> fraction of the images it answered; ``seconds``: its
    chunks' task time, summed (the row's cost on one worker); ``scores``: protocol (``full``,
    ``paper``) -> Table 1's columns image by image (`psat_core.metrics.example_scores`), for
    standard errors and paired comparisons.
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
        square_queries=evaluation.square_queries,
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
def staged(members: Mapping[str, str | ray.ObjectRef]) -> Iterator[dict[str, Path]]:
    """Local directories of the member checkpoints: local paths as they are, URIs (``s3://``,
    ``gs://``, ...) and `packed` files written into a temporary directory that lives as long
    as the block."""
    with tempfile.TemporaryDirectory(prefix="psat-members-") as tmp:
        local = {}
        for name, location in members.items():
            if isinstance(location, ray.ObjectRef):  # `packed` files
                local[name] = Path(tmp) / name
                local[name].mkdir()
                for file, data in ray.get(location).items():
                    (local[name] / file).write_bytes(data)
                continue
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
    member_examples: Examples | None = None,
    first: int = 0,
) -> PerSampleResult:
    """The ensemble's per-example results under its current strategy, with which member
    answered each input (``probes``). ``member_examples``: see `attack_suite`; ``first``: the
    position of ``images[0]`` in the row (`evaluate_per_sample`)."""
    seed = row_seed(job.data.seed, ensemble.names)
    return evaluate_per_sample(
        ensemble,
        images,
        labels,
        final_attacks(job, ensemble=True, seed=seed, member_examples=member_examples),
        probe=lambda x: ensemble.forward_with_choice(x)[1],
        seed=seed,
        first=first,
    )


def chunk_spans(images: int, size: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of each chunk of a row: ``size`` images each, the last the rest."""
    return [(start, min(start + size, images)) for start in range(0, images, size)]


@dataclass(frozen=True)
class ChunkResult:
    """One chunk of a row: its images' results (`evaluate_per_sample`, which member answered in
    ``probes``), the row's parameter count, where it ran and its task's seconds."""

    per: PerSampleResult
    parameters: int
    device: str
    seconds: float


def evaluate_chunk(
    job_dict: dict,
    checkpoints: Mapping[str, str | ray.ObjectRef],
    strategy: str | None,
    eval_uri: str,
    span: tuple[int, int],
    lend: bool = False,
    *lent: Examples,
) -> tuple[ChunkResult, Examples | None]:
    """The images ``span`` of a row, where it is called (:data:`evaluate_chunk_task` is its Ray
    task): a single model (``strategy`` None) or the ensemble of ``checkpoints``. Its attacks
    are seeded by the row and the images' positions, so a chunk's numbers do not depend on
    which other chunks run, where or when.

    ``lend`` (a single model): also return, per norm, the transfer crafters' examples against
    it on the chunk's images (`psat_core.attacks.adaptive.member_examples`), reusing its own
    evaluation's; ``lent`` (an ensemble): those of each member for the same chunk, in the order
    of ``checkpoints``, which its transfer attack then scores instead of crafting them again.
    Else the second value is None.
    """
    job = JobConfig.model_validate(job_dict)
    device = eval_device(job)
    started = time.monotonic()
    with staged(checkpoints) as dirs:
        ensemble = ensemble_from_checkpoints(dirs).to(device)
        # Table 1's count: what each model trained (AT_mng's noise generator included)
        parameters = sum(trained_parameters(read_spec(d)) for d in dirs.values())
    first, stop = span
    data = read_arrays(eval_uri)
    images, labels = data.to_float()[first:stop], data.labels[first:stop]
    lending = None
    if strategy is None:
        seed = row_seed(job.data.seed, checkpoints)
        attacks = final_attacks(job, ensemble=False, seed=seed)
        model = ensemble.members[0]
        crafters = transfer_crafters(attacks) if lend else {}
        keep = [name for names in crafters.values() for name in names]
        per = evaluate_per_sample(model, images, labels, attacks, seed=seed, first=first,
                                  keep=keep)  # fmt: skip
        if lend:
            on = images.to(device), labels.to(device)
            lending = {n: member_examples(model, *on, per, c, seed) for n, c in crafters.items()}
        per = dataclasses.replace(per, examples={})
    else:
        ensemble.strategy = strategy
        borrowed = _borrowed(lent, len(images)) if lent else None
        per = evaluate_ensemble(job, ensemble, images, labels, borrowed, first)
    return ChunkResult(per, parameters, str(device), time.monotonic() - started), lending


def _borrowed(lent: tuple[Examples, ...], images: int) -> Examples:
    """The members' examples of each norm, stacked member after member."""
    for examples in lent:
        for norm, found in examples.items():
            if found.shape[1] != images:
                raise ValueError(f"{norm}: examples of {found.shape[1]} images, not {images}")
    return {norm: torch.cat([examples[norm] for examples in lent]) for norm in lent[0]}


# a chunk whose worker dies is run again, alone: its attacks are seeded, its numbers the same
evaluate_chunk_task = ray.remote(num_returns=2, max_retries=3)(evaluate_chunk)


def row_result(chunks: Sequence[ChunkResult], members: Sequence[str]) -> RowResult:
    """A row from its chunks, merged in image order; ``members``: the row's models, in order
    (the ensemble's answers are their indices)."""
    first = chunks[0].per
    per = PerSampleResult(
        attack_names=first.attack_names,
        correct={k: torch.cat([c.per.correct[k] for c in chunks]) for k in first.correct},
        probes={k: torch.cat([c.per.probes[k] for c in chunks]) for k in first.probes},
    )
    choice = {
        key: {name: (answered == i).float().mean().item() for i, name in enumerate(members)}
        for key, answered in per.probes.items()
    }
    views = {"full": per, "paper": paper_view(per)}
    return RowResult(
        row=summarize(per),
        paper=summarize(views["paper"]),
        choice=choice,
        parameters=chunks[0].parameters,
        samples=len(per.correct["clean"]),
        device=chunks[0].device,
        seconds=sum(c.seconds for c in chunks),
        scores={
            protocol: {column: v.tolist() for column, v in example_scores(view).items()}
            for protocol, view in views.items()
        },
    )


def evaluate_row(
    job_dict: dict,
    checkpoints: Mapping[str, str],
    strategy: str | None,
    eval_uri: str,
    lend: bool = False,
    *lent: list[Examples],
) -> tuple[RowResult, list[Examples] | None]:
    """One row in this process, chunk after chunk as `evaluate_rows` runs them as tasks:
    the same numbers. ``lent``: per member, its row's lent examples, chunk by chunk."""
    job = JobConfig.model_validate(job_dict)
    spans = chunk_spans(len(read_arrays(eval_uri)), job.evaluation.chunk_images)
    chunks, lending = [], []
    for i, span in enumerate(spans):
        chunk, examples = evaluate_chunk(job_dict, checkpoints, strategy, eval_uri, span, lend,
                                         *(member[i] for member in lent))  # fmt: skip
        chunks.append(chunk)
        lending.append(examples)
    return row_result(chunks, list(checkpoints)), lending if lend else None


class RowProgress:
    """Each row's progress as its chunks end: on a terminal one live line per row (images
    done, still robust under every attack, time left), rewritten in place; elsewhere (CI,
    Ray job logs) one line per finished row."""

    def __init__(self, rows: Sequence[Row], images: int, chunks: int, echo: Callable) -> None:
        self.images, self.chunks, self.echo = images, chunks, echo
        self.status = StatusLine() if echo is print else None
        self.done = {row.key: [] for row in rows}  # key -> ChunkResults ended
        self.started = time.monotonic()

    def ended(self, key: str, chunk: ChunkResult, running: int) -> None:
        self.done[key].append(chunk)
        if len(self.done[key]) == self.chunks:
            chunks = self.done[key]
            robust = sum(int(example_scores(c.per)["max"].sum()) for c in chunks)
            cost = duration(sum(c.seconds for c in chunks))
            self._print(f"[{key}] {self.images} images evaluated, {robust} robust to every "
                        f"attack; {cost} of task time")  # fmt: skip
        if self.status is not None:
            self.status.show("\n".join(self._live(running)))

    def _live(self, running: int) -> list[str]:
        lines = []
        for key, chunks in self.done.items():
            if 0 < len(chunks) < self.chunks:
                images = sum(len(c.per.correct["clean"]) for c in chunks)
                robust = sum(int(example_scores(c.per)["max"].sum()) for c in chunks)
                per_chunk = sum(c.seconds for c in chunks) / len(chunks)
                left = per_chunk * (self.chunks - len(chunks)) / max(running, 1)
                lines.append(f"[{key}] {images}/{self.images} images, {robust} still robust, "
                             f"~{duration(left)} left")  # fmt: skip
        return lines

    def _print(self, line: str) -> None:
        if self.status is None:
            self.echo(line)
        else:
            self.status.print(line)

    def close(self) -> None:
        if self.status is not None:
            self.status.close()


def evaluate_rows(
    job: JobConfig,
    rows: Sequence[Row],
    checkpoints: Mapping[str, str | ray.ObjectRef],
    eval_uri: str,
    echo: Callable[[str], None] = print,
) -> dict[str, RowResult]:
    """Every row on the connected cluster, split into chunks of `evaluation.chunk_images`
    images, each chunk a Ray task (`evaluation.concurrent_chunks` at once; default: all, as the
    cluster's CPUs or GPUs take them); its models' ``checkpoints`` (name -> location, or the
    object reference of `packed` files). The chunks of member rows that lend their examples
    (`lenders`) go first; an ensemble row's chunk starts once its members' same chunk has ended
    and takes their examples by reference, never through the driver."""
    res = job.resources
    share = {"num_cpus": res.cpus_per_worker, "num_gpus": res.gpus}
    job_dict = job.model_dump()
    borrowers, lending = lenders(job, rows)
    spans = chunk_spans(len(read_arrays(eval_uri)), job.evaluation.chunk_images)
    by_key = {row.key: row for row in rows}
    order = sorted(by_key, key=lambda key: key not in lending)  # stable: lenders first
    waiting = [(key, i) for i in range(len(spans)) for key in order]
    refs, lent, pending, ended = {}, {}, {}, set()
    at_once = job.evaluation.concurrent_chunks or len(waiting)
    progress = RowProgress(rows, spans[-1][1], len(spans), echo)
    try:
        while waiting or pending:
            ready = [(k, i) for k, i in waiting if {(m, i) for m in borrowers.get(k, ())} <= ended]
            for key, i in ready[: max(at_once - len(pending), 0)]:
                waiting.remove((key, i))
                models = {name: checkpoints[name] for name in by_key[key].models}
                borrowed = [lent[member, i] for member in borrowers.get(key, ())]
                name = f"evaluate {key} chunk {i + 1}/{len(spans)}"
                task = evaluate_chunk_task.options(name=name, **share)
                refs[key, i], lent[key, i] = task.remote(
                    job_dict, models, by_key[key].strategy, eval_uri, spans[i], key in lending,
                    *borrowed,
                )  # fmt: skip
                pending[refs[key, i]] = key, i
            done, _ = ray.wait(list(pending), num_returns=1, timeout=2.0)
            for ref in done:
                ended.add(chunk := pending.pop(ref))
                progress.ended(chunk[0], ray.get(ref), len(pending))
    finally:
        progress.close()
    return {
        key: row_result([ray.get(refs[key, i]) for i in range(len(spans))], by_key[key].models)
        for key in by_key
    }


def packed(directory: Path) -> ray.ObjectRef:
    """A checkpoint folder's files in Ray's object store: how a driver's local checkpoint
    (a pulled registered version) reaches tasks on every node (`staged`)."""
    return ray.put({p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()})
