"""`bastion run --agent NAME -- COMMAND`: run an agent with its traffic pointed at Bastion and trusting its CA.

Nothing in the agent changes: every common client reads these variables.

- `HTTP_PROXY`, `HTTPS_PROXY` and their lower-case twins (curl reads only `http_proxy` in lower case) =
  the proxy URL with the agent's credentials (`http://NAME:TOKEN@host:port`, percent-encoded). Without a token
  the URL carries no credentials, which is right for a sidecar pinned with `--agent`.
- `NO_PROXY`/`no_proxy` = the admin listener only (the agent may call its health or API directly; through the
  proxy it would be refused anyway). Any other bypass would be a hole, so inherited values are replaced.
- `SSL_CERT_FILE`, `REQUESTS_CA_BUNDLE`, `CURL_CA_BUNDLE`, `GIT_SSL_CAINFO` = system roots + Bastion CA (these
  *replace* the default roots, so the bundle keeps the public ones); `NODE_EXTRA_CA_CERTS` = Bastion's CA alone
  (Node appends it); `NODE_USE_ENV_PROXY=1` makes Node (24.5+, 22.21+) honour the proxy variables.
- `GIT_HTTP_PROXY_AUTHMETHOD=basic`: git (libcurl) otherwise sends each CONNECT without credentials first and
  only retries after Bastion's 407, one wasted round trip per connection.

Node older than that ignores `NODE_USE_ENV_PROXY` and silently connects directly, around Bastion. When the
command is Node (`node`, `npm`, `npx`, or a script whose `#!` line runs node), `node --version` is asked while
the environment is prepared, and an outdated Node gets a warning on stderr before the command starts.

The command replaces this process (`exec`), so signals reach it directly and its exit status is ours.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

from bastion.config import DEFAULT_ADMIN, ConfigError, Home, parse_hostport
from bastion.proxy.ca import CAMissing, bundle_is_current, existing_ca, write_client_bundle

EXIT_NOT_FOUND = 127
NODE_NAMES = frozenset({"node", "nodejs", "npm", "npx"})
NODE_INTERPRETERS = frozenset({"node", "nodejs"})
NODE_PROBE_TIMEOUT = 2.0  # seconds `node --version` may take before the command starts without the check
SHEBANG_BYTES = 256
_NODE_VERSION = re.compile(r"v(\d+)\.(\d+)\.(\d+)")


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
    """`base` with every variable above set. Inherited values are replaced, never kept: a stale CA file or a
    `NODE_USE_ENV_PROXY=0` from the caller's shell would break trust or bypass Bastion."""
    env = dict(base)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        env[name] = proxy_url
    for name in ("ALL_PROXY", "all_proxy"):
        env.pop(name, None)
    env["NO_PROXY"] = env["no_proxy"] = no_proxy
    for name in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "GIT_SSL_CAINFO"):
        env[name] = bundle
    env["GIT_HTTP_PROXY_AUTHMETHOD"] = "basic"
    env["NODE_EXTRA_CA_CERTS"] = ca_cert
    env["NODE_USE_ENV_PROXY"] = "1"
    return env


# --- Node ------------------------------------------------------------------------------------------------------

def shebang_interpreter(program: Path) -> str | None:
    """The program a `#!` script runs (`#!/usr/bin/node`, `#!/usr/bin/env node`, `#!/usr/bin/env -S node
    --flag`): an absolute path, or a bare name to look up on PATH. None for anything else. Reads at most one
    short line of a regular file, so a binary or a FIFO costs nothing."""
    try:
        if not stat.S_ISREG(program.stat().st_mode):
            return None
        with program.open("rb") as f:
            head = f.read(SHEBANG_BYTES)
    except OSError:
        return None
    if not head.startswith(b"#!"):
        return None
    words = head[2:].split(b"\n", 1)[0].decode("utf-8", "replace").split()
    if not words:
        return None
    if Path(words[0]).name != "env":
        return words[0]
    # env's own options (-S, -i, -u NAME) and NAME=VALUE assignments come before the command.
    rest = iter(words[1:])
    for word in rest:
        if word in ("-u", "--unset", "-C", "--chdir"):
            next(rest, None)
        elif not word.startswith("-") and "=" not in word:
            return word
    return None


def node_binary(command: str, program: str, path: str | None) -> str | None:
    """The node executable that will run `command` (resolved as `program`), or None when it is not Node."""
    if Path(command).name in NODE_INTERPRETERS or Path(program).name in NODE_INTERPRETERS:
        return program
    interpreter = shebang_interpreter(Path(program))
    if interpreter is None or Path(interpreter).name not in NODE_INTERPRETERS:
        if Path(command).name not in NODE_NAMES:
            return None
        interpreter = "node"  # npm/npx through a wrapper we cannot read: the node on PATH runs them
    return interpreter if os.path.isabs(interpreter) else shutil.which(interpreter, path=path)


def node_proxy_warning(version_output: str) -> str | None:
    """What to tell the user about this `node --version` output, or None when Node honours the proxy.

    `NODE_USE_ENV_PROXY` arrived for fetch() in 24.0 and for the http/https modules in 24.5; 22.21 got both.
    Any other Node connects directly, around Bastion, without a word."""
    m = _NODE_VERSION.search(version_output)
    if m is None:
        return (f"cannot tell the Node version from {version_output.strip()[:60]!r}: Node before 24.5 (22.21 on "
                "the 22 line) ignores the proxy variables and connects around Bastion")
    major, minor = int(m.group(1)), int(m.group(2))
    shown = m.group(0)
    if major >= 25 or (major == 24 and minor >= 5) or (major == 22 and minor >= 21):
        return None
    if major == 24:
        return (f"Node {shown} sends only fetch() through Bastion: its http/https modules (and libraries built "
                "on them) connect directly, unchecked and unaudited. Use Node 24.5 or later.")
    return (f"Node {shown} ignores NODE_USE_ENV_PROXY: its fetch() and http/https requests connect directly, "
            "around Bastion (unchecked, unaudited, or failing where only the proxy may reach the network). "
            "Use Node 24.5+ or 22.21+; npm's own registry traffic does honour the proxy.")


class NodeVersionProbe:
    """`node --version`, started while the CA bundle and environment are prepared, so the check adds little to
    the start of the command; bounded by NODE_PROBE_TIMEOUT, after which the command starts anyway."""

    def __init__(self, node: str, env: Mapping[str, str]) -> None:
        self.node = node
        try:
            self.proc: subprocess.Popen[bytes] | None = subprocess.Popen(
                [node, "--version"], env=dict(env), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL)
        except OSError:
            self.proc = None

    def warning(self, timeout: float = NODE_PROBE_TIMEOUT) -> str | None:
        if self.proc is None:
            return None  # no node to run: exec fails with its own message
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.close()
            return (f"`{self.node} --version` did not answer within {timeout:g}s, so the Node version is unknown: "
                    "Node before 24.5 (22.21 on the 22 line) ignores the proxy variables")
        return node_proxy_warning(out[:200].decode("ascii", "replace"))

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def start_node_probe(command: Sequence[str], env: Mapping[str, str]) -> NodeVersionProbe | None:
    program = shutil.which(command[0], path=env.get("PATH"))
    node = node_binary(command[0], program, env.get("PATH")) if program else None
    return NodeVersionProbe(node, env) if node else None


# --- run -------------------------------------------------------------------------------------------------------

def _prepare(home: Home, agent: str, token: str | None, proxy: str, admin: str) -> dict[str, str] | int:
    """The agent's environment, or the exit code after printing why it cannot be made."""
    try:
        ca_cert = existing_ca(home)
        bundle = home.ca_bundle
        if not bundle_is_current(bundle, ca_cert):
            bundle = write_client_bundle(home, ca_cert)
        return agent_environment(os.environ, proxy_url=proxy_url_with_credentials(proxy, agent, token),
                                 bundle=str(bundle), ca_cert=str(ca_cert), no_proxy=admin_no_proxy(admin))
    except (CAMissing, ConfigError) as e:
        print(f"bastion run: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    except OSError as e:
        print(f"bastion run: cannot write the CA bundle: {e}", file=sys.stderr)
        return 1


def run_agent(*, home: Home, agent: str, token: str | None, proxy: str, admin: str,
              command: Sequence[str]) -> int:
    """Prepare the environment and exec `command`. Returns only on failure (with the exit code to use)."""
    if not command:
        print("bastion run: no command given: bastion run --agent NAME -- COMMAND [ARG...]", file=sys.stderr)
        return 2
    probe = start_node_probe(command, os.environ)
    try:
        env = _prepare(home, agent, token, proxy, admin)
        if isinstance(env, int):
            return env
        program = shutil.which(command[0], path=env.get("PATH"))
        if program is None:
            print(f"bastion run: command not found: {command[0]}", file=sys.stderr)
            return EXIT_NOT_FOUND
        warning = probe.warning() if probe else None
    finally:
        if probe:
            probe.close()
    if warning:
        print(f"bastion run: warning: {warning}", file=sys.stderr)
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
