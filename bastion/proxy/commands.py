"""`bastion serve`, `bastion run` and `bastion ca`. Heavy imports (mitmproxy, aiohttp) happen in the handlers."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from bastion.config import ConfigError, add_home_args, add_rules_arg, resolve_home


def register(sub: Any) -> None:
    p = sub.add_parser("serve", help="run the proxy and its admin listener",
                       description="Run the Bastion proxy (agents' HTTP_PROXY) and its admin listener "
                       "(health, metrics, API). Reloads the rules when they change, on SIGHUP and on "
                       "POST /api/rules/reload.")
    add_rules_arg(p)
    p.add_argument("--listen", metavar="HOST:PORT", help="proxy address (BASTION_LISTEN, default 127.0.0.1:8080)")
    p.add_argument("--admin", metavar="HOST:PORT",
                   help="admin listener address (BASTION_ADMIN, default 127.0.0.1:8081)")
    add_home_args(p)
    p.add_argument("--agent", metavar="NAME",
                   help="pin every connection to this agent: a sidecar per agent, no credentials needed "
                   "(BASTION_AGENT)")
    p.add_argument("--upstream-ca", metavar="FILE",
                   help="a CA (PEM) that upstream certificates may chain to, in addition to the system roots "
                   "(BASTION_UPSTREAM_CA)")
    p.add_argument("--header-timeout", metavar="SECONDS",
                   help="close a client connection that has not sent a complete request head this long after "
                   "it opened or its last exchange ended (BASTION_HEADER_TIMEOUT, default 60)")
    p.add_argument("--idle-timeout", metavar="SECONDS",
                   help="close a connection, tunnels and streams included, after this long without a byte in "
                   "either direction (BASTION_IDLE_TIMEOUT, default 300)")
    p.add_argument("--response-facts", metavar="on|off",
                   help="read LLM and MCP answers as they pass, for token usage, tool calls and outcomes in the "
                   "audit and the metrics (BASTION_RESPONSE_FACTS, default on); rules on `llm` and `mcp` work "
                   "either way")
    p.add_argument("--otlp", metavar="URL",
                   help="send one OpenTelemetry span per exchange to this OTLP/HTTP collector, like "
                   "http://127.0.0.1:4318 (/v1/traces is added); default: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, "
                   "else OTEL_EXPORTER_OTLP_ENDPOINT, else no tracing")
    p.set_defaults(handler=cmd_serve)

    p = sub.add_parser("run", help="run a command as an agent, with its traffic going through Bastion",
                       description="Run COMMAND with HTTP(S)_PROXY pointing at Bastion (with the agent's "
                       "credentials) and the CA variables set so it trusts Bastion's interception.")
    p.add_argument("--agent", metavar="NAME", help="agent name (BASTION_AGENT)")
    p.add_argument("--token", metavar="TOKEN",
                   help="the agent's token (BASTION_AGENT_TOKEN); omit for a sidecar pinned with --agent")
    p.add_argument("--proxy", metavar="URL",
                   help="Bastion's proxy URL (default http:// + BASTION_LISTEN or 127.0.0.1:8080)")
    add_home_args(p)
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARG...]")
    p.set_defaults(handler=cmd_run)

    p = sub.add_parser("ca", help="print the path of Bastion's CA certificate",
                       description="Print the path of the CA certificate agents must trust (the certificate "
                       "only, never the key), creating the CA in --home if there is none yet.")
    p.add_argument("--bundle", action="store_true",
                   help="write <home>/ca-bundle.pem (system roots + Bastion CA) and print its path")
    add_home_args(p)
    p.set_defaults(handler=cmd_ca)


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    from bastion.logs import configure_logging
    from bastion.proxy.server import serve
    from bastion.proxy.settings import serve_settings

    try:
        settings = serve_settings(args)
    except ConfigError as e:
        print(f"bastion serve: error: {e}", file=sys.stderr)
        return 2
    configure_logging()
    return asyncio.run(serve(settings))


def cmd_run(args: argparse.Namespace) -> int:
    from bastion.proxy.run import default_admin, run_agent
    from bastion.proxy.settings import proxy_url_from_env

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    agent = args.agent or os.environ.get("BASTION_AGENT")
    if not agent:
        print("bastion run: error: --agent NAME is required (or set BASTION_AGENT)", file=sys.stderr)
        return 2
    token = args.token or os.environ.get("BASTION_AGENT_TOKEN") or None
    try:
        proxy = args.proxy or proxy_url_from_env()
        home = resolve_home(args.home)
    except ConfigError as e:
        print(f"bastion run: error: {e}", file=sys.stderr)
        return 2
    return run_agent(home=home, agent=agent, token=token, proxy=proxy, admin=default_admin(), command=command)


def cmd_ca(args: argparse.Namespace) -> int:
    from bastion.proxy.ca import ensure_ca, write_client_bundle

    home = resolve_home(args.home)
    try:
        created = not home.ca_cert.exists()
        cert = ensure_ca(home)
        if created:
            print(f"bastion ca: created a new CA in {home.path}", file=sys.stderr)
        print(write_client_bundle(home, cert) if args.bundle else cert)
    except (OSError, ConfigError) as e:
        print(f"bastion ca: {e}", file=sys.stderr)
        return 1
    return 0
