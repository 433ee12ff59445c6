"""The deployment files run and agree with the code: Dockerfile, deploy/compose.yaml, deploy/kubernetes/,
deploy/grafana/bastion.json and deploy/prometheus/alerts.yaml.

There is no Docker here, so the image is checked by replaying its steps: the COPY lines of Dockerfile decide
which files are copied into a scratch root, the build stage's RUN lines run there (absolute paths moved under
the scratch root) with a fresh virtualenv and `pip install .` from that copy, and the runtime stage's ENV,
ENTRYPOINT/CMD and HEALTHCHECK start `bastion serve` and probe it as the image would. That test installs every
dependency into a clean virtualenv: under a minute with a warm pip cache, more when pip downloads.

Compose and Kubernetes manifests are parsed with PyYAML and checked for images, files, ports, commands (parsed
by Bastion's own argparse parser), BASTION_* variables, secrets and volumes. Every metric name in the Grafana
dashboard and the alert rules is checked against a live `/metrics` scrape; the alert rules also go through
`promtool check rules` when promtool is installed (Debian: `apt-get install prometheus`), and a structural
check either way.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families
from services import require_command
from support.bastion import BastionServer
from support.ports import free_port

from bastion import metrics

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
KUBERNETES = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
GRAFANA = DEPLOY / "grafana" / "bastion.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yaml"

# Images that deploy/ may use besides the one Dockerfile builds (repository `bastion`): the databases and a
# stand-in for the agent. Pinned to a major version, never `latest`.
WELL_KNOWN_IMAGES = {"redis", "postgres", "python"}
SERVICE_PORTS = {"redis": 6379, "postgres": 5432, "postgresql": 5432}


# -- the Dockerfile ----------------------------------------------------------------------------------------------


def _instructions(path: Path = ROOT / "Dockerfile") -> list[tuple[int, str, str]]:
    """(stage index, INSTRUCTION, arguments) for each instruction, continuation lines joined, comments dropped."""
    out: list[tuple[int, str, str]] = []
    stage = -1
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full, pending = pending + line, ""
        if not full.strip():
            continue
        word, _, rest = full.strip().partition(" ")
        word = word.upper()
        if word == "FROM":
            stage += 1
        out.append((stage, word, rest.strip()))
    return out


def _copy_sources() -> list[str]:
    """Build-context paths the Dockerfile COPYs (COPY --from=stage copies between stages, not from the context)."""
    sources: list[str] = []
    for _, word, args in _instructions():
        if word in ("COPY", "ADD") and not args.startswith("--from"):
            parts = [p for p in shlex.split(args) if not p.startswith("--")]
            sources += parts[:-1]
    return sources


def _env(stage: int) -> dict[str, str]:
    """The ENV of one stage, in order, `$VAR` expanded as Docker does (from earlier ENV or the base image)."""
    env: dict[str, str] = {}
    for st, word, args in _instructions():
        if st == stage and word == "ENV":
            for item in shlex.split(args):
                key, _, value = item.partition("=")
                env[key] = re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m[1], f"${m[1]}"), value)
    return env


def _stages() -> int:
    return 1 + max(st for st, _, _ in _instructions())


def _exec_form(args: str) -> list[str]:
    assert args.startswith("["), f"use the exec form (a JSON array), not a shell string: {args}"
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def _image_listen_ports() -> tuple[int, int]:
    env = _env(_stages() - 1)
    return int(env["BASTION_LISTEN"].rsplit(":", 1)[1]), int(env["BASTION_ADMIN"].rsplit(":", 1)[1])


def test_dockerfile_shape() -> None:
    """Multi-stage on python:3.13-slim, non-root, home in a volume, both listeners on 0.0.0.0, labels,
    an exec-form health check on /healthz of the admin port."""
    inst = _instructions()
    froms = [args for _, word, args in inst if word == "FROM"]
    assert len(froms) >= 2, "a build stage and a runtime stage"
    assert all(f.split()[0] == "python:3.13-slim" for f in froms), froms
    last = _stages() - 1
    final = [(word, args) for st, word, args in inst if st == last]
    words = [w for w, _ in final]
    assert "LABEL" in words and "HEALTHCHECK" in words and "VOLUME" in words
    user = [a for w, a in final if w == "USER"]
    assert user and user[-1] not in ("root", "0"), user
    assert words.index("USER") < words.index("ENTRYPOINT")
    volumes = [v for w, a in final if w == "VOLUME" for v in _exec_form(a)]
    env = _env(last)
    assert env["BASTION_HOME"] in volumes, (env["BASTION_HOME"], volumes)
    assert env["BASTION_LISTEN"].startswith("0.0.0.0:") and env["BASTION_ADMIN"].startswith("0.0.0.0:")
    exposed = {int(p) for w, a in final if w == "EXPOSE" for p in a.split()}
    assert set(_image_listen_ports()) <= exposed
    check = next(a for w, a in final if w == "HEALTHCHECK")
    cmd = _exec_form(check.split("CMD", 1)[1].strip())
    assert f"127.0.0.1:{_image_listen_ports()[1]}/healthz" in " ".join(cmd), cmd
    # Only the runtime stage's files end up in the image: the source tree stays in the build stage.
    copies = [a for w, a in final if w == "COPY"]
    assert all(a.startswith("--from=") or a.split()[0] == "rules" for a in copies), copies


def test_dockerignore_keeps_tests_and_local_state_out() -> None:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
                if line.strip() and not line.startswith("#")]
    for needed in ("tests", "bench", ".venv", ".git"):
        assert needed in patterns, f".dockerignore does not exclude {needed}"
    for source in _copy_sources():
        assert (ROOT / source).exists(), f"Dockerfile copies {source}, which does not exist"
        assert source.rstrip("/") not in patterns, f".dockerignore excludes {source}, which Dockerfile copies"


def _scratch_env(extra: dict[str, str]) -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items()
            if not k.startswith(("BASTION_", "PYTHON", "VIRTUAL_ENV", "PIP_NO_CACHE"))
            and k.upper() not in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")}
    keep.update(extra)
    return keep


def _under(root: Path, text: str) -> str:
    """`text` with its absolute paths (/opt/..., /var/...) moved under `root`."""
    return re.sub(r"(?<![\w./-])/(?=[A-Za-z])(?!dev/)", str(root) + "/", text)


def _init_scripts() -> set[str]:
    """The `sh -c` scripts deploy/ runs in the image before the sidecar starts (compose one-shot services,
    Kubernetes init containers): they put the CA's public files into the volume the agent mounts."""
    scripts = {svc["entrypoint"][2] for svc in _compose()["services"].values()
               if svc.get("entrypoint", [])[:2] == ["sh", "-c"]}
    for doc in _manifests():
        if doc["kind"] == "Deployment":
            pod = doc["spec"]["template"]["spec"]
            scripts |= {c["command"][2] for c in pod.get("initContainers", []) + pod["containers"]
                        if c.get("command", [])[:2] == ["sh", "-c"]}
    return scripts


def test_image_install_and_healthcheck(tmp_path: Path) -> None:
    """Replay the image: COPY the context files into a scratch root, run the build stage's RUN lines there
    (a clean virtualenv, `pip install .`), then start ENTRYPOINT + CMD with the runtime ENV and run the
    HEALTHCHECK command against it."""
    root = tmp_path / "root"
    inst = _instructions()
    last = _stages() - 1
    workdir = {st: "/" for st in range(last + 1)}
    for st, word, args in inst:
        if word == "WORKDIR":
            workdir[st] = args
        elif word == "COPY" and not args.startswith("--from"):
            *sources, dest = [p for p in shlex.split(args) if not p.startswith("--")]
            target = root / (dest if dest.startswith("/") else f"{workdir[st]}/{dest}").lstrip("/")
            for source in sources:
                src = ROOT / source
                into = target / src.name if dest.endswith("/") or len(sources) > 1 else target
                into.parent.mkdir(parents=True, exist_ok=True)
                if src.is_dir():
                    shutil.copytree(src, into, symlinks=True,  # as COPY does: a link stays a link
                                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
                else:
                    shutil.copy2(src, into)
    assert (root / "src" / "pyproject.toml").exists() or any(root.rglob("pyproject.toml"))

    # `python` in RUN is the image's Python 3.13: here, the interpreter running the tests (a venv made from
    # inside a venv is based on the base interpreter, so the new one is clean).
    bindir = tmp_path / "python-bin"
    bindir.mkdir()
    (bindir / "python").symlink_to(sys.executable)
    build_env = {k: v for k, v in _env(0).items() if k != "PIP_NO_CACHE_DIR"}  # reuse the pip cache here
    build_env["PATH"] = f"{bindir}{os.pathsep}{os.environ.get('PATH', os.defpath)}"
    ran = 0
    for st, word, args in inst:
        if st != last and word == "RUN":
            cwd = root / workdir[st].lstrip("/")
            proc = subprocess.run(["sh", "-c", _under(root, args)], cwd=cwd, env=_scratch_env(build_env),
                                  capture_output=True, text=True, timeout=900)
            assert proc.returncode == 0, f"RUN {args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
            ran += 1
    assert ran, "the build stage has no RUN"

    # The runtime stage: its ENV, paths under the scratch root, free ports on loopback, HOME in a temp dir.
    env = {k: _under(root, v) if k == "PATH" or v.startswith("/") else v for k, v in _env(last).items()}
    env["PATH"] = env["PATH"].replace("$PATH", os.defpath)
    home = Path(env["BASTION_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    rules = env["BASTION_RULES"].split(":")
    assert all(Path(r).exists() for r in rules), f"BASTION_RULES names files the image does not have: {rules}"
    proxy_port, admin_port = free_port(), free_port()
    env["BASTION_LISTEN"], env["BASTION_ADMIN"] = f"127.0.0.1:{proxy_port}", f"127.0.0.1:{admin_port}"
    env["HOME"] = str(tmp_path / "user-home")
    run_env = {"PATH": env["PATH"], "LANG": "C.UTF-8", **env}

    # deploy/'s init step, as the sidecar's user runs it before the sidecar (the runtime stage's RUN that makes
    # the shared directory needs root: made here).
    share = root / "var/lib/bastion-ca"
    share.mkdir(parents=True)
    scripts = _init_scripts()
    assert len(scripts) == 1, f"compose and Kubernetes should run the same init step: {scripts}"
    for script in scripts:
        init = subprocess.run(["sh", "-c", _under(root, script)], env=run_env, capture_output=True, text=True,
                              timeout=60)
        assert init.returncode == 0, f"{script}:\n{init.stdout}{init.stderr}"
    assert sorted(p.name for p in share.iterdir()) == ["ca-bundle.pem", "mitmproxy-ca-cert.pem"]
    assert all(p.stat().st_mode & 0o044 == 0o044 for p in share.iterdir()), "the agent's user must read them"

    bastion_bin = shutil.which("bastion", path=run_env["PATH"])
    assert bastion_bin and str(root) in bastion_bin, f"`bastion` is not on the image's PATH: {run_env['PATH']}"
    help_run = subprocess.run([bastion_bin, "--help"], env=run_env, capture_output=True, text=True, timeout=60)
    assert help_run.returncode == 0 and "serve" in help_run.stdout, help_run.stderr
    demo_policy = subprocess.run(  # `bastion demo` runs from the image too: its policy is in the wheel
        [str(Path(bastion_bin).with_name("python")), "-c",
         "from bastion.demo.runner import POLICY; print(POLICY.is_file() and not POLICY.is_symlink(), POLICY)"],
        env=run_env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert demo_policy.stdout.startswith(f"True {root}"), demo_policy.stdout + demo_policy.stderr

    entry = next(_exec_form(a) for st, w, a in inst if st == last and w == "ENTRYPOINT")
    cmd = next(_exec_form(a) for st, w, a in inst if st == last and w == "CMD")
    check = next(a for st, w, a in inst if st == last and w == "HEALTHCHECK")
    check_cmd = [c.replace(f":{_image_listen_ports()[1]}/", f":{admin_port}/")
                 for c in _exec_form(check.split("CMD", 1)[1].strip())]
    check_cmd[0] = shutil.which(check_cmd[0], path=run_env["PATH"]) or check_cmd[0]
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen([shutil.which(entry[0], path=run_env["PATH"]) or entry[0], *entry[1:], *cmd],
                            cwd=home, env=run_env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, "bastion serve exited:\n" + (tmp_path / "serve.log").read_text()
            probe = subprocess.run(check_cmd, env=run_env, capture_output=True, text=True, timeout=10)
            if probe.returncode == 0:
                break
            assert time.monotonic() < deadline, ("the HEALTHCHECK never passed:\n" + probe.stderr[-2000:]
                                                 + (tmp_path / "serve.log").read_text()[-4000:])
            time.sleep(0.25)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"http://127.0.0.1:{admin_port}/healthz", timeout=5) as resp:
            assert resp.status == 200
        assert (home / "mitmproxy-ca-cert.pem").exists() and (home / "ca-bundle.pem").exists()
        assert (home / "mitmproxy-ca.pem").stat().st_mode & 0o077 == 0
        # The sidecar kept the CA the init step made: the agent's copy is the one it presents.
        assert (share / "mitmproxy-ca-cert.pem").read_bytes() == (home / "mitmproxy-ca-cert.pem").read_bytes()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
            raise
        log.close()
    assert code == 0, (tmp_path / "serve.log").read_text()[-4000:]


# -- what the CLI knows ------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    from bastion.cli import build_parser

    return build_parser()


def _subparsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield sub
                yield from _subparsers(sub)


def _known_variables() -> set[str]:
    """Every BASTION_* variable named in the help of a `bastion` command's options."""
    found: set[str] = set()
    for sub in _subparsers(_parser()):
        for action in sub._actions:
            found.update(re.findall(r"BASTION_[A-Z_]+", action.help or ""))
    assert {"BASTION_STORE", "BASTION_AUDIT", "BASTION_AGENT", "BASTION_LISTEN", "BASTION_ADMIN"} <= found, found
    return found


def _parse_bastion(argv: list[str]) -> argparse.Namespace:
    """`argv` (after `bastion`) parsed by the real parser; a bad flag fails the test with argparse's message."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return _parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"`bastion {' '.join(argv)}` does not parse:\n{err.getvalue()}")


def _bastion_argvs(command: list[str], entrypoint: list[str] | None) -> list[list[str]]:
    """The `bastion` invocations of a container: its args under the image's ENTRYPOINT, or each
    `bastion ...` segment of an `sh -c` entrypoint."""
    if entrypoint and entrypoint[:2] == ["sh", "-c"]:
        out = []
        for segment in re.split(r"&&|;|\|\|", entrypoint[2]):
            words = [w for w in shlex.split(segment) if not w.startswith(">")]
            if words and words[0] == "bastion":
                out.append(words[1:])
        return out
    return [command]


def _option(ns: argparse.Namespace, env: dict[str, str], name: str, var: str, default: str | None = None) -> Any:
    value = getattr(ns, name, None)
    if value:
        return value
    return env.get(var, _env(_stages() - 1).get(var, default))


def _check_policy(path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "bastion", "check", str(path)], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert proc.returncode == 0, f"`bastion check {path}` failed:\n{proc.stdout}{proc.stderr}"


def _image_ok(image: str, where: str) -> bool:
    """True for the image built here, checks a well-known one is pinned; fails on anything else."""
    name, _, tag = image.rpartition(":") if ":" in image.rsplit("/", 1)[-1] else (image, "", "")
    repo = name.rsplit("/", 1)[-1]
    if repo == "bastion":
        return True
    assert repo in WELL_KNOWN_IMAGES, f"{where}: image {image} is neither built here nor a well-known one"
    assert tag and tag != "latest", f"{where}: pin {image} to a version"
    return False


# -- compose -----------------------------------------------------------------------------------------------------


def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


def _as_env(value: Any) -> dict[str, str]:
    if isinstance(value, list):
        return dict(item.split("=", 1) for item in value)
    return {k: str(v) for k, v in (value or {}).items()}


def _binds(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> host path (resolved) of a service's bind mounts."""
    out = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            out[target] = str((COMPOSE.parent / source).resolve())
    return out


def _host_file(container_path: str, binds: dict[str, str]) -> Path | None:
    for target, source in binds.items():
        if container_path == target or container_path.startswith(target.rstrip("/") + "/"):
            return Path(source + container_path[len(target):])
    return None


def test_compose_references_only_what_exists() -> None:
    compose = _compose()
    services: dict[str, dict[str, Any]] = compose["services"]
    networks, volumes = set(compose.get("networks", {})), set(compose.get("volumes", {}))
    known_vars = _known_variables()
    listening: dict[str, set[int]] = {}
    proxies: dict[str, tuple[int, str | None]] = {}  # sidecar -> (proxy port, pinned agent)
    stores: set[tuple[str, str]] = set()
    dashboards = 0
    for name, svc in services.items():
        where = f"compose service {name}"
        built_here = _image_ok(svc["image"], where)
        if built_here:
            build = svc.get("build")
            assert build, f"{where}: the bastion image needs `build:` (there is no registry to pull it from)"
            context = (COMPOSE.parent / build["context"]).resolve()
            assert context == ROOT and (context / build.get("dockerfile", "Dockerfile")).exists(), build
        for source in _binds(svc).values():
            assert Path(source).exists() and ROOT in Path(source).parents, f"{where}: {source} is not in the repo"
        for volume in svc.get("volumes", []):
            parts = volume.split(":")
            if not parts[0].startswith((".", "/")):
                assert parts[0] in volumes, f"{where}: volume {parts[0]} is not declared"
            if parts[0].startswith(".") and "rules" in parts[0]:
                assert parts[-1] == "ro", f"{where}: mount the rules read-only"
        for net in svc.get("networks", []):
            assert net in networks, f"{where}: network {net} is not declared"
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{where}: depends on unknown service {dep}"
        env = _as_env(svc.get("environment"))
        unknown = sorted(k for k in env if k.startswith("BASTION_") and k not in known_vars)
        assert not unknown, f"{where}: BASTION_* variables no bastion command knows: {unknown}"
        repo = svc["image"].rsplit("/", 1)[-1].split(":")[0]
        if repo in SERVICE_PORTS:
            listening[name] = {SERVICE_PORTS[repo]}
        if not built_here:
            continue
        ports: set[int] = set()
        for argv in _bastion_argvs(svc.get("command", ["serve"]), svc.get("entrypoint")):
            ns = _parse_bastion(argv)
            for rules in getattr(ns, "rules", None) or []:
                host = _host_file(rules, _binds(svc))
                assert host is not None and host.exists(), f"{where}: --rules {rules} is not a mounted repo file"
                _check_policy(host)
            if argv[0] in ("serve", "dashboard"):
                admin = _option(ns, env, "admin", "BASTION_ADMIN")
                ports.add(int(admin.rsplit(":", 1)[1]))
                stores.add((_option(ns, env, "store", "BASTION_STORE"), _option(ns, env, "audit", "BASTION_AUDIT")))
            if argv[0] == "serve":
                listen = int(_option(ns, env, "listen", "BASTION_LISTEN").rsplit(":", 1)[1])
                ports.add(listen)
                assert ns.agent, f"{where}: a sidecar is pinned to its agent with --agent"
                proxies[name] = (listen, ns.agent)
            if argv[0] == "dashboard":
                dashboards += 1
        listening[name] = ports
        if svc.get("healthcheck") and ports:
            test = " ".join(svc["healthcheck"]["test"])
            port = re.search(r"127\.0\.0\.1:(\d+)/healthz", test)
            assert port and int(port[1]) in ports, f"{where}: the health check probes {test}"
    assert dashboards == 1, "one central `bastion dashboard`"
    assert len(stores) == 1, f"the sidecars and the dashboard share one store and one audit database: {stores}"
    ((store, audit),) = stores
    assert store.startswith("redis://") and audit.startswith("postgresql://"), stores
    for url in (store, audit):
        parts = urlsplit(url)
        assert parts.port in listening.get(parts.hostname or "", set()), f"{url}: no such service and port"

    agents = {p[1] for p in proxies.values()}
    assert len(proxies) >= 2 and len(agents) == len(proxies), f"two agents, one sidecar each: {proxies}"
    for name, svc in services.items():
        where = f"compose service {name}"
        published = {int(p.rsplit(":", 1)[1]) for p in svc.get("ports", [])}
        assert published <= listening.get(name, set()), f"{where}: publishes {published}, listens on " \
            f"{listening.get(name)}"
        env = _as_env(svc.get("environment"))
        if "HTTPS_PROXY" not in env:
            continue
        # An agent: its proxy is its own sidecar, on a network they share, which is internal and the agent's only.
        target = urlsplit(env["HTTPS_PROXY"])
        assert target.hostname in proxies and target.port == proxies[target.hostname][0], env["HTTPS_PROXY"]
        assert env.get("HTTP_PROXY") == env["HTTPS_PROXY"]
        sidecar = services[target.hostname]
        nets = svc.get("networks", [])
        assert nets and all(compose["networks"][n].get("internal") for n in nets), f"{where}: {nets} not internal"
        assert set(nets) <= set(sidecar["networks"]), f"{where} shares no network with {target.hostname}"
        others = [o for o, s in services.items() if o not in (name, target.hostname) for n in nets
                  if n in s.get("networks", [])]
        assert not others, f"{where}: {others} share its network"
        # Its CA comes from a volume that holds the public trust files only, never the sidecar's home.
        mounts = {v.split(":")[1]: v.split(":")[0] for v in svc.get("volumes", [])}
        ca_dir = str(Path(env["SSL_CERT_FILE"]).parent)
        assert ca_dir in mounts and f"{mounts[ca_dir]}:{ca_dir}:ro" in svc["volumes"], f"{where}: mount the CA ro"
        home = {v.split(":")[0] for v in sidecar["volumes"] if v.split(":")[1] == _env(_stages() - 1)["BASTION_HOME"]}
        assert mounts[ca_dir] not in home, f"{where} mounts its sidecar's home (CA key, spool)"
        assert svc.get("user") not in (None, "root", "0"), f"{where}: run the agent as a non-root user"


# -- Kubernetes --------------------------------------------------------------------------------------------------


def _manifests() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in KUBERNETES:
        docs += [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]
    assert docs, "deploy/kubernetes/ has no manifests"
    return docs


def _cpu(value: str | int | float) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def test_kubernetes_manifests_are_consistent(tmp_path: Path) -> None:
    docs = _manifests()
    by_kind: dict[str, dict[str, dict[str, Any]]] = {}
    for doc in docs:
        assert {"apiVersion", "kind", "metadata"} <= set(doc), doc
        by_kind.setdefault(doc["kind"], {})[doc["metadata"]["name"]] = doc
    assert {"ConfigMap", "Secret", "Deployment", "Service", "NetworkPolicy"} <= set(by_kind), set(by_kind)
    secrets = {name: set(s.get("stringData", {})) | set(s.get("data", {})) for name, s in by_kind["Secret"].items()}
    known_vars = _known_variables()
    listen_port, admin_port = _image_listen_ports()
    sidecars: list[tuple[str, dict[str, Any], int]] = []
    named_ports: dict[str, dict[str, int]] = {}  # deployment -> port name -> number
    for dname, dep in by_kind["Deployment"].items():
        pod = dep["spec"]["template"]["spec"]
        assert dep["spec"]["selector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
        volumes = {v["name"]: v for v in pod["volumes"]}
        containers = pod.get("initContainers", []) + pod["containers"]
        for c in containers:
            where = f"Deployment {dname}, container {c['name']}"
            assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["cpu"], f"{where}: CPU"
            for mount in c.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{where}: no volume {mount['name']}"
            env = {e["name"]: e for e in c.get("env", [])}
            unknown = sorted(k for k in env if k.startswith("BASTION_") and k not in known_vars)
            assert not unknown, f"{where}: BASTION_* variables no bastion command knows: {unknown}"
            for e in env.values():
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in secrets.get(ref["name"], set()), f"{where}: no Secret {ref}"
            ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
            named_ports.setdefault(dname, {}).update({k: v for k, v in ports.items() if k})
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                if probe in c:
                    port = c[probe]["httpGet"]["port"]
                    assert port in ports or port in ports.values(), f"{where}: {probe} on unknown port {port}"
            if not _image_ok(c["image"], where):
                continue
            assert c["securityContext"]["runAsUser"] != 0 and c["securityContext"]["allowPrivilegeEscalation"] is False
            plain = {k: e["value"] for k, e in env.items() if "value" in e}
            for argv in _bastion_argvs(c.get("args", []), c.get("command")):
                ns = _parse_bastion(argv)
                for rules in getattr(ns, "rules", None) or []:
                    mount = next((m for m in c["volumeMounts"] if rules.startswith(m["mountPath"])), None)
                    assert mount and mount.get("readOnly"), f"{where}: --rules {rules} is not a read-only mount"
                    source = volumes[mount["name"]]
                    assert "configMap" in source, f"{where}: rules come from a ConfigMap"
                    cm = by_kind["ConfigMap"][source["configMap"]["name"]]
                    rules_dir = tmp_path / dname / c["name"]
                    rules_dir.mkdir(parents=True)
                    for key, text in cm["data"].items():
                        (rules_dir / key).write_text(text, encoding="utf-8")
                    _check_policy(rules_dir)
                if argv[0] in ("serve", "dashboard"):
                    admin = int(_option(ns, plain, "admin", "BASTION_ADMIN").rsplit(":", 1)[1])
                    assert admin in ports.values(), f"{where}: the admin port {admin} is not a containerPort"
                    assert {"BASTION_STORE", "BASTION_AUDIT"} <= set(env), f"{where}: shared store and audit"
                if argv[0] == "serve":
                    assert ns.agent, f"{where}: a sidecar is pinned to its agent with --agent"
                    listen = _option(ns, plain, "listen", "BASTION_LISTEN")
                    assert listen.startswith("127.0.0.1:"), f"{where}: the proxy listens on the pod's loopback"
                    assert _cpu(c["resources"]["limits"]["cpu"]) >= 1.25, \
                        f"{where}: the proxy (one core) and its audit worker (a quarter of that) need 1.25 cores"
                    sidecars.append((dname, c, int(listen.rsplit(":", 1)[1])))
        # The agents in a pod with a sidecar: pointed at it, trusting its CA from a volume without its home.
        for dn, side, port in sidecars:
            if dn != dname:
                continue
            home_volumes = {m["name"] for m in side["volumeMounts"] if m["mountPath"] == "/var/lib/bastion"}
            for c in pod["containers"]:
                if c is side or c["image"].rsplit("/", 1)[-1].startswith("bastion"):
                    continue
                env = {e["name"]: e.get("value") for e in c.get("env", [])}
                for var in ("HTTP_PROXY", "HTTPS_PROXY"):
                    assert env.get(var) == f"http://127.0.0.1:{port}", f"{dname}/{c['name']}: {var}={env.get(var)}"
                ca_dir = str(Path(env["SSL_CERT_FILE"]).parent)
                mount = next(m for m in c["volumeMounts"] if m["mountPath"] == ca_dir)
                assert mount.get("readOnly") and mount["name"] not in home_volumes, mount
                assert c["securityContext"]["runAsUser"] not in (0, 10001), "the agent runs as its own user"
    assert sidecars, "no `bastion serve --agent` sidecar in deploy/kubernetes/"
    assert listen_port and admin_port

    deployments = {n: d["spec"]["template"]["metadata"]["labels"] for n, d in by_kind["Deployment"].items()}
    for sname, svc in by_kind["Service"].items():
        selected = [n for n, labels in deployments.items() if svc["spec"]["selector"].items() <= labels.items()]
        assert selected, f"Service {sname} selects no Deployment"
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            assert any(target in named_ports[n] or target in named_ports[n].values() for n in selected), \
                f"Service {sname}: targetPort {target} is not a port of {selected}"
    store_ports = {urlsplit(v).port for s in by_kind["Secret"].values() for v in s.get("stringData", {}).values()
                   if re.match(r"(redis|rediss|postgresql)://", str(v))}
    assert store_ports == {6379, 5432}, store_ports
    for pname, pol in by_kind["NetworkPolicy"].items():
        selected = [n for n, labels in deployments.items()
                    if pol["spec"]["podSelector"]["matchLabels"].items() <= labels.items()]
        assert selected, f"NetworkPolicy {pname} selects no Deployment"
        assert "Egress" in pol["spec"]["policyTypes"]
        egress_ports = {p["port"] for rule in pol["spec"]["egress"] for p in rule.get("ports", [])}
        assert {53, *store_ports} <= egress_ports, f"NetworkPolicy {pname}: DNS and the store and audit ports"
        for rule in pol["spec"].get("ingress", []):
            for p in rule.get("ports", []):
                assert any(p["port"] in named_ports[n].values() for n in selected), f"{pname}: ingress {p}"
    for dname, _, _ in sidecars:
        pol = next(p for p in by_kind["NetworkPolicy"].values()
                   if p["spec"]["podSelector"]["matchLabels"].items() <= deployments[dname].items())
        blocks = [t["ipBlock"] for rule in pol["spec"]["egress"] for t in rule.get("to", []) if "ipBlock" in t]
        for block in blocks:
            if block["cidr"] == "0.0.0.0/0":
                assert {"10.0.0.0/8", "169.254.0.0/16"} <= set(block.get("except", [])), \
                    f"{dname}: the public egress must except private and metadata addresses"


def test_deploy_paths_in_the_docs_exist() -> None:
    texts = [(ROOT / "README.md").read_text(encoding="utf-8"),
             *(p.read_text(encoding="utf-8") for p in (ROOT / "docs").glob("*.md"))]
    mentioned = {m for text in texts for m in re.findall(r"`(deploy/[\w./-]+)`", text)}
    assert mentioned, "README.md and docs/ name no file under deploy/"
    missing = sorted(m for m in mentioned if not (ROOT / m).exists())
    assert not missing, f"README.md or docs/ name files that do not exist: {missing}"


# -- metrics in the Grafana dashboard and the alert rules --------------------------------------------------------

_PROMQL_WORDS = {
    # aggregation operators, keywords, binary and set operators
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk",
    "quantile", "limitk", "limit_ratio", "by", "without", "on", "ignoring", "group_left", "group_right", "offset",
    "bool", "and", "or", "unless", "atan2", "inf", "nan",
    # functions
    "abs", "absent", "absent_over_time", "ceil", "changes", "clamp", "clamp_max", "clamp_min", "day_of_month",
    "day_of_week", "day_of_year", "days_in_month", "delta", "deriv", "exp", "floor", "histogram_avg",
    "histogram_count", "histogram_fraction", "histogram_quantile", "histogram_stddev", "histogram_stdvar",
    "histogram_sum", "holt_winters", "double_exponential_smoothing", "hour", "idelta", "increase", "irate",
    "label_join", "label_replace", "ln", "log2", "log10", "minute", "month", "predict_linear", "rate", "resets",
    "round", "scalar", "sgn", "sort", "sort_desc", "sort_by_label", "sort_by_label_desc", "sqrt", "time",
    "timestamp", "vector", "year", "avg_over_time", "min_over_time", "max_over_time", "sum_over_time",
    "count_over_time", "quantile_over_time", "stddev_over_time", "stdvar_over_time", "last_over_time",
    "present_over_time", "mad_over_time", "acos", "acosh", "asin", "asinh", "atan", "atanh", "cos", "cosh", "sin",
    "sinh", "tan", "tanh", "deg", "rad", "pi",
}
# Series Prometheus writes itself for every scrape target (not on /metrics): `up` says whether the scrape worked.
_PROMETHEUS_SERIES = {"up"}
_GENERIC_LABELS = {"le", "job", "instance", "quantile"}


def _promql_names(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) referenced by a PromQL expression (Grafana variables allowed)."""
    text = re.sub(r"\$\{\w+(:\w+)?\}|\$\w+", "x", expr)            # Grafana variables
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', text)  # strings
    labels: set[str] = set()
    label_values = re.match(r"\s*label_values\((.*),\s*(\w+)\s*\)\s*$", text)
    if label_values:                                                # Grafana: label_values(selector, label)
        text, labels = label_values[1], {label_values[2]}
    for block in re.findall(r"\{([^}]*)\}", text):
        labels.update(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", block))
    text = re.sub(r"\{[^}]*\}", " ", text)
    for block in re.findall(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", text):
        labels.update(re.findall(r"[A-Za-z_]\w*", block))
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)                         # ranges and subqueries
    text = re.sub(r"\boffset\s+\w+", " ", text)
    text = re.sub(r"(?<![\w.])\d+(\.\d+)?(e[+-]?\d+)?", " ", text)  # numbers
    names = {t for t in re.findall(r"[A-Za-z_:][\w:]*", text) if t not in _PROMQL_WORDS}
    return names, labels


def _grafana_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every query in the dashboard: panel targets, template variables, annotations."""
    dashboard = json.loads(GRAFANA.read_text(encoding="utf-8"))
    out: list[tuple[str, str]] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            for target in panel.get("targets", []):
                out.append((f"panel {panel.get('title')!r} {target.get('refId')}", target["expr"]))
            walk(panel.get("panels", []))

    walk(dashboard["panels"])
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            out.append((f"variable ${var['name']}", query))
    for ann in dashboard.get("annotations", {}).get("list", []):
        if ann.get("expr"):
            out.append((f"annotation {ann['name']!r}", ann["expr"]))
    return out


def _alert_rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [rule for group in data["groups"] for rule in group["rules"]]


def _exposed(text: str) -> tuple[set[str], set[str]]:
    """(sample names, label names) a /metrics page exposes; a labelled family with no sample yet counts with the
    samples its type will have."""
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                "gauge": ("",), "summary": ("", "_sum", "_count", "_created"), "info": ("_info",)}
    names: set[str] = set()
    labels: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(family.name + s for s in suffixes.get(family.type, ("",)))
        for sample in family.samples:
            names.add(sample.name)
            labels.update(sample.labels)
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            labels.update(value._labelnames)
    return names, labels


@pytest.fixture(scope="module")
def scrape(server: BastionServer, upstream: Any) -> tuple[set[str], set[str]]:
    """A live `/metrics` of `bastion serve` after an allowed and a denied call (so labelled series exist)."""
    session = server.session("support-bot", "sb-token:with:colons")
    assert session.get(f"{upstream.http_url}/echo/deploy-metrics", timeout=10).status_code == 200
    assert session.get(f"{upstream.http_url}/admin/deploy-metrics", timeout=10).status_code == 403
    deadline = time.monotonic() + 10
    while True:
        status, body = server.admin_get("/metrics")
        assert status == 200
        text = body.decode()
        if ('decision="deny"' in text and "bastion_audit_records_total" in text) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    names, labels = _exposed(text)
    assert {"bastion_requests_total", "bastion_decision_seconds_bucket", "bastion_audit_backlog"} <= names
    assert {"agent", "decision"} <= labels
    return names, labels


def _unknown(queries: list[tuple[str, str]], scrape: tuple[set[str], set[str]]) -> list[str]:
    names, labels = scrape
    problems = []
    for where, expr in queries:
        used, used_labels = _promql_names(expr)
        assert used, f"{where}: no metric found in {expr!r}: is the extraction broken?"
        for name in sorted(used - names - _PROMETHEUS_SERIES):
            problems.append(f"{where}: metric {name} is not on /metrics ({expr})")
        for label in sorted(used_labels - labels - _GENERIC_LABELS):
            problems.append(f"{where}: label {label} is on no Bastion metric ({expr})")
    return problems


def test_promql_name_extraction() -> None:
    names, labels = _promql_names(
        'histogram_quantile(0.95, sum by (le, model) (rate(bastion_x_bucket{job=~"$job", a!="b"}[$__rate_interval])))'
        ' / on(instance) group_left bastion_y > 0.5 and absent(up{job="bastion"}) offset 5m')
    assert names == {"bastion_x_bucket", "bastion_y", "up"}, names
    assert labels == {"le", "model", "job", "a", "instance"}, labels
    assert _promql_names('label_values(bastion_requests_total{job=~"$job"}, agent)') == (
        {"bastion_requests_total"}, {"job", "agent"})


def test_grafana_dashboard_uses_exposed_metrics(scrape: tuple[set[str], set[str]]) -> None:
    dashboard = json.loads(GRAFANA.read_text(encoding="utf-8"))
    assert dashboard["title"] and dashboard["uid"] and dashboard["panels"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    queries = _grafana_queries()
    assert len(queries) >= 20
    problems = _unknown(queries, scrape)
    assert not problems, "deploy/grafana/bastion.json:\n" + "\n".join(problems)
    text = " ".join(e for _, e in queries)
    for needed in ("bastion_requests_total", "bastion_approvals_pending", "bastion_approval_wait_seconds_bucket",
                   "bastion_locks_held", "bastion_budget_spent_total", "bastion_budget_exceeded_total",
                   "bastion_llm_tokens_total", "bastion_audit_backlog", "bastion_audit_dropped_total",
                   "bastion_policy_reloads_total"):
        assert needed in text, f"the dashboard has no panel on {needed}"


def test_alert_rules_use_exposed_metrics(scrape: tuple[set[str], set[str]]) -> None:
    rules = _alert_rules()
    problems = _unknown([(f"alert {r['alert']}", r["expr"]) for r in rules], scrape)
    assert not problems, "deploy/prometheus/alerts.yaml:\n" + "\n".join(problems)
    text = " ".join(r["expr"] for r in rules)
    for needed in ("bastion_audit_dropped_total", "bastion_audit_backlog", "bastion_policy_reload_success",
                   "bastion_store_errors_total", "bastion_approvals_pending", "bastion_budget_exceeded_total", "up"):
        assert re.search(rf"\b{needed}\b", text), f"no alert on {needed}"


_DURATION = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")


def test_alert_rules_structure() -> None:
    data = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    assert set(data) == {"groups"}, set(data)
    names = set()
    for group in data["groups"]:
        assert set(group) <= {"name", "interval", "rules", "limit"} and group["name"] not in names, group.get("name")
        names.add(group["name"])
        if "interval" in group:
            assert _DURATION.match(group["interval"])
        assert group["rules"], group["name"]
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}, rule
            assert re.match(r"^[A-Za-z_]\w*$", rule["alert"]) and isinstance(rule["expr"], str), rule
            if "for" in rule:
                assert _DURATION.match(str(rule["for"])), rule["for"]
            assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
            assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]
            assert rule["expr"].count("(") == rule["expr"].count(")"), rule["alert"]


def test_alert_rules_pass_promtool() -> None:
    require_command("promtool")  # Debian: prometheus; .ci/run installs it
    proc = subprocess.run(["promtool", "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(_alert_rules())} rules found" in proc.stdout, proc.stdout


def test_grafana_queries_parse_with_promtool(tmp_path: Path) -> None:
    """The dashboard's PromQL is valid: each query, Grafana variables filled in, as a recording rule."""
    require_command("promtool")
    fill = {"$__rate_interval": "5m", "$job": ".+", "$agent": ".*"}
    rules = []
    for i, (where, expr) in enumerate(_grafana_queries()):
        if expr.lstrip().startswith("label_values("):
            continue  # a Grafana function, not PromQL
        for var, value in fill.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, f"{where}: unknown Grafana variable in {expr}"
        rules.append({"record": f"grafana:query_{i}", "expr": expr})
    path = tmp_path / "grafana-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "grafana", "rules": rules}]}), encoding="utf-8")
    proc = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
