"""The aggregation job: evaluate the PSAT ensemble, log it to MLflow, register it.

    member checkpoints (the training run's tags, or given) -> load and check them
    -> one Ray task per row (a GPU one when resources.use_gpu): every member alone and the
       ensemble under both strategies, clean and under every attack of `final_attacks`: ours,
       the third-party cross-check and, on the ensemble, the adaptive ones (Tables 3 and 4)
    -> one MLflow run, role "aggregate": metrics, report.md, plots, the pyfunc model
    -> a new registry version; alias `candidate`, and `champion` when its trade-off is better

Metric names: ``<row>.<column>`` with rows ``lowest_entropy``, ``average`` and
``member.<norm>``, columns ``clean, linf, l2, l1, max, avg, trade_off`` (fractions);
``choice.<strategy>.<input>.<member>``: the fraction of images that member answered, on clean
inputs and under each attack; ``parameters.*``; ``trade_off``: the registered strategy's.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs
import ray
import torch
from matplotlib.figure import Figure
from mlflow.exceptions import MlflowException

from orchestrator.config import JobConfig
from orchestrator.registry import (
    EXAMPLE_SIZE,
    Registration,
    build_ensemble,
    register_ensemble,
)
from orchestrator.shards import materialize, read_arrays
from orchestrator.tracking import CHECKPOINT_TAG, JOB_TAG, ROLE_TAG, Tracker
from orchestrator.training import connect_ray, data_uri
from psat_core.checkpoint import MemberSpec, read_spec
from psat_core.ensemble import STRATEGIES, PSATEnsemble
from psat_core.metrics import TABLE1_KEYS, evaluate_per_sample, summarize
from psat_core.models import count_parameters, create_model
from psat_core.protocol import AUTOATTACK, attack_suite

TRAIN_RUN_TAG = "psat.train_run"
VERSION_TAG = "psat.registered_version"
COLUMNS = (*TABLE1_KEYS, "trade_off")
HEADERS = {
    "clean": "Clean",
    "linf": "ℓ∞",
    "l2": "ℓ2",
    "l1": "ℓ1",
    "max": "Max",
    "avg": "Avg",
    "trade_off": "Trade-off",
}
STRATEGY_NAMES = {"lowest_entropy": "Lowest entropy", "average": "Average"}


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
    return {n: _location(tags[f"{CHECKPOINT_TAG}.{n}"], storage) for n in job.training.members}


def _location(path: str, storage: str) -> str:
    """A checkpoint path as a URI or an absolute local path (Ray tasks run elsewhere).

    Ray reports checkpoint paths without the storage's scheme (``bucket/...`` for ``s3://``).
    """
    if "://" in path:
        return path
    if "://" in storage and not Path(path).exists():
        return f"{storage.split('://', 1)[0]}://{path}"
    return str(Path(path).expanduser().resolve())


@contextmanager
def staged(members: Mapping[str, str]) -> Iterator[dict[str, Path]]:
    """Local directories of the member checkpoints: local paths as they are, URIs (``s3://``,
    ``gs://``, ...) copied into a temporary directory that lives as long as the block."""
    with tempfile.TemporaryDirectory(prefix="psat-members-") as tmp:
        local = {}
        for name, location in members.items():
            if "://" not in location or location.startswith("file://"):
                local[name] = Path(location.removeprefix("file://"))
                continue
            fs, path = pafs.FileSystem.from_uri(location)
            if fs.get_file_info(path).type != pafs.FileType.Directory:
                raise FileNotFoundError(f"member {name!r}: no checkpoint directory at {location}")
            local[name] = Path(tmp) / name
            pafs.copy_files(path, str(local[name]), source_filesystem=fs)
        yield local


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
    build_ensemble(dirs)  # loads every member: a wrong architecture fails here
    return specs


def parameter_counts(specs: Mapping[str, MemberSpec]) -> dict[str, float]:
    """Each member's trainable parameters, their sum (the PSAT model F_H) and the saving
    against the plain ResNet of the same shape (Tables 1 and 2)."""
    counts = {f"member.{name}": count_parameters(spec.build()) for name, spec in specs.items()}
    spec = next(iter(specs.values()))
    plain = create_model(spec.arch, num_classes=spec.num_classes, in_channels=spec.in_channels)
    aggregated = sum(counts.values())
    counts |= {"aggregated": aggregated, "plain": count_parameters(plain)}
    counts["saving"] = 1.0 - aggregated / counts["plain"]
    return counts


# --------------------------------------------------------------------------- evaluation


def evaluation_rows(members: Mapping[str, str]) -> dict[str, tuple[dict[str, str], str | None]]:
    """Tables 3 and 4's rows: ``member.<name>`` (one checkpoint, no strategy) and, per strategy,
    the ensemble of all members; each as ``(checkpoints, strategy)``."""
    rows = {f"member.{name}": ({name: location}, None) for name, location in members.items()}
    return rows | {strategy: (dict(members), strategy) for strategy in STRATEGIES}


def evaluate_row(
    job_dict: dict, checkpoints: dict[str, str], strategy: str | None, eval_uri: str
) -> dict:
    """One row on the eval split, where it is called (:data:`evaluate_row_task` is its Ray
    task): a single model (``strategy`` None) or the ensemble of ``checkpoints``. Every attack of
    `final_attacks`, seeded with ``data.seed``. Returns plain data: ``row`` (accuracies),
    ``parameters``, ``choice`` (ensembles: which member answered how often, per input),
    ``samples`` and ``device``."""
    job = JobConfig.model_validate(job_dict)
    device = eval_device(job)
    with staged(checkpoints) as dirs:
        ensemble = build_ensemble(dirs).to(device)
    data = read_arrays(eval_uri)
    images, labels = data.to_float(), data.labels
    result = {
        "parameters": sum(count_parameters(member) for member in ensemble.members),
        "samples": len(labels),
        "device": str(device),
    }
    if strategy is None:
        torch.manual_seed(job.data.seed)
        attacks = final_attacks(job, ensemble=False)
        row = summarize(evaluate_per_sample(ensemble.members[0], images, labels, attacks))
        return result | {"row": row, "choice": {}}
    ensemble.strategy = strategy
    row, choice = evaluate_ensemble(job, ensemble, images, labels)
    return result | {"row": row, "choice": choice}


evaluate_row_task = ray.remote(evaluate_row)


def collect(results: Mapping[str, dict]) -> dict:
    """Rows evaluated by `evaluate_row`, keyed as `evaluation_rows`, into one evaluation:
    ``rows``, ``choice`` (per strategy), ``samples`` and ``device``."""
    first = next(iter(results.values()))
    return {
        "rows": {key: result["row"] for key, result in results.items()},
        "choice": {key: result["choice"] for key, result in results.items() if result["choice"]},
        "samples": first["samples"],
        "device": first["device"],
    }


def evaluate_checkpoints(job_dict: dict, members: dict[str, str], eval_uri: str) -> dict:
    """Tables 3 and 4 on the eval split, in this process: every member alone, then the
    ensemble per strategy (see `collect`)."""
    rows = evaluation_rows(members)
    return collect(
        {key: evaluate_row(job_dict, ckpts, s, eval_uri) for key, (ckpts, s) in rows.items()}
    )


def eval_device(job: JobConfig) -> torch.device:
    """Where an evaluation task runs: its GPU with ``resources.use_gpu``, else the CPU with
    ``resources.torch_threads`` threads."""
    torch.set_num_threads(job.resources.torch_threads)
    use_cuda = job.resources.use_gpu and torch.cuda.is_available()
    return torch.device("cuda" if use_cuda else "cpu")


def final_attacks(job: JobConfig, ensemble: bool) -> dict:
    """The attacks of a final evaluation, by ``"<norm>/<attack>"``: `evaluation.suite`
    (psat_core.protocol) at the `attacks.eval` radii and budgets. Every norm's accuracy is the
    per-example worst over its attacks."""
    evaluation = job.evaluation
    return attack_suite(
        evaluation.suite,
        job.attack_configs("eval"),
        ensemble=ensemble,
        apgd_steps=evaluation.apgd_steps,
        gate_temperature=evaluation.gate_temperature,
        seed=job.data.seed,
    )


def evaluate_ensemble(
    job: JobConfig, ensemble: PSATEnsemble, images: torch.Tensor, labels: torch.Tensor
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """The ensemble's row under its current strategy, and which member answered how often,
    on clean inputs and under each attack (seeded with ``data.seed``)."""
    torch.manual_seed(job.data.seed)
    result = evaluate_per_sample(
        ensemble,
        images,
        labels,
        final_attacks(job, ensemble=True),
        probe=lambda x: ensemble.forward_with_choice(x)[1],
    )
    choice = {
        key: {name: (answered == i).float().mean().item() for i, name in enumerate(ensemble.names)}
        for key, answered in result.probes.items()
    }
    return summarize(result), choice


# --------------------------------------------------------------------------- report and plots


def percent(value: float) -> str:
    return f"{100 * value:.2f}%"


def _accuracy_row(label: str, row: Mapping[str, float]) -> list[str]:
    return [label, *(percent(row[c]) for c in COLUMNS)]


def attack_label(key: str) -> str:
    """``"clean"`` -> ``"Clean"``, ``"linf/torchattacks.APGD"`` -> ``"ℓ∞ torchattacks.APGD"``."""
    norm, _, variant = key.partition("/")
    return f"{HEADERS.get(norm, norm)} {variant}".strip()


def attack_breakdown(rows: Mapping[str, Mapping[str, float]]) -> list[str]:
    """A Markdown table: each model's accuracy under every single attack it faced (``-``: not
    run on it, e.g. the adaptive attacks on a single model), by norm."""
    names = sorted({k for row in rows.values() for k in row if "/" in k})
    cells = [
        [label, *(percent(row[n]) if n in row else "-" for n in names)]
        for label, row in rows.items()
    ]
    return markdown_table(["Model", *(attack_label(n) for n in names)], cells)


def attacks_described(job: JobConfig) -> list[str]:
    """One Markdown bullet per attack family of a final evaluation (see `final_attacks`)."""
    lines = [
        f"- ours, {HEADERS[n]}: PGD, ε={cfg.eps:g}, {cfg.steps} steps of {cfg.step_size:g}, "
        f"{cfg.restarts} restart(s)"
        for n, cfg in job.attack_configs("eval").items()
    ]
    if job.evaluation.suite == "strong":
        restarts = ", ".join(f"{HEADERS[n]} {r}/{t}" for n, (r, t) in AUTOATTACK.items())
        lines += [
            f"- APGD-CE and APGD-T (DLR, targeted), {job.evaluation.apgd_steps} steps, "
            f"AutoAttack's restarts/targets ({restarts}); ℓ1: ℓ1-APGD with the 3ε-2ε-ε schedule",
            "- cross-check, same ε and steps: torchattacks PGD / PGDL2 and APGD (ℓ∞, ℓ2), "
            "foolbox SparseL1DescentAttack (ℓ1)",
            "- on ensembles: `gate` = PGD through a smooth lowest-entropy gate "
            f"(τ={job.evaluation.gate_temperature:g}); `confident` = each member made confidently "
            "wrong, keeping what fools the gate; `transfer` = every member's own PGD, APGD-CE and "
            "APGD-T examples, scored by the ensemble",
        ]
    lines.append(
        "- a point counts as robust for a norm only if it withstands every attack of that norm; "
        "Max counts every attack"
    )
    return lines


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def markdown_report(
    job: JobConfig,
    members: Mapping[str, str],
    evaluation: dict,
    parameters: Mapping[str, float],
    registration: Registration | None = None,
) -> str:
    """The human-readable summary: Tables 3 and 4, member choice, parameters, registry."""
    rows, choice = evaluation["rows"], evaluation["choice"]
    names = list(members)
    header = ["Model", *(HEADERS[c] for c in COLUMNS)]
    strategy = job.registry.strategy
    lines = [
        f"# PSAT aggregation of job `{job.name}`",
        "",
        f"{evaluation['samples']} evaluation images of {job.data.dataset} "
        f"(device {evaluation['device']}). Attacks (robust points only, as in AutoAttack):",
        *attacks_described(job),
        "",
        "Members:",
        *(f"- `{n}`: {members[n]}" for n in names),
        "",
        "## Members and the PSAT ensemble (Table 3)",
        "",
        *markdown_table(
            header,
            [_accuracy_row(f"H_{n}", rows[f"member.{n}"]) for n in names]
            + [_accuracy_row(f"PSAT ({STRATEGY_NAMES[strategy]})", rows[strategy])],
        ),
        "",
        "## Inference strategy (Table 4)",
        "",
        *markdown_table(
            ["Strategy", *(HEADERS[c] for c in COLUMNS)],
            [_accuracy_row(STRATEGY_NAMES[s], rows[s]) for s in STRATEGIES],
        ),
        "",
        "## Every attack",
        "",
        *attack_breakdown(
            {f"H_{n}": rows[f"member.{n}"] for n in names}
            | {f"PSAT ({STRATEGY_NAMES[s]})": rows[s] for s in STRATEGIES}
        ),
        "",
        "## Which member answers",
        "",
        "Fraction of the images each member answered (under an attack: on its adversarial "
        "examples for the points it attacked, the clean image otherwise).",
    ]
    for s in STRATEGIES:
        inputs = list(choice[s])
        lines += [
            "",
            f"### {STRATEGY_NAMES[s]}",
            "",
            *markdown_table(
                ["Input", *names],
                [[attack_label(k), *(percent(choice[s][k][n]) for n in names)] for k in inputs],
            ),
        ]
    spec_arch = job.model.arch
    lines += [
        "",
        "## Parameters",
        "",
        *markdown_table(
            ["Model", "Parameters"],
            [[f"H_{n}", f"{int(parameters[f'member.{n}']):,}"] for n in names]
            + [
                [f"PSAT ({len(names)} members)", f"{int(parameters['aggregated']):,}"],
                [f"plain {spec_arch}", f"{int(parameters['plain']):,}"],
                ["saving", percent(parameters["saving"])],
            ],
        ),
    ]
    if registration is not None:
        lines += ["", "## Registry", "", *(f"- {line}" for line in registration.lines())]
    return "\n".join(lines) + "\n"


def accuracy_figure(rows: Mapping[str, Mapping[str, float]], names: list[str]) -> Figure:
    """Grouped bars: per column, each member alone and the ensemble under both strategies."""
    series = [(f"H_{n}", rows[f"member.{n}"]) for n in names]
    series += [(f"PSAT {STRATEGY_NAMES[s].lower()}", rows[s]) for s in STRATEGIES]
    return accuracy_bars(series, "Accuracy per attack: members vs the PSAT ensemble")


def accuracy_bars(series: list[tuple[str, Mapping[str, float]]], title: str) -> Figure:
    """One group of bars per Table 1 column, one bar per (label, row) of ``series``."""
    fig = Figure(figsize=(10, 4.5), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / len(series)
    for i, (label, row) in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(COLUMNS))]
        ax.bar(xs, [100 * row[c] for c in COLUMNS], width, label=label)
    ax.set_xticks(range(len(COLUMNS)), [HEADERS[c] for c in COLUMNS])
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.legend(ncols=min(len(series), 5), loc="upper center", fontsize="small")
    return fig


def choice_figure(
    choice: Mapping[str, Mapping[str, Mapping[str, float]]], names: list[str]
) -> Figure:
    """Per strategy, stacked bars: how often each member answers, clean and under each attack."""
    fig = Figure(figsize=(5 * len(choice), 4), layout="constrained")
    axes = fig.subplots(1, len(choice), squeeze=False)[0]
    for ax, (strategy, per_input) in zip(axes, choice.items(), strict=True):
        inputs = list(per_input)
        bottom = [0.0] * len(inputs)
        for name in names:
            heights = [100 * per_input[k][name] for k in inputs]
            ax.bar(range(len(inputs)), heights, bottom=bottom, label=f"H_{name}")
            bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
        ax.set_xticks(range(len(inputs)), [attack_label(k) for k in inputs], rotation=90)
        ax.set_ylim(0, 100)
        ax.set_ylabel("images answered (%)")
        ax.set_title(f"Which member answers ({STRATEGY_NAMES[strategy].lower()})")
        ax.legend(fontsize="small")
    return fig


# --------------------------------------------------------------------------- the job


def flat_metrics(evaluation: dict, parameters: Mapping[str, float], strategy: str) -> dict:
    metrics = {
        f"{row}.{column}": value
        for row, values in evaluation["rows"].items()
        for column, value in values.items()
    }
    metrics |= {
        f"choice.{s}.{key}.{name}": value
        for s, per_input in evaluation["choice"].items()
        for key, per_member in per_input.items()
        for name, value in per_member.items()
    }
    metrics |= {f"parameters.{k}": v for k, v in parameters.items()}
    metrics["trade_off"] = evaluation["rows"][strategy]["trade_off"]
    metrics["eval_samples"] = evaluation["samples"]
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
    tracker = Tracker(job)
    if members is None:
        members = member_checkpoints(job, tracker, train_run)
    missing = [norm for norm in job.training.members if norm not in members]
    if missing and not partial:
        raise ValueError(
            f"the members to aggregate ({', '.join(members) or 'none'}) miss training.members "
            f"{', '.join(missing)}; train or sweep those norms, or pass --allow-partial to "
            "register a partial ensemble (it takes champion only with --force-champion)"
        )
    members = {name: _location(str(location), "") for name, location in members.items()}
    force = job.registry.force_champion if force_champion is None else force_champion
    strategy = job.registry.strategy
    with staged(members) as dirs:
        specs = check_members(job, dirs)
        parameters = parameter_counts(specs)
        connect_ray(job, job.resources.cpus_per_worker, job.resources.cpus_per_worker)
        manifest = materialize(job, data_uri(job), job.resources.workers_per_member)
        task = evaluate_row_task.options(
            num_cpus=job.resources.cpus_per_worker, num_gpus=1 if job.resources.use_gpu else 0
        )
        where = "GPUs" if job.resources.use_gpu else "CPUs"
        echo(f"evaluating {', '.join(members)} and the ensemble on {where} (a Ray task per row)")
        job_dict, eval_uri = job.model_dump(), manifest["eval"]
        refs = {
            key: task.remote(job_dict, checkpoints, row_strategy, eval_uri)
            for key, (checkpoints, row_strategy) in evaluation_rows(members).items()
        }
        evaluation = collect({key: ray.get(ref) for key, ref in refs.items()})
        params = tracker.params() | {f"member.{n}": loc for n, loc in members.items()}
        run_id = _aggregate_run(job, tracker, params, train_run, echo)
        with tracker.ending(run_id):
            tracker.log_params(run_id, params)
            tracker.log_metrics(run_id, flat_metrics(evaluation, parameters, strategy), step=0)
            names = list(members)
            for fig, file in (
                (accuracy_figure(evaluation["rows"], names), "accuracy.png"),
                (choice_figure(evaluation["choice"], names), "member_choice.png"),
            ):
                tracker.client.log_figure(run_id, fig, f"plots/{file}")
            report = markdown_report(job, members, evaluation, parameters)
            tracker.client.log_text(run_id, report, "report.md")
            example = read_arrays(manifest["eval"]).to_float()[:EXAMPLE_SIZE].numpy()
            registration = register_ensemble(
                dirs,
                model_name=job.registry.model_name,
                run_id=run_id,
                trade_off=evaluation["rows"][strategy]["trade_off"],
                strategy=strategy,
                force_champion=force,
                partial=bool(missing),
                input_example=example,
                tags={JOB_TAG: job.name},
                tracking_uri=tracker.uri,
            )
            report = markdown_report(job, members, evaluation, parameters, registration)
            tracker.client.log_text(run_id, report, "report.md")
            tracker.client.set_tag(run_id, VERSION_TAG, str(registration.version))
    result = AggregateResult(
        run_id=run_id,
        members=members,
        rows=evaluation["rows"],
        choice=evaluation["choice"],
        parameters=parameters,
        samples=evaluation["samples"],
        registration=registration,
        report=report,
    )
    for line in summary_lines(result, strategy):
        echo(line)
    return result


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
        tracker.client.set_terminated(run.info.run_id, "KILLED")  # other members or config
    tags = {JOB_TAG: job.name, ROLE_TAG: "aggregate"}
    if train_run is not None:
        tags[TRAIN_RUN_TAG] = train_run
    run = tracker.client.create_run(
        tracker.experiment_id, run_name=f"{job.name}-aggregate", tags=tags
    )
    return run.info.run_id


def evaluate_registered(
    job: JobConfig, uri: str, echo: Callable[[str], None] = print
) -> dict[str, dict[str, float]]:
    """Table-1 rows of a registered ensemble (both strategies) on the job's eval split."""
    from orchestrator.registry import load_ensemble

    ensemble = load_ensemble(uri, tracking_uri=job.tracking.resolved_uri())
    connect_ray(job, job.resources.cpus_per_worker, job.resources.cpus_per_worker)
    manifest = materialize(job, data_uri(job), job.resources.workers_per_member)
    data = read_arrays(manifest["eval"])
    rows = {}
    for strategy in STRATEGIES:
        ensemble.strategy = strategy
        rows[strategy] = evaluate_ensemble(job, ensemble, data.to_float(), data.labels)[0]
    echo(f"{uri} on {len(data)} {job.data.dataset} eval images")
    echo(f"{'':<24}" + "".join(f"{HEADERS[c]:>11}" for c in COLUMNS))
    for strategy, row in rows.items():
        label = f"PSAT {STRATEGY_NAMES[strategy].lower()}"
        echo(_row_line(label, row))
    return rows


def _row_line(label: str, row: Mapping[str, float]) -> str:
    return f"{label:<24}" + "".join(f"{percent(row[c]):>11}" for c in COLUMNS)


def summary_lines(result: AggregateResult, strategy: str) -> list[str]:
    header = f"{'':<24}" + "".join(f"{HEADERS[c]:>11}" for c in COLUMNS)
    lines = [header]
    labels = [(f"H_{n}", f"member.{n}") for n in result.members]
    labels += [(f"PSAT {STRATEGY_NAMES[s].lower()}", s) for s in STRATEGIES]
    for label, key in labels:
        row = result.rows[key]
        lines.append(_row_line(label, row))
    p = result.parameters
    lines.append(
        f"parameters: PSAT {int(p['aggregated']):,} vs plain {int(p['plain']):,} "
        f"(saving {percent(p['saving'])})"
    )
    lines += result.registration.lines()
    lines.append(f"MLflow run {result.run_id} ({strategy} is the registered strategy)")
    return lines
