"""The `bastion` command. Parses flags and hands off to the package that owns each subcommand.

Each area registers its own subcommands (`register(subparsers)` in its `commands` module) and imports heavy
dependencies (mitmproxy, database drivers) only inside the handler, so `bastion check` starts fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Order here is the order in `bastion --help`.
COMMAND_MODULES = (
    "bastion.policy.commands",
    "bastion.policy.replay_commands",
    "bastion.proxy.commands",
    "bastion.coord.commands",
    "bastion.coord.approval_commands",
    "bastion.coord.fleet_commands",
    "bastion.audit.commands",
    "bastion.dashboard.standalone",
    "bastion.demo.commands",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bastion",
        description="Sidecar proxy that enforces identity-bound rules, task locks, approvals and audit on "
        "AI-agent traffic.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `bastion audit tail | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
