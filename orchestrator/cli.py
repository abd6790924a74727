"""The `psat` command line: thin wrappers over the orchestrator's jobs.

User errors (bad config, missing data, unreachable cluster) end with one line on stderr and a
non-zero exit code; details go to the log.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import sys
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator.config import parse_overrides, read_config_file
from orchestrator.runtime.signals import Terminated, exit_on_sigterm

if TYPE_CHECKING:
    from orchestrator.config import JobConfig

log = logging.getLogger("psat")
QUIET_LIBRARIES = ("ray", "mlflow", "matplotlib")
# Ray's note that a local Ray enabled token authentication by default: shown with -v
RAY_AUTH_NOTE = "ray._private.authentication.authentication_token_setup"
# MLflow's HTTP defaults retry for minutes (7 retries, 120 s timeouts); psat's are bounded
HTTP_BOUNDS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


def _is_user_error(err: Exception) -> bool:
    """Bad input, missing data, unreachable services: one line, exit 2 (else a traceback)."""
    if isinstance(err, ValueError | FileNotFoundError | ConnectionError):  # ConfigError, data
        return True
    return _is_mlflow_error(err)


def _is_mlflow_error(err: Exception) -> bool:
    exceptions = sys.modules.get("mlflow.exceptions")  # none was raised if MLflow never loaded
    return exceptions is not None and isinstance(err, exceptions.MlflowException)


REFUSED = {"UNAUTHENTICATED": "HTTP 401", "PERMISSION_DENIED": "HTTP 403"}  # MLflow's codes


def _error_line(args: argparse.Namespace, err: Exception) -> str:
    """The one line for a user error; a tracking server that refused the credentials (an
    auth proxy's 401 or 403) says so, not its response body."""
    if _is_mlflow_error(err) and err.error_code in REFUSED:
        job = getattr(args, "job", None)
        uri = job.tracking.resolved_uri() if job else _tracking_uri(args)
        return (
            f"the MLflow tracking server {uri} refused this request's credentials "
            f"({REFUSED[err.error_code]}); set MLFLOW_TRACKING_TOKEN, or MLFLOW_TRACKING_USERNAME "
            "and MLFLOW_TRACKING_PASSWORD, to credentials it accepts"
        )
    return str(err)


def _job_config(args: argparse.Namespace) -> JobConfig:
    from orchestrator.config import check_cluster_locations, in_ray_job, parse_config

    job = parse_config(args.config_data, args.config, parse_overrides(args.set))
    if in_ray_job():  # Ray's working dir is temporary: nothing may be written relative to it
        check_cluster_locations(job, args.command)
    return job


def _train(args: argparse.Namespace, job: JobConfig) -> int:
    from orchestrator.train_members import train_members

    results = train_members(job)
    for norm, result in results.items():
        print(f"{norm}: checkpoint {result['checkpoint']}")
    return 0


def _aggregate(args: argparse.Namespace, job: JobConfig) -> int:
    from orchestrator.aggregate import aggregate
    from orchestrator.sweep import best_checkpoints

    members = best_checkpoints(job) if args.from_sweep else None
    force = True if args.force_champion else None
    aggregate(
        job, members, train_run=args.train_run, force_champion=force, partial=args.allow_partial
    )
    return 0


def _run(args: argparse.Namespace, job: JobConfig) -> int:
    """End to end: data -> members trained concurrently -> aggregate -> register."""
    from orchestrator.aggregate import aggregate
    from orchestrator.train_members import train_members

    results = train_members(job)
    aggregate(job, {norm: results[norm]["checkpoint"] for norm in job.training.members})
    return 0


def _reproduce(args: argparse.Namespace, job: JobConfig) -> int:
    from orchestrator.reproduce import reproduce

    reproduce(job)
    return 0


def _evaluate(args: argparse.Namespace, job: JobConfig) -> int:
    from orchestrator.evaluate import evaluate_registered

    evaluate_registered(job, args.model)
    return 0


def _sweep(args: argparse.Namespace, job: JobConfig) -> int:
    from orchestrator.sweep import run_sweep

    run_sweep(job)
    return 0


def _run_job(args: argparse.Namespace) -> int:
    """Hold the job's name (writing jobs) and run the job (its config validated by `main`)."""
    from orchestrator.runtime.locking import job_lock

    command = JOBS[args.command]
    with job_lock(args.job, args.command) if command.writes else nullcontext():
        return command.run(args, args.job)


def _tracking_uri(args: argparse.Namespace) -> str:
    from orchestrator.config import TrackingConfig

    return getattr(args, "tracking_uri", None) or TrackingConfig().resolved_uri()


def _pull(args: argparse.Namespace) -> int:
    from orchestrator.registry.pull import pull

    pull(args.uri, args.dst, tracking_uri=_tracking_uri(args))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from orchestrator.registry.pull import pull
    from orchestrator.registry.serve import listening, serve

    sock = listening(args.host, args.port)  # a port in use is refused before the download
    pulled = pull(args.uri, args.dst, tracking_uri=_tracking_uri(args))
    max_body = int(args.max_body_mb * (1 << 20))
    serve(pulled, sock, args.verbose, max_body, args.max_rows)
    return 0


def _submit(args: argparse.Namespace) -> int:
    from orchestrator.submit import submit

    return submit(
        args.job,
        JOBS[args.job].module,
        args.config,
        args.address,
        args.set,
        job_arguments(args, JOBS[args.job].options),
        token=args.token,
        env_names=args.env,
        follow=not args.no_follow,
        verbose=args.verbose,
    )


def _params(args: argparse.Namespace) -> int:
    from psat_core.accounting import parameter_report

    report = parameter_report(
        args.arch, args.num_classes, args.embedding_dim, args.members, args.in_channels
    )
    print("\n".join(report.lines()))
    return 0


def _aggregate_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--from-sweep", action="store_true", help="take each norm's best trial of the job's sweep"
    )
    parser.add_argument("--train-run", help="MLflow run id of the training job to aggregate")
    parser.add_argument(
        "--force-champion", action="store_true", help="move `champion` whatever the trade-off"
    )
    parser.add_argument(
        "--allow-partial",
        action="store_true",
        help="register an ensemble of fewer members than training.members (never champion "
        "without --force-champion)",
    )


def _evaluate_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="models:/NAME@ALIAS or models:/NAME/N")


@dataclass(frozen=True)
class JobCommand:
    run: Callable[[argparse.Namespace, JobConfig], int]
    help: str
    module: str | None = None  # what Ray Jobs run: `python -m MODULE`; None: not submittable
    options: Callable[[argparse.ArgumentParser], None] | None = None  # the job's own flags
    writes: bool = True  # holds the job's name while it runs (runtime.locking)


JOBS = {
    "train": JobCommand(
        _train, "train the l_inf, l_2 and l_1 members concurrently on Ray", "jobs.train_members"
    ),
    "sweep": JobCommand(
        _sweep, "Ray Tune sweep over embedding dimension and PGD settings", "jobs.sweep"
    ),
    "run": JobCommand(
        _run, "end to end: train the members, aggregate, register in MLflow", "jobs.run"
    ),
    "reproduce": JobCommand(
        _reproduce,
        "the paper's Tables 1, 3, 4, 6 and Figure 2: baselines and PSAT trained on Ray, evaluated",
        "jobs.reproduce",
    ),
    "aggregate": JobCommand(
        _aggregate,
        "evaluate the ensemble, report, register it in MLflow",
        "jobs.aggregate",
        _aggregate_options,
    ),
    "evaluate": JobCommand(
        _evaluate,
        "Table-1 metrics of a registered ensemble on the job data",
        options=_evaluate_options,
        writes=False,
    ),
}


def _add_job_arguments(parser: argparse.ArgumentParser, options: Callable | None) -> None:
    parser.add_argument("--config", required=True, help="job YAML file (see jobs/configs/)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override one config field, e.g. --set training.epochs=2 (repeatable)",
    )
    if options is not None:
        options(parser)


def job_arguments(args: argparse.Namespace, options: Callable | None) -> list[str]:
    """The job's own options in `args` (not --config/--set) as command-line words again."""
    if options is None:
        return []
    parser = argparse.ArgumentParser(add_help=False)
    options(parser)
    words: list[str] = []
    for action in parser._actions:
        value, flag = getattr(args, action.dest), action.option_strings[0]
        if isinstance(action, argparse._StoreTrueAction):
            words += [flag] if value else []
        elif value is not None:
            words += [flag, str(value)]
    return words


def _add_submit(commands) -> None:
    submit = commands.add_parser(
        "submit",
        help="submit a job to a Ray cluster (Ray Jobs API), follow its logs, exit with its status",
        description="Run a psat job on a Ray cluster with the same options as locally. psat's "
        "code and the config travel with the job; MLFLOW_TRACKING_URI is forwarded.",
    )
    jobs = submit.add_subparsers(dest="job", required=True, metavar="JOB")
    for name, command in JOBS.items():
        if command.module is None:
            continue
        parser = jobs.add_parser(name, help=command.help, description=command.help)
        _add_job_arguments(parser, command.options)
        parser.add_argument(
            "--address", required=True, help="the head's dashboard, http://HOST:8265"
        )
        parser.add_argument(
            "--token", help="Ray auth token (default: $RAY_AUTH_TOKEN, ~/.ray/auth_token)"
        )
        parser.add_argument(
            "--env",
            action="append",
            default=[],
            metavar="NAME[=VALUE]",
            help="also send this environment variable to the job (repeatable)",
        )
        parser.add_argument("--no-follow", action="store_true", help="print the job id and return")
    submit.set_defaults(run=_submit)


def _positive(kind: type) -> Callable[[str], float]:
    def parse(text: str):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its error
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="psat", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in JOBS.items():
        job = commands.add_parser(name, help=command.help, description=command.help)
        _add_job_arguments(job, command.options)
        job.set_defaults(run=_run_job)
    pull = commands.add_parser("pull", help="download and verify a registered ensemble")
    pull.add_argument("uri", help="models:/NAME@champion, models:/NAME/3, ...")
    pull.add_argument("--dst", help="download folder (default ~/.psat/models/NAME/vN)")
    pull.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI or ./mlflow.db")
    pull.set_defaults(run=_pull)
    serve = commands.add_parser(
        "serve", help="serve a registered ensemble after verifying it (MLflow's scoring API)"
    )
    serve.add_argument("uri", help="models:/NAME@champion, models:/NAME/3, ...")
    serve.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1")
    serve.add_argument("--port", type=int, default=5001, help="default 5001")
    serve.add_argument("--dst", help="download folder (default ~/.psat/models/NAME/vN)")
    serve.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI or ./mlflow.db")
    serve.add_argument(
        "--max-body-mb",
        type=_positive(float),
        default=8,  # a few thousand 32x32x3 images as JSON
        help="larger requests get 413 (default 8)",
    )
    serve.add_argument(
        "--max-rows", type=_positive(int), default=1024, help="more rows get 400 (default 1024)"
    )
    serve.set_defaults(run=_serve)
    _add_submit(commands)

    params = commands.add_parser(
        "params", help="parameters of one member, the PSAT ensemble and the plain ResNet"
    )
    params.add_argument("--arch", default="resnet50", help="resnet10/18/34/50 (default resnet50)")
    params.add_argument("--num-classes", type=int, default=10)
    params.add_argument("--embedding-dim", type=int, default=128)
    params.add_argument("--members", type=int, default=3)
    params.add_argument("--in-channels", type=int, default=3)
    params.set_defaults(run=_params)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        exit_on_sigterm()  # from the start: a SIGTERM while a check waits says so too
        if getattr(args, "config", None) is not None:  # a broken or hostile file is refused
            args.config_data = read_config_file(args.config)  # before torch, Ray, MLflow load
        _check_before_loading(args)
        _bound_libraries(args.verbose)
        return args.run(args)
    except KeyboardInterrupt:
        return _interrupted(args, argv, signal.SIGINT)
    except Terminated:
        return _interrupted(args, argv, signal.SIGTERM)
    except Exception as err:
        if not _is_user_error(err):
            raise
        log.debug("psat %s failed", args.command, exc_info=True)
        print(f"psat {args.command}: error: {_error_line(args, err)}", file=sys.stderr)
        return 2


def _interrupted(args: argparse.Namespace, argv: list[str] | None, signum: int) -> int:
    """One line for Ctrl-C or SIGTERM: what stopped, and for a job that its runs are KILLED
    and how to resume it; the shells' exit status (130, 143)."""
    line = f"psat {args.command}: interrupted by {signal.Signals(signum).name}"
    if args.command in JOBS:
        command = shlex.join(["psat", *(sys.argv[1:] if argv is None else argv)])
        line += f"; its MLflow runs are marked KILLED; resume it with: {command}"
    print(line, file=sys.stderr)
    return 128 + signum


def _check_before_loading(args: argparse.Namespace) -> None:
    """What can be refused before torch, Ray and MLflow load (seconds), is: a job's config
    values and the services it names; the tracking server a pull or serve reads from."""
    from orchestrator.runtime.capacity import check_ray, one_model
    from orchestrator.runtime.reach import check_services, check_store

    if args.command in JOBS:
        args.job = _job_config(args)
        check_services(args.job)
        check_ray(args.job, one_model(args.job, args.command))
        data = args.job.data  # its files: present, official or warned about, safe to read
        args.job.dataset.check_files(Path(data.data_dir).expanduser(), data.download)
    elif args.command in ("pull", "serve"):
        check_store(_tracking_uri(args))  # `pull` checks it again where it connects


def _bound_libraries(verbose: bool) -> None:
    """Bounded MLflow HTTP retries and (unless -v) only psat on the terminal: MLflow's
    progress bars and "View run" links, Ray's INFO chatter go."""
    for name, value in HTTP_BOUNDS.items():  # a user's own settings win
        os.environ.setdefault(name, value)
    if not verbose:
        for name in QUIET_LIBRARIES:
            logging.getLogger(name).setLevel(logging.WARNING)
        logging.getLogger(RAY_AUTH_NOTE).setLevel(logging.ERROR)
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # MLflow sets its level at import
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def job_main(command: str) -> int:
    """Entry point of `python -m jobs.<name> [-v] --config ...` (what `ray job submit` runs)."""
    args = sys.argv[1:]
    verbose = [a for a in args if a in ("-v", "--verbose")]
    return main([*verbose[:1], command, *(a for a in args if a not in verbose)])


if __name__ == "__main__":
    sys.exit(main())
