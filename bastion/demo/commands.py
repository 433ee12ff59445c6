"""`bastion demo`: register the subcommand; the handler imports the demo only when it runs."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser("demo", help="watch Bastion govern a small fleet of simulated agents, offline",
                       description="Start local fake upstreams (tickets, an LLM API, payments, an MCP server) and "
                       "bastion serve with rules/examples/demo.yaml on free ports of 127.0.0.1, then let simulated "
                       "agents show task locks, denials, an approval, LLM and MCP calls, a milestone gate and a "
                       "budget. Prints the dashboard URL and a login token; runs until Ctrl-C.")
    p.add_argument("--duration", metavar="SECONDS", type=_seconds,
                   help="stop after this many seconds once everything is up (default: run until Ctrl-C)")
    p.add_argument("--home", metavar="DIR",
                   help="where the demo's store, audit log and CA go (default: a fresh temporary directory; "
                   "BASTION_HOME is ignored so a demo never writes into a real home)")
    p.add_argument("--auto-approve", action="store_true",
                   help="a scripted approver approves held calls through the admin API, instead of waiting for "
                   "you on the dashboard")
    p.set_defaults(handler=cmd_demo)


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {value!r}") from None
    if not seconds > 0:
        raise argparse.ArgumentTypeError("must be greater than 0")
    return seconds


def cmd_demo(args: argparse.Namespace) -> int:
    from bastion.demo.runner import DemoError, demo_home, run_demo

    home = demo_home(args.home)
    try:
        return asyncio.run(run_demo(home, args.duration, args.auto_approve))
    except DemoError as e:
        print(f"bastion demo: {e}", file=sys.stderr)
        return 1
