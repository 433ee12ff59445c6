"""`bastion run --agent NAME -- COMMAND`: run an agent with its traffic pointed at Bastion and trusting its CA.

Nothing in the agent changes: every common client reads these variables.

- `HTTP_PROXY`, `HTTPS_PROXY` and their lower-case twins (curl reads only `http_proxy` in lower case) =
  the proxy URL with the agent's credentials (`http://NAME:TOKEN@host:port`, percent-encoded). Without a token
  the URL carries no credentials, which is right for a sidecar pinned with `--agent`.
- `NO_PROXY`/`no_proxy` = the admin listener only (the agent may call its health or API directly; through the
  proxy it would be refused anyway). Any other bypass would be a hole, so inherited values are replaced.
- `SSL_CERT_FILE`, `REQUESTS_CA_BUNDLE`, `CURL_CA_BUNDLE` = system roots + Bastion CA (these *replace* the
  default roots, so the bundle keeps the public ones); `NODE_EXTRA_CA_CERTS` = Bastion's CA alone (Node
  appends it); `NODE_USE_ENV_PROXY=1` makes Node 24's fetch honour the proxy variables.

The command replaces this process (`exec`), so signals reach it directly and its exit status is ours.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from urllib.parse import quote, urlsplit, urlunsplit

from bastion.config import DEFAULT_ADMIN, ConfigError, Home, parse_hostport
from bastion.proxy.ca import CAMissing, bundle_is_current, existing_ca, write_client_bundle

EXIT_NOT_FOUND = 127


def proxy_url_with_credentials(proxy: str, agent: str, token: str | None) -> str:
    """The proxy URL the agent uses; credentials percent-encoded so any ':' '@' '/' in a token survive."""
    parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"--proxy: expected http://HOST:PORT, got {proxy!r}")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"--proxy: bad port in {proxy!r}") from None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    netloc = f"{host}:{port}" if port else host
    if token:
        netloc = f"{quote(agent, safe='')}:{quote(token, safe='')}@{netloc}"
    return urlunsplit((parts.scheme, netloc, "", "", ""))


def admin_no_proxy(admin: str) -> str:
    """NO_PROXY naming only the admin listener (host:port, so other local services still go through)."""
    host, port = parse_hostport(admin, "BASTION_ADMIN")
    hosts = ["127.0.0.1", "localhost"] if host in ("0.0.0.0", "::", "127.0.0.1", "localhost") else [host]
    if host in ("::", "::1"):
        hosts.append("[::1]")
    return ",".join(f"{h}:{port}" for h in hosts)


def agent_environment(base: Mapping[str, str], *, proxy_url: str, bundle: str, ca_cert: str,
                      no_proxy: str) -> dict[str, str]:
    env = dict(base)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        env[name] = proxy_url
    for name in ("ALL_PROXY", "all_proxy"):
        env.pop(name, None)
    env["NO_PROXY"] = env["no_proxy"] = no_proxy
    for name in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        env[name] = bundle
    env["NODE_EXTRA_CA_CERTS"] = ca_cert
    env["NODE_USE_ENV_PROXY"] = "1"
    return env


def run_agent(*, home: Home, agent: str, token: str | None, proxy: str, admin: str,
              command: Sequence[str]) -> int:
    """Prepare the environment and exec `command`. Returns only on failure (with the exit code to use)."""
    if not command:
        print("bastion run: no command given: bastion run --agent NAME -- COMMAND [ARG...]", file=sys.stderr)
        return 2
    try:
        ca_cert = existing_ca(home)
        bundle = home.ca_bundle
        if not bundle_is_current(bundle, ca_cert):
            bundle = write_client_bundle(home, ca_cert)
        env = agent_environment(os.environ, proxy_url=proxy_url_with_credentials(proxy, agent, token),
                                bundle=str(bundle), ca_cert=str(ca_cert), no_proxy=admin_no_proxy(admin))
    except (CAMissing, ConfigError) as e:
        print(f"bastion run: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    except OSError as e:
        print(f"bastion run: cannot write the CA bundle: {e}", file=sys.stderr)
        return 1
    program = shutil.which(command[0], path=env.get("PATH"))
    if program is None:
        print(f"bastion run: command not found: {command[0]}", file=sys.stderr)
        return EXIT_NOT_FOUND
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(program, list(command), env)  # noqa: S606 (running the agent's command is the point)
    except OSError as e:
        print(f"bastion run: cannot run {command[0]}: {e.strerror or e}", file=sys.stderr)
        return 126
    return 1  # not reached: execve replaced the process


def default_admin() -> str:
    return os.environ.get("BASTION_ADMIN") or DEFAULT_ADMIN
