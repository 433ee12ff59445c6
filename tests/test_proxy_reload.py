"""Hot reload and the admin listener: file watching (ConfigMap-style symlink swaps, rename-on-save), SIGHUP,
POST /api/rules/reload with user tokens, invalid policies keeping the last good one, health and metrics."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
from support.bastion import BastionServer, run_bastion
from support.certs import CertFiles
from support.upstream import Upstream

SUPPORT_SHA = "f153f5b988c999f9e82cdeb61dd14021cfbd7e9c91cc2da0e453f29c01fc7500"  # "sb-token:with:colons"
ALICE_SHA = "9c220f200955d76c0a38d308225e0ef10c5f971acaf2f8d1d8f732affa5bd1dc"  # "alice-token", admin
BOB_SHA = "97dd3707015dcf069cf73022ed7173b1165db6eff24b441cb57fd069a8c4e525"  # "bob-token", viewer
SUPPORT = ("support-bot", "sb-token:with:colons")


def policy_text(deny_path: str, *, extra_rule: str = "") -> str:
    return f"""\
version: 1
defaults: {{effect: deny}}
agents:
  support-bot: {{roles: [support], token_sha256: {SUPPORT_SHA}}}
users:
  alice: {{roles: [admin], token_sha256: {ALICE_SHA}}}
  bob: {{roles: [viewer], token_sha256: {BOB_SHA}}}
rules:
  - id: local
    effect: allow
    agents: ["role:support"]
    match: {{host: 127.0.0.1}}
  - id: blocked
    effect: deny
    agents: ["*"]
    match: {{path: "{deny_path}"}}
    message: "blocked by the current policy"
{extra_rule}network:
  allow_private: ["127.0.0.0/8"]
"""


class ConfigMapDir:
    """A rules directory laid out like a Kubernetes ConfigMap mount: rules.yaml -> ..data/rules.yaml,
    ..data -> ..<version>/; an update writes a new version dir and swaps ..data atomically."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.version = 0
        root.mkdir(parents=True, exist_ok=True)

    def publish(self, text: str) -> None:
        self.version += 1
        target = self.root / f"..v{self.version}"
        target.mkdir()
        (target / "rules.yaml").write_text(text)
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(target.name)
        os.replace(tmp, self.root / "..data")
        link = self.root / "rules.yaml"
        if not link.is_symlink():
            link.symlink_to("..data/rules.yaml")


def wait_until(check: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def status_of(server: BastionServer, upstream: Upstream, path: str) -> int:
    proxy = server.proxy_url(*SUPPORT)
    return requests.get(f"{upstream.http_url}{path}", proxies={"http": proxy}, timeout=10).status_code


def rules_json(server: BastionServer) -> dict[str, object]:
    status, body = server.admin_get("/api/rules", token="alice-token")
    assert status == 200
    return json.loads(body)


def reload_metric(server: BastionServer) -> str:
    status, body = server.admin_get("/metrics")
    assert status == 200
    for line in body.decode().splitlines():
        if line.startswith("bastion_policy_reload_success "):
            return line.split()[1]
    raise AssertionError("bastion_policy_reload_success missing from /metrics")


@pytest.fixture
def configmap(tmp_path: Path) -> ConfigMapDir:
    cm = ConfigMapDir(tmp_path / "rules")
    cm.publish(policy_text("/echo/one"))
    return cm


@pytest.fixture
def server(tmp_path: Path, configmap: ConfigMapDir, bastion_home: Path, test_certs: CertFiles,
           upstream: Upstream) -> Iterator[BastionServer]:
    with run_bastion(tmp_path / "srv", [configmap.root], home=bastion_home, upstream_ca=test_certs.ca_cert) as srv:
        yield srv


def test_configmap_symlink_swap_takes_effect(server: BastionServer, configmap: ConfigMapDir,
                                            upstream: Upstream) -> None:
    assert status_of(server, upstream, "/echo/one") == 403
    assert status_of(server, upstream, "/echo/two") == 200
    before = rules_json(server)["revision"]
    configmap.publish(policy_text("/echo/two"))
    wait_until(lambda: status_of(server, upstream, "/echo/two") == 403, what="the new policy")
    assert status_of(server, upstream, "/echo/one") == 200
    after = rules_json(server)
    assert after["revision"] != before
    assert after["last_reload"]["ok"] is True
    assert reload_metric(server) == "1.0"


def test_invalid_policy_keeps_the_last_good_one(server: BastionServer, configmap: ConfigMapDir,
                                               upstream: Upstream) -> None:
    good = rules_json(server)["revision"]
    configmap.publish(policy_text("/echo/two").replace("effect: deny}", "effect: maybe}"))
    wait_until(lambda: rules_json(server)["last_reload"]["ok"] is False, what="the failed reload")
    state = rules_json(server)
    assert state["revision"] == good
    errors = state["last_reload"]["errors"]
    assert errors and errors[0]["file"].endswith("rules.yaml")
    assert errors[0]["line"] == 2
    assert "effect" in errors[0]["message"]
    assert reload_metric(server) == "0.0"
    assert status_of(server, upstream, "/echo/one") == 403  # the old policy still decides
    server.wait_for_log(r"rules\.yaml:2: defaults\.effect")
    configmap.publish(policy_text("/echo/three"))  # fixed: reloads and the metric recovers
    wait_until(lambda: rules_json(server)["last_reload"]["ok"] is True, what="the fixed reload")
    assert reload_metric(server) == "1.0"
    assert status_of(server, upstream, "/echo/three") == 403


def test_editor_rename_on_save_is_noticed(tmp_path: Path, bastion_home: Path, upstream: Upstream) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(policy_text("/echo/one"))
    with run_bastion(tmp_path / "srv", [rules], home=bastion_home) as server:
        assert status_of(server, upstream, "/echo/one") == 403
        tmp = tmp_path / ".rules.yaml.swp"
        tmp.write_text(policy_text("/echo/other"))
        os.replace(tmp, rules)
        wait_until(lambda: status_of(server, upstream, "/echo/one") == 200, what="the rename to be noticed")


def test_sighup_reloads(server: BastionServer, configmap: ConfigMapDir, upstream: Upstream) -> None:
    server.proc.send_signal(signal.SIGHUP)
    server.wait_for_log(r"policy reload\S* \(sighup\)")
    configmap.publish(policy_text("/echo/hup"))
    server.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: status_of(server, upstream, "/echo/hup") == 403, what="the reload")


def test_api_reload_needs_an_admin_token(server: BastionServer, configmap: ConfigMapDir,
                                        upstream: Upstream) -> None:
    status, body = server.admin_post("/api/rules/reload")
    assert status == 401
    assert json.loads(body)["error"]["type"] == "unauthorized"
    assert server.admin_post("/api/rules/reload", token="not-a-token")[0] == 401
    status, body = server.admin_post("/api/rules/reload", token="bob-token")
    assert status == 403
    assert "admin" in json.loads(body)["error"]["message"]
    status, body = server.admin_post("/api/rules/reload", token="alice-token")
    assert status == 200
    assert json.loads(body)["reload"]["trigger"] == "api"
    configmap.publish(policy_text("/echo/one").replace("effect: deny}", "effect: nope}"))
    status, body = server.admin_post("/api/rules/reload", token="alice-token")
    assert status == 422
    assert json.loads(body)["reload"]["errors"][0]["line"] == 2


def test_admin_endpoints(server: BastionServer, upstream: Upstream) -> None:
    assert status_of(server, upstream, "/echo/metrics-count") == 200
    status, body = server.admin_get("/healthz")
    assert (status, json.loads(body)["status"]) == (200, "ok")
    status, body = server.admin_get("/readyz")
    assert status == 200
    assert json.loads(body)["checks"]["policy"]["ok"] is True
    assert server.admin_get("/api/rules")[0] == 401
    assert server.admin_get("/api/rules", token="bob-token")[0] == 200  # any user may read
    rules = rules_json(server)
    assert [r["id"] for r in rules["rules"]] == ["local", "blocked"]
    assert rules["sources"][0].endswith("rules.yaml")
    status, metrics = server.admin_get("/metrics")
    text = metrics.decode()
    assert 'bastion_requests_total{agent="support-bot",decision="allow"}' in text
    assert "bastion_decision_seconds_bucket" in text
    assert "bastion_upstream_seconds_count" in text
