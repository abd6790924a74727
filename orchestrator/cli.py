"""The `psat` command line."""

from __future__ import annotations

import argparse
import sys

from psat_core.accounting import parameter_report


def _params(args: argparse.Namespace) -> int:
    report = parameter_report(
        args.arch, args.num_classes, args.embedding_dim, args.members, args.in_channels
    )
    print("\n".join(report.lines()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="psat", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

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
    try:
        return args.run(args)
    except ValueError as err:
        print(f"psat {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
