"""git through `bastion run`: a real `git clone` over HTTPS, through a running `bastion serve`.

The upstream is a bare repository served by a static HTTPS server on 127.0.0.1 (git's "dumb" HTTP protocol)
with a certificate from the test CA. git is given only what `bastion run` sets, and that trust bundle does
not hold the test CA: a clone that went around Bastion would fail its TLS check, so a clone that succeeds
went through Bastion, which checked the upstream against `--upstream-ca`. The `server` fixture (conftest) runs
`bastion serve` on tests/testdata/policy/proxy.yaml.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO
from services import require_command
from support.bastion import BastionServer, bastion_cmd, clean_env
from support.certs import CertFiles

AGENT, TOKEN = "support-bot", "sb-token:with:colons"  # tests/testdata/policy/proxy.yaml: may reach 127.0.0.1


@pytest.fixture(scope="module", autouse=True)
def _need_git() -> None:
    require_command("git")


def git(*args: str, cwd: Path, env: dict[str, str]) -> str:
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True,
                          timeout=60).stdout.strip()


def hermetic_git_env(home: Path) -> dict[str, str]:
    """No user or system git configuration (a `http.proxy` there would change the test), never a prompt."""
    home.mkdir(parents=True, exist_ok=True)
    return clean_env({"HOME": str(home), "GIT_CONFIG_NOSYSTEM": "1", "GIT_TERMINAL_PROMPT": "0",
                      "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
                      "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"})


@dataclass
class GitServer:
    port: int
    commit: str
    paths: list[str] = field(default_factory=list)

    def url(self, prefix: str = "") -> str:
        return f"https://127.0.0.1:{self.port}{prefix}/repo.git"


@pytest.fixture(scope="module")
def git_server(tmp_path_factory: pytest.TempPathFactory, test_certs: CertFiles) -> Iterator[GitServer]:
    """A bare repository with one commit, served read-only over HTTPS (test CA) at /repo.git and
    /admin/repo.git (the second path is one the rules deny)."""
    root = tmp_path_factory.mktemp("git-served")
    env = hermetic_git_env(root / "home")
    work = root / "work"
    work.mkdir()
    git("init", "-q", "-b", "main", cwd=work, env=env)
    (work / "README").write_text("cloned through Bastion\n")
    git("add", "README", cwd=work, env=env)
    git("commit", "-q", "-m", "first", cwd=work, env=env)
    commit = git("rev-parse", "HEAD", cwd=work, env=env)
    site = root / "site"
    (site / "admin").mkdir(parents=True)
    git("clone", "-q", "--bare", str(work), str(site / "repo.git"), cwd=root, env=env)
    git("update-server-info", cwd=site / "repo.git", env=env)
    shutil.copytree(site / "repo.git", site / "admin" / "repo.git")

    served = GitServer(0, commit)

    class Handler(SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            served.paths.append(self.path)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(site)))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(test_certs.server_cert, test_certs.server_key)
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    served.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield served
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def clone_through_bastion(server: BastionServer, home: Path, url: str, dest: Path,
                          *before_git: str) -> subprocess.CompletedProcess[str]:
    """`bastion run -- [before_git...] git clone URL DEST`, with only a hermetic git configuration around."""
    cmd = bastion_cmd("run", "--agent", AGENT, "--token", TOKEN, "--proxy", server.proxy_url(),
                      "--home", str(home), "--", *before_git, "git", "clone", "-q", url, str(dest))
    env = hermetic_git_env(dest.parent / "git-home")
    env.update(GIT_TRACE_CURL="1", GIT_TRACE_CURL_NO_DATA="1")  # headers on stderr (credentials redacted)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def proxy_auth_challenges(stderr: str) -> int:
    """How many 407s git received (its curl trace shows every status line it read)."""
    return sum(1 for line in stderr.splitlines() if "Recv header: HTTP/" in line and " 407" in line)


def test_git_clones_over_https_through_bastion_run(tmp_path: Path, server: BastionServer, bastion_home: Path,
                                                   git_server: GitServer) -> None:
    dest = tmp_path / "clone"
    result = clone_through_bastion(server, bastion_home, git_server.url(), dest)
    assert result.returncode == 0, result.stderr + server.logs()[-3000:]
    assert git("rev-parse", "HEAD", cwd=dest, env=hermetic_git_env(tmp_path / "h")) == git_server.commit
    assert (dest / "README").read_text() == "cloned through Bastion\n"
    assert proxy_auth_challenges(result.stderr) == 0  # GIT_HTTP_PROXY_AUTHMETHOD=basic: credentials up front


@pytest.mark.parametrize("authmethod", ["anyauth", None], ids=["anyauth", "unset"])
def test_git_clones_when_it_sends_credentials_only_after_a_407(tmp_path: Path, server: BastionServer,
                                                               bastion_home: Path, git_server: GitServer,
                                                               authmethod: str | None) -> None:
    """Without `GIT_HTTP_PROXY_AUTHMETHOD=basic`, libcurl first sends CONNECT without credentials, takes
    Bastion's 407 and sends the CONNECT again on the same connection, with them."""
    dest = tmp_path / "clone"
    env_cmd = ["env", f"GIT_HTTP_PROXY_AUTHMETHOD={authmethod}"] if authmethod else ["env", "-u",
                                                                                      "GIT_HTTP_PROXY_AUTHMETHOD"]
    result = clone_through_bastion(server, bastion_home, git_server.url(), dest, *env_cmd)
    assert result.returncode == 0, result.stderr + server.logs()[-3000:]
    assert proxy_auth_challenges(result.stderr) >= 1  # the path under test was taken
    assert git("rev-parse", "HEAD", cwd=dest, env=hermetic_git_env(tmp_path / "h")) == git_server.commit


def test_git_clone_of_a_path_the_rules_deny_fails(tmp_path: Path, server: BastionServer, bastion_home: Path,
                                                  git_server: GitServer) -> None:
    before = len(git_server.paths)
    result = clone_through_bastion(server, bastion_home, git_server.url("/admin"), tmp_path / "clone")
    assert result.returncode != 0
    assert "403" in result.stderr
    assert not (tmp_path / "clone" / ".git").exists()
    assert not [p for p in git_server.paths[before:] if p.startswith("/admin/")]  # never reached the server
