"""The aggregation job: evaluate the PSAT ensemble, log it to MLflow, register it.

    member checkpoints (the training run's tags, or given) -> load and check them
    -> `evaluation.tasks.evaluate_rows`: every member alone and the ensemble under both
       strategies, one Ray task per row, under the suite `evaluation.suite` (Tables 3 and 4)
    -> `evaluation.report` and `evaluation.figures`: report.md and the plots
    -> one MLflow run, role "aggregate": report.md, plots, the pyfunc model with its evidence
       (the metrics below linked to it, the data splits as datasets, Table 1 as a table)
    -> a new registry version described by its Table 1 line; alias `candidate`, and
       `champion` when its trade-off is better

Metric names: ``<row>.<column>`` with rows ``lowest_entropy``, ``average`` and
``member.<norm>``, columns ``clean, linf, l2, l1, max, avg, trade_off`` (fractions);
``choice.<strategy>.<input>.<member>``: the fraction of images that member answered, on clean
inputs and under each attack; ``parameters.*``; ``trade_off``: the registered strategy's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from mlflow.exceptions import MlflowException

from orchestrator.config import JobConfig
from orchestrator.config.locations import checkpoint_location
from orchestrator.evaluation.figures import accuracy_figure, choice_figure
from orchestrator.evaluation.report import (
    STRATEGY_NAMES,
    markdown_report,
    percent,
    table_columns,
    table_line,
    table_lines,
)
from orchestrator.evaluation.rows import Evaluation, aggregation_rows, member_key
from orchestrator.evaluation.tasks import evaluate_rows, staged
from orchestrator.registry.register import (
    EXAMPLE_SIZE,
    ModelEvidence,
    Registration,
    register_ensemble,
)
from orchestrator.runtime.capacity import check_ray, one_model
from orchestrator.runtime.ray_session import data_uri, prepare_job
from orchestrator.runtime.shards import read_arrays, splits
from orchestrator.runtime.tracking import (
    AGGREGATE,
    CHECKPOINT_TAG,
    JOB_TAG,
    ROLE_TAG,
    TRAIN_RUN_TAG,
    VERSION_TAG,
    Tracker,
)
from psat_core.accounting import plain_parameters, saving, trained_parameters
from psat_core.checkpoint import MemberSpec, ensemble_from_checkpoints, read_spec
from psat_core.ensemble import STRATEGIES


@dataclass(frozen=True)
class AggregateResult:
    """What one aggregation measured and registered.

    ``rows``: ``lowest_entropy``, ``average`` and ``member.<norm>`` -> column -> accuracy;
    ``choice``: strategy -> input (``clean`` or an attack) -> member -> fraction answered.
    """

    run_id: str
    members: dict[str, str]
    rows: dict[str, dict[str, float]]
    choice: dict[str, dict[str, dict[str, float]]]
    parameters: dict[str, float]
    samples: int
    registration: Registration
    report: str

    @property
    def trade_off(self) -> float:
        return self.registration.trade_off


# --------------------------------------------------------------------------- members


def member_checkpoints(
    job: JobConfig, tracker: Tracker, train_run: str | None = None
) -> dict[str, str]:
    """``{norm: checkpoint location}`` from the job's training run (or run ``train_run``).

    Raises:
        ValueError: no such run, or a member of ``job.training.members`` without a final
            checkpoint in it (the training job tags one per member when it finishes).
    """
    if train_run is not None:
        try:
            run = tracker.client.get_run(train_run)
        except MlflowException as err:
            raise ValueError(f"training run {train_run!r} not found in {tracker.uri}") from err
    else:
        run = tracker.find(**{JOB_TAG: job.name, ROLE_TAG: "train"})
        if run is None:
            raise ValueError(
                f"no training run of job {job.name!r} in experiment "
                f"{job.tracking.experiment!r} at {tracker.uri}; run `psat train` first or "
                "give the member checkpoints"
            )
    tags = run.data.tags
    missing = [n for n in job.training.members if f"{CHECKPOINT_TAG}.{n}" not in tags]
    if missing:
        raise ValueError(
            f"training run {run.info.run_id} has no final checkpoint for member(s) "
            f"{', '.join(missing)} (status {run.info.status}); has it finished?"
        )
    storage = job.storage.resolved()
    return {
        n: checkpoint_location(tags[f"{CHECKPOINT_TAG}.{n}"], storage) for n in job.training.members
    }


def check_members(job: JobConfig, dirs: Mapping[str, Path]) -> dict[str, MemberSpec]:
    """Each member's spec, after checking it fits ``job`` and loads into its architecture.

    Raises:
        ValueError: a member trained on another dataset or of another architecture than
            ``job.model``, or a checkpoint whose tensors do not fit
            its architecture (see :func:`psat_core.checkpoint.load_member`).
            Members may differ in embedding dimension (a sweep's best per norm).
        FileNotFoundError: a directory that is not a member checkpoint.
    """
    specs = {name: read_spec(d) for name, d in dirs.items()}
    for name, spec in specs.items():
        # embedding dimensions may differ: a sweep picks each norm's best member
        expected = {"dataset": job.data.dataset, "arch": job.model.arch}
        for field, value in expected.items():
            if getattr(spec, field) != value:
                raise ValueError(
                    f"member {name!r} ({dirs[name]}) has {field}={getattr(spec, field)!r}, "
                    f"but job {job.name!r} has {value!r}"
                )
    ensemble_from_checkpoints(dirs)  # loads every member: a wrong architecture fails here
    return specs


def parameter_counts(specs: Mapping[str, MemberSpec]) -> dict[str, float]:
    """Each member's trainable parameters, their sum (the PSAT model F_H) and the saving
    against the plain ResNet of the same shape (Tables 1 and 2)."""
    counts = {member_key(name): trained_parameters(spec) for name, spec in specs.items()}
    spec = next(iter(specs.values()))
    aggregated = sum(counts.values())
    plain = plain_parameters(spec.arch, spec.num_classes, spec.in_channels)
    counts |= {"aggregated": aggregated, "plain": plain}
    counts["saving"] = saving(aggregated, plain)
    return counts


# --------------------------------------------------------------------------- the job


def flat_metrics(
    evaluation: Evaluation, parameters: Mapping[str, float], strategy: str
) -> dict[str, float]:
    metrics = {
        f"{row}.{column}": value
        for row, values in evaluation.rows.items()
        for column, value in values.items()
    }
    metrics |= {
        f"choice.{s}.{key}.{name}": value
        for s, per_input in evaluation.choice.items()
        for key, per_member in per_input.items()
        for name, value in per_member.items()
    }
    metrics |= {f"parameters.{k}": v for k, v in parameters.items()}
    metrics["trade_off"] = evaluation.rows[strategy]["trade_off"]
    metrics["eval_samples"] = evaluation.samples
    return metrics


def aggregate(
    job: JobConfig,
    members: dict[str, str] | None = None,
    echo: Callable[[str], None] = print,
    *,
    train_run: str | None = None,
    force_champion: bool | None = None,
    partial: bool = False,
) -> AggregateResult:
    """Evaluate, log and register the PSAT ensemble of ``job``.

    Args:
        job: the job; its ``tracking``, ``registry``, ``resources`` and eval attacks apply.
        members: ``{norm: checkpoint directory or URI}``, in ensemble order; default: the
            final checkpoints of the job's training run (or of run ``train_run``).
        echo: progress and the summary, line by line.
        train_run: the MLflow run id of the training job to take the members from.
        force_champion: move ``champion`` to the new version whatever its trade-off
            (default ``job.registry.force_champion``).
        partial: allow members that do not cover ``job.training.members``; such an ensemble
            takes ``champion`` only when forced.

    Raises:
        ValueError: an unknown training run, a member without a checkpoint, a checkpoint of
            the wrong architecture, members that do not fit the job, members missing a norm
            of ``job.training.members`` (unless ``partial``). Nothing is logged or registered
            then.
    """
    check_ray(job, one_model(job, "aggregate"))  # refused before any work
    tracker = None  # given members are checked before the store is opened (SQLite: created)
    if members is None:
        tracker = Tracker(job)
        members = member_checkpoints(job, tracker, train_run)
    if not partial:
        _check_coverage(job, members)
    members = {name: checkpoint_location(str(location), "") for name, location in members.items()}
    force = job.registry.force_champion if force_champion is None else force_champion
    strategy = job.registry.strategy
    with staged(members) as dirs:
        specs = check_members(job, dirs)
        tracker = tracker or Tracker(job)
        parameters = parameter_counts(specs)
        row = one_model(job, "aggregate")
        manifest = prepare_job(job, row, row)
        where = "GPUs" if job.resources.use_gpu else "CPUs"
        echo(
            f"evaluating {', '.join(members)} and the ensemble on {where} (a Ray task per row, "
            f"suite {job.evaluation.suite!r})"
        )
        rows = aggregation_rows(members, STRATEGIES)
        evaluation = Evaluation.of(evaluate_rows(job, rows, members, manifest["eval"], echo))
        params = tracker.params() | {f"member.{n}": loc for n, loc in members.items()}
        run_id = _aggregate_run(job, tracker, params, train_run, echo)
        with tracker.run(run_id):
            tracker.log_params(run_id, params)
            registration, report = _log_and_register(
                job, tracker, run_id, members, dirs, evaluation, parameters, manifest, force
            )
    result = AggregateResult(
        run_id=run_id,
        members=members,
        rows=evaluation.rows,
        choice=evaluation.choice,
        parameters=parameters,
        samples=evaluation.samples,
        registration=registration,
        report=report,
    )
    for line in summary_lines(result, strategy):
        echo(line)
    return result


def _check_coverage(job: JobConfig, members: Mapping[str, str]) -> None:
    """The members cover `training.members`, else a ValueError naming the missing norms."""
    if missing := [norm for norm in job.training.members if norm not in members]:
        raise ValueError(
            f"the members to aggregate ({', '.join(members) or 'none'}) miss training.members "
            f"{', '.join(missing)}; train or sweep those norms, or pass --allow-partial to "
            "register a partial ensemble (it takes champion only with --force-champion)"
        )


def _log_and_register(
    job: JobConfig,
    tracker: Tracker,
    run_id: str,
    members: dict[str, str],
    dirs: dict[str, Path],
    evaluation: Evaluation,
    parameters: dict[str, float],
    manifest: dict,
    force: bool,
) -> tuple[Registration, str]:
    """Metrics, plots and report into the aggregate run, then the registered version (partial
    when `members` miss a norm of the job); returns it and the final report, which names it."""
    strategy = job.registry.strategy
    names = list(members)
    for fig, file in (
        (accuracy_figure(evaluation.rows, names), "accuracy.png"),
        (choice_figure(evaluation.choice, names), "member_choice.png"),
    ):
        tracker.client.log_figure(run_id, fig, f"plots/{file}")
    tracker.client.log_text(
        run_id, markdown_report(job, members, evaluation, parameters), "report.md"
    )
    example = read_arrays(manifest["eval"]).to_float()[:EXAMPLE_SIZE].numpy()
    table = table1_rows(evaluation.rows, names)
    label = f"PSAT {STRATEGY_NAMES[strategy].lower()}"
    evidence = ModelEvidence(
        metrics=flat_metrics(evaluation, parameters, strategy),
        splits=splits(manifest, job.data.dataset, data_uri(job)),
        table=table_columns(table),
        description=(
            f"{table_line(label, table[label])} on {evaluation.samples} {job.data.dataset} "
            f"test images; {_parameters_line(parameters)}"
        ),
    )
    registration = register_ensemble(
        dirs,
        model_name=job.registry.model_name,
        run_id=run_id,
        trade_off=evaluation.rows[strategy]["trade_off"],
        strategy=strategy,
        force_champion=force,
        partial=any(norm not in members for norm in job.training.members),
        input_example=example,
        tags={JOB_TAG: job.name},
        evidence=evidence,
        tracking_uri=tracker.uri,
    )
    report = markdown_report(job, members, evaluation, parameters, registration.lines())
    tracker.client.log_text(run_id, report, "report.md")
    tracker.client.set_tag(run_id, VERSION_TAG, str(registration.version))
    return registration, report


def _aggregate_run(
    job: JobConfig, tracker: Tracker, params: dict[str, str], train_run: str | None, echo
) -> str:
    """A new aggregate run, or the one an interrupted aggregation of the same members left
    RUNNING (the job's lock says its driver is gone): it is resumed, so a version it already
    registered is completed rather than registered again."""
    stale = tracker.client.search_runs(
        [tracker.experiment_id],
        f"tags.`{JOB_TAG}` = '{job.name}' and tags.`{ROLE_TAG}` = 'aggregate' "
        "and attributes.status = 'RUNNING'",
    )
    for run in stale:
        # (MLflow adds the logged model's config to the run's params: compare ours only)
        if all(run.data.params.get(key) == value for key, value in params.items()):
            echo(f"resuming aggregate run {run.info.run_id}, left RUNNING by an interrupted job")
            return run.info.run_id
        tracker.end(run.info.run_id, "KILLED")  # other members or config
    tags = {JOB_TAG: job.name, ROLE_TAG: AGGREGATE}
    if train_run is not None:
        tags[TRAIN_RUN_TAG] = train_run
    run = tracker.client.create_run(
        tracker.experiment_id, run_name=f"{job.name}-aggregate", tags=tags
    )
    return run.info.run_id


def table1_rows(rows: Mapping[str, dict], names: list[str]) -> dict[str, dict[str, float]]:
    """Table 1's rows by label: ``H_<norm>`` per member, ``PSAT <strategy>`` per strategy."""
    labels = {f"H_{n}": rows[member_key(n)] for n in names}
    return labels | {f"PSAT {STRATEGY_NAMES[s].lower()}": rows[s] for s in STRATEGIES}


def _parameters_line(p: Mapping[str, float]) -> str:
    return (
        f"parameters: PSAT {int(p['aggregated']):,} vs plain {int(p['plain']):,} "
        f"(saving {percent(p['saving'])})"
    )


def summary_lines(result: AggregateResult, strategy: str) -> list[str]:
    lines = table_lines(table1_rows(result.rows, list(result.members)))
    lines.append(_parameters_line(result.parameters))
    lines += result.registration.lines()
    lines.append(f"MLflow run {result.run_id} ({strategy} is the registered strategy)")
    return lines
