"""The pipeline's promises, tested through `Pipeline` itself with stub stages and real mitmproxy flows.

- order: stages run in the order given, for every hook the pipeline dispatches, whether a stage's hook is
  synchronous, `async def`, or synchronous returning an awaitable;
- fail closed: a stage that raises while deciding a request (http_connect, requestheaders, request) gets the
  request refused with Bastion's 500 JSON answer, and no later stage decides it otherwise;
- a stage that raises on any other hook is logged and the flow goes on as it was;
- every deciding stage does nothing once an earlier stage answered (`flow.response` set).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any
from unittest import mock

import pytest
from conftest import TESTDATA_RULES
from mitmproxy import connection, hooks, http
from mitmproxy.proxy import layer, layers, server_hooks
from mitmproxy.test import tflow, tutils

from bastion.policy.load import load_policy
from bastion.proxy import flowmeta, responses
from bastion.proxy.pipeline import HOOKS, Pipeline
from bastion.proxy.state import PolicyState

assert layer.NextLayerHook and layers.HttpLayer  # their modules declare the hooks `hooks.all_hooks` lists

FAILED_MESSAGE = "Bastion failed while checking this request; it was not forwarded."
DECIDING = ("http_connect", "requestheaders", "request")
NOT_DECIDING = ("responseheaders", "response", "error", "websocket_start", "websocket_message", "websocket_end",
                "http_connected", "client_connected", "client_disconnected", "server_connected", "running",
                "done")


# -- stub stages -----------------------------------------------------------------------------------------


class Recorder:
    """A stage with every hook, recording `(name, hook)` into a shared log; `mode` says how each hook runs:
    "sync" (returns None), "async" (`async def`, yields to the loop) or "deferred" (a synchronous method that
    returns an awaitable, as the real stages do when they need the store)."""

    def __init__(self, name: str, log: list[tuple[str, str]], mode: str = "sync") -> None:
        self.name, self.log, self.mode = name, log, mode
        for hook in HOOKS:
            setattr(self, hook, self._hook(hook))

    def _hook(self, hook: str) -> Callable[..., Any]:
        if self.mode == "async":
            async def run_async(*args: Any) -> None:
                self.log.append((self.name, hook))
                await asyncio.sleep(0)
                self.log.append((self.name + " done", hook))
            return run_async

        def run(*args: Any) -> Awaitable[None] | None:
            self.log.append((self.name, hook))
            if self.mode == "sync":
                return None
            return self._later(hook)
        return run

    async def _later(self, hook: str) -> None:
        await asyncio.sleep(0)
        self.log.append((self.name + " done", hook))


class Raiser:
    """A stage whose `hook` raises, synchronously or after yielding to the loop."""

    def __init__(self, hook: str, *, after_await: bool = False) -> None:
        async def fail_later(*args: Any) -> None:
            await asyncio.sleep(0)
            raise RuntimeError("stage bug")

        def fail(*args: Any) -> None:
            raise RuntimeError("stage bug")

        setattr(self, hook, fail_later if after_await else fail)


class Seen:
    """An observer stage that notes, for each hook, whether the flow had an answer when it ran."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, int | None]] = []
        for hook in HOOKS:
            setattr(self, hook, self._hook(hook))

    def _hook(self, hook: str) -> Callable[..., None]:
        def run(*args: Any) -> None:
            flow = args[0] if args and isinstance(args[0], http.HTTPFlow) else None
            self.seen.append((hook, flow.response.status_code if flow is not None and flow.response else None))
        return run


async def dispatch(pipeline: Pipeline, hook: str, *args: Any) -> None:
    """What mitmproxy's addon manager does with one hook of the pipeline addon."""
    result = getattr(pipeline, hook)(*args)
    if result is not None and inspect.isawaitable(result):
        await result


def hook_args(hook: str, flow: http.HTTPFlow) -> tuple[Any, ...]:
    """Arguments of the right kind for `hook` (mitmproxy's hook specifications say which)."""
    fields = hooks.all_hooks[hook].__dataclass_fields__
    if not fields:
        return ()
    kind = next(iter(fields.values())).type
    if "Client" in str(kind):
        return (flow.client_conn,)
    if "ServerConnectionHookData" in str(kind):
        return (server_hooks.ServerConnectionHookData(server=flow.server_conn, client=flow.client_conn),)
    if "HTTPFlow" in str(kind):
        return (flow,)
    return (mock.Mock(),)  # tls, tcp, udp, next_layer data: the stubs do not read it


def refused(flow: http.HTTPFlow) -> dict[str, Any]:
    assert flow.response is not None
    return json.loads(flow.response.content or b"")


# -- order -----------------------------------------------------------------------------------------------


def test_hooks_are_mitmproxy_hooks() -> None:
    """A misspelt name would never be dispatched: every stage would silently miss that event."""
    assert set(HOOKS) <= set(hooks.all_hooks)


def test_only_hooks_some_stage_has_are_dispatched() -> None:
    class OnlyResponse:
        def response(self, flow: http.HTTPFlow) -> None: ...

    pipeline = Pipeline([OnlyResponse()])
    assert hasattr(pipeline, "response")
    assert not hasattr(pipeline, "request") and not hasattr(pipeline, "websocket_message")


@pytest.mark.parametrize("hook", HOOKS)
async def test_stages_run_in_the_given_order_for_every_hook(hook: str) -> None:
    """Synchronous, `async def` and awaitable-returning hooks mixed: each stage starts only once the one
    before it has finished, whatever its kind."""
    log: list[tuple[str, str]] = []
    pipeline = Pipeline([Recorder("a", log), Recorder("b", log, "async"), Recorder("c", log, "deferred"),
                         Recorder("d", log), Recorder("e", log, "async")])
    flow = tflow.tflow()
    await dispatch(pipeline, hook, *hook_args(hook, flow))
    assert [name for name, h in log if h == hook] == ["a", "b", "b done", "c", "c done", "d", "e", "e done"]
    assert {h for _, h in log} == {hook}  # one hook, no other (requestheaders does not run `request` steps)


async def test_a_request_decided_early_runs_every_request_step_after_the_headers() -> None:
    """A request decided at `requestheaders` (a large body no rule reads): every stage's `request` step runs
    right after the headers, in order, the body is streamed, and the later `request` hook does nothing."""
    log: list[tuple[str, str]] = []

    class DecideEarly:
        def requestheaders(self, flow: http.HTTPFlow) -> None:
            flow.metadata[flowmeta.DECIDED_EARLY] = True

    pipeline = Pipeline([Recorder("a", log, "deferred"), DecideEarly(), Recorder("b", log, "async")])
    flow = tflow.tflow()
    await dispatch(pipeline, "requestheaders", flow)
    assert log == [("a", "requestheaders"), ("a done", "requestheaders"), ("b", "requestheaders"),
                   ("b done", "requestheaders"), ("a", "request"), ("a done", "request"), ("b", "request"),
                   ("b done", "request")]
    assert flow.request.stream is True
    log.clear()
    await dispatch(pipeline, "request", flow)
    assert log == []


# -- fail closed -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("after_await", [False, True], ids=["raises", "raises-after-await"])
@pytest.mark.parametrize("hook", DECIDING)
async def test_a_stage_that_fails_while_deciding_refuses_the_request(
        hook: str, after_await: bool, caplog: pytest.LogCaptureFixture) -> None:
    from bastion.proxy.enforce import Enforce
    from bastion.proxy.gate import Gate

    seen = Seen()
    pipeline = Pipeline([Raiser(hook, after_await=after_await), Enforce(), seen, Gate()])
    flow = tflow.tflow()
    if hook == "http_connect":
        flow.request.method = "CONNECT"
    flow.request.headers["expect"] = "100-continue"
    with caplog.at_level(logging.ERROR, "bastion.proxy"):
        await dispatch(pipeline, hook, flow)
    assert any(f"failed in {hook}" in r.getMessage() for r in caplog.records)
    assert flow.response is not None and flow.response.status_code == 500
    assert flow.response.headers["content-type"] == "application/json"
    request_id = flow.metadata[flowmeta.REQUEST_ID]
    assert flow.response.headers[flowmeta.REQUEST_ID_HEADER] == request_id
    assert refused(flow) == {"type": "error", "error": {
        "type": "internal_error", "message": FAILED_MESSAGE, "rule": None, "request_id": request_id}}
    assert flow.metadata[flowmeta.REFUSAL] == responses.INTERNAL_ERROR
    assert seen.seen == [(hook, 500)]  # later stages still run (observers see the refusal) ...
    if hook != "request":
        await dispatch(pipeline, "request", flow)  # ... and none of them decides it otherwise afterwards
    assert refused(flow)["error"]["message"] == FAILED_MESSAGE
    assert flowmeta.DECISION not in flow.metadata
    if hook == "requestheaders":
        assert "expect" not in flow.request.headers  # answered: the body is not asked for


@pytest.mark.parametrize("after_await", [False, True], ids=["raises", "raises-after-await"])
@pytest.mark.parametrize("hook", NOT_DECIDING)
async def test_a_stage_that_fails_on_another_hook_is_logged_and_the_flow_goes_on(
        hook: str, after_await: bool, caplog: pytest.LogCaptureFixture) -> None:
    seen = Seen()
    pipeline = Pipeline([Raiser(hook, after_await=after_await), seen])
    flow = tflow.tflow(resp=True)
    answer = flow.response
    with caplog.at_level(logging.ERROR, "bastion.proxy"):
        await dispatch(pipeline, hook, *hook_args(hook, flow))  # does not raise
    assert any(f"failed in {hook}" in r.getMessage() for r in caplog.records)
    assert flow.response is answer and answer.status_code == 200  # the upstream's answer is not replaced
    assert flowmeta.REFUSAL not in flow.metadata
    assert [h for h, _ in seen.seen] == [hook]


@pytest.mark.parametrize("after_await", [False, True], ids=["raises", "raises-after-await"])
async def test_a_stage_that_fails_to_vet_a_connection_fails_the_connection(after_await: bool) -> None:
    seen = Seen()
    pipeline = Pipeline([Raiser("server_connect", after_await=after_await), seen])
    server = connection.Server(address=("upstream.test", 443))
    await dispatch(pipeline, "server_connect", server_hooks.ServerConnectionHookData(
        server=server, client=tflow.tclient_conn()))
    assert server.error == "Bastion failed to vet this connection"
    assert [h for h, _ in seen.seen] == ["server_connect"]


# -- every deciding stage leaves an answered request alone -----------------------------------------------


@pytest.fixture(scope="module")
def state() -> PolicyState:
    return PolicyState([str(TESTDATA_RULES / "proxy.yaml")], load_policy([TESTDATA_RULES / "proxy.yaml"]))


def connect_flow() -> http.HTTPFlow:
    req = tutils.treq(method=b"CONNECT", scheme=b"", host="localhost", port=443, path=b"", authority=b"")
    return tflow.tflow(req=req)


def agent_flow(state: PolicyState, obligation: str | None = None) -> http.HTTPFlow:
    """A request of an authenticated agent, decided and carrying `obligation` (with a stand-in decision)."""
    flow = tflow.tflow()
    meta = flow.metadata
    meta[flowmeta.REQUEST_ID] = "rid"
    meta[flowmeta.AGENT] = "support-bot"
    meta[flowmeta.POLICY] = state.policy
    meta[flowmeta.DECISION] = mock.Mock(effect="allow", rules=("r",), rule="r", requires=(), locks=(),
                                        releases=())
    if obligation is not None:
        meta[flowmeta.OBLIGATIONS] = {obligation}
    return flow


class Untouched:
    """Store, watch and audit writer stand-ins; `calls` lists every use made of them."""

    def __init__(self) -> None:
        self.store = mock.Mock()
        self.writer = mock.Mock()
        self.writer.must_refuse.return_value = True  # the audit cannot record: the capture stages refuse
        self.paused = mock.Mock()

    def watch(self, state: PolicyState) -> Any:
        from bastion.coord.fleet import Pause
        from bastion.proxy.pauses import PauseWatch

        watch = PauseWatch(self.paused)
        watch.apply([Pause("support-bot", "stop", "user:ops", 0.0)])
        return watch

    def calls(self) -> list[Any]:
        return [*self.store.mock_calls, *self.paused.mock_calls,
                *(c for c in self.writer.mock_calls if c[0] != "must_refuse")]


Case = Callable[[PolicyState, Untouched], tuple[Any, str, http.HTTPFlow]]


def _identity_headers(state: PolicyState, deps: Untouched) -> tuple[Any, str, http.HTTPFlow]:
    from bastion.proxy.identity import Identity

    return Identity(state), "requestheaders", tflow.tflow()  # no credentials: 407


def _identity_connect(state: PolicyState, deps: Untouched) -> tuple[Any, str, http.HTTPFlow]:
    from bastion.proxy.identity import Identity

    return Identity(state), "http_connect", connect_flow()


def _enforce_headers(state: PolicyState, deps: Untouched) -> tuple[Any, str, http.HTTPFlow]:
    from bastion.proxy.enforce import Enforce

    flow = tflow.tflow()
    flow.request.headers["content-length"] = str(1 << 40)  # 413
    return Enforce(), "requestheaders", flow


def _enforce_request(state: PolicyState, deps: Untouched) -> tuple[Any, str, http.HTTPFlow]:
    from bastion.proxy.enforce import Enforce

    flow = agent_flow(state)
    del flow.metadata[flowmeta.DECISION]
    return Enforce(), "request", flow


def _guard_connect(state: PolicyState, deps: Untouched) -> tuple[Any, str, http.HTTPFlow]:
    from bastion.proxy.guard import NetworkGuard
    from bastion.proxy.netcheck import ProtectedTargets

    guard = NetworkGuard(ProtectedTargets())
    flow = connect_flow()
    flow.metadata[flowmeta.AGENT] = "support-bot"
    flow.metadata[flowmeta.POLICY] = state.policy
    guard.http_connected(flow)  # a CONNECT arriving inside a tunnel: 403
    return guard, "http_connect", flow


def _guard_request(state: PolicyState, deps: Untouched) -> tuple[Any, str, http.HTTPFlow]:
    from bastion.policy.facts import RequestFacts
    from bastion.proxy.guard import NetworkGuard
    from bastion.proxy.netcheck import ProtectedTargets

    targets = ProtectedTargets()
    targets.add_service("store.internal", 6379, "the store", [])
    flow = agent_flow(state)
    flow.metadata[flowmeta.FACTS] = RequestFacts.from_url("GET", "http://store.internal:6379/")  # 403
    return NetworkGuard(targets), "request", flow


def _pause(state: PolicyState, deps: Untouched) -> tuple[Any, str, http.HTTPFlow]:
    from bastion.proxy.pauses import PauseCheck

    return PauseCheck(deps.watch(state)), "request", agent_flow(state)


def _pause_recheck(state: PolicyState, deps: Untouched) -> tuple[Any, str, http.HTTPFlow]:
    from bastion.proxy.pauses import PauseCheck

    return PauseCheck(deps.watch(state), recheck=True), "request", agent_flow(state)


def _milestones(state: PolicyState, deps: Untouched) -> tuple[Any, str, http.HTTPFlow]:
    from bastion.proxy.milestones import Milestones

    flow = agent_flow(state, flowmeta.OBLIGATION_MILESTONE)
    flow.metadata[flowmeta.DECISION].requires = (mock.Mock(key="report-ready", rule="r"),)
    return Milestones(deps.store), "request", flow


def _approvals(state: PolicyState, deps: Untouched) -> tuple[Any, str, http.HTTPFlow]:
    from bastion.proxy.approvals import HoldForApproval

    return HoldForApproval(deps.store), "request", agent_flow(state, flowmeta.OBLIGATION_APPROVAL)


def _budgets(state: PolicyState, deps: Untouched) -> tuple[Any, str, http.HTTPFlow]:
    from bastion.proxy.budgets import Budgets

    return Budgets(deps.store), "request", agent_flow(state, flowmeta.OBLIGATION_BUDGET)


def _locks(state: PolicyState, deps: Untouched) -> tuple[Any, str, http.HTTPFlow]:
    from bastion.proxy.locks import TaskLocks

    return TaskLocks(deps.store), "request", agent_flow(state, flowmeta.OBLIGATION_LOCK)


def _audit_intake(state: PolicyState, deps: Untouched) -> tuple[Any, str, http.HTTPFlow]:
    from bastion.proxy.capture import Intake

    return Intake(deps.writer), "request", agent_flow(state)


def _audit_capture(state: PolicyState, deps: Untouched) -> tuple[Any, str, http.HTTPFlow]:
    from bastion.proxy.capture import Capture

    return Capture(deps.writer), "request", agent_flow(state)


def _gate_request(state: PolicyState, deps: Untouched) -> tuple[Any, str, http.HTTPFlow]:
    from bastion.proxy.gate import Gate

    flow = agent_flow(state)
    del flow.metadata[flowmeta.DECISION]  # undecided: 500
    return Gate(), "request", flow


def _gate_connect(state: PolicyState, deps: Untouched) -> tuple[Any, str, http.HTTPFlow]:
    from bastion.proxy.gate import Gate

    flow = connect_flow()
    flow.metadata[flowmeta.REQUEST_ID] = "rid"
    return Gate(), "http_connect", flow  # a tunnel nobody refused: 200


DECIDERS: dict[str, Case] = {
    "audit-intake.request": _audit_intake,
    "identity.http_connect": _identity_connect,
    "identity.requestheaders": _identity_headers,
    "enforce.requestheaders": _enforce_headers,
    "enforce.request": _enforce_request,
    "pause-check.request": _pause,
    "network-guard.http_connect": _guard_connect,
    "network-guard.request": _guard_request,
    "milestones.request": _milestones,
    "approvals.request": _approvals,
    "pause-recheck.request": _pause_recheck,
    "budgets.request": _budgets,
    "task-locks.request": _locks,
    "gate.http_connect": _gate_connect,
    "gate.request": _gate_request,
    "audit-capture.request": _audit_capture,
}


def _acted(result: Any, flow: http.HTTPFlow) -> bool:
    """Whether a stage's hook did something: answered, decided, or went off to ask a store."""
    if result is not None and inspect.iscoroutine(result):
        result.close()  # not run: the stand-in store is not a real one
        return True
    return flow.response is not None or flowmeta.DECISION in flow.metadata


@pytest.mark.parametrize("case", DECIDERS.values(), ids=DECIDERS.keys())
def test_a_deciding_stage_acts_on_an_unanswered_request(state: PolicyState, case: Case) -> None:
    """The counterpart of the test below: each case is one its stage would act on."""
    deps = Untouched()
    stage, hook, flow = case(state, deps)
    assert _acted(getattr(stage, hook)(flow), flow)


@pytest.mark.parametrize("case", DECIDERS.values(), ids=DECIDERS.keys())
def test_a_deciding_stage_leaves_an_answered_request_alone(state: PolicyState, case: Case) -> None:
    deps = Untouched()
    stage, hook, flow = case(state, deps)
    deps.store.reset_mock()
    deps.paused.reset_mock()
    decision = flow.metadata.get(flowmeta.DECISION)
    responses.refuse(flow, 403, "earlier_refusal", "An earlier stage answered.")
    answer, content, request_id = flow.response, flow.response.content, flow.metadata[flowmeta.REQUEST_ID]
    assert getattr(stage, hook)(flow) is None  # nothing to wait for: no store was asked
    assert flow.response is answer and answer.status_code == 403 and answer.content == content
    assert flow.metadata[flowmeta.REFUSAL] == "earlier_refusal"
    assert flow.metadata[flowmeta.REQUEST_ID] == request_id  # the answer's id stays the flow's id
    assert flow.metadata.get(flowmeta.DECISION) is decision
    assert deps.calls() == []


async def test_an_answer_before_identity_stands_through_the_whole_pipeline(state: PolicyState) -> None:
    """A stage before identity fails: no stage after it, deciding or not, replaces that answer or its id."""
    from bastion.proxy.enforce import Enforce
    from bastion.proxy.gate import Gate
    from bastion.proxy.guard import NetworkGuard
    from bastion.proxy.identity import Identity
    from bastion.proxy.netcheck import ProtectedTargets

    pipeline = Pipeline([Raiser("requestheaders"), Identity(state), Enforce(), NetworkGuard(ProtectedTargets()),
                         Gate()])
    flow = tflow.tflow()  # no credentials: identity alone would answer 407
    await dispatch(pipeline, "requestheaders", flow)
    await dispatch(pipeline, "request", flow)
    body = refused(flow)
    assert flow.response is not None and flow.response.status_code == 500
    assert body["error"]["message"] == FAILED_MESSAGE
    assert body["error"]["request_id"] == flow.metadata[flowmeta.REQUEST_ID] == flow.response.headers[
        flowmeta.REQUEST_ID_HEADER]
    assert flow.metadata[flowmeta.POLICY] is state.policy  # what the audit record needs (redaction settings)


# -- the order build_proxy gives ---------------------------------------------------------------------------


@pytest.mark.parametrize("wired", [False, True], ids=["bare", "every-service"])
async def test_build_proxy_orders_the_stages(wired: bool, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The order requests pass the stages: who decides first, what meets obligations before the gate refuses
    the unmet, and what only observes the final outcome. Conditional stages drop out, the rest keep their
    places."""
    from types import SimpleNamespace

    from bastion.proxy import httplimits, server
    from bastion.proxy.approvals import HoldForApproval
    from bastion.proxy.capture import Capture
    from bastion.proxy.netcheck import ProtectedTargets
    from bastion.proxy.pauses import PauseWatch

    monkeypatch.setattr(httplimits, "install", lambda: None)  # patches mitmproxy's layers: not needed here
    settings = SimpleNamespace(listen=("127.0.0.1", 0), data=SimpleNamespace(home=SimpleNamespace(path=tmp_path)),
                               header_timeout=10.0, agent=None, max_request_body=1 << 20, max_header_bytes=1 << 16,
                               response_facts=True, idle_timeout=60.0)
    services: dict[str, Any] = {}
    if wired:
        services = {"lock_store": mock.Mock(), "capture": Capture(mock.Mock()),
                    "holds": HoldForApproval(mock.Mock()),
                    "fleet": server.Fleet(mock.Mock(), PauseWatch(mock.Mock()))}
    proxy = server.build_proxy(settings, mock.Mock(), ProtectedTargets(), None, **services)  # type: ignore[arg-type]
    try:
        pipeline = proxy.master.addons.get("pipeline")
        names = [type(s).__name__ + ("(recheck)" if getattr(s, "recheck", False) else "") for s in pipeline.stages]
    finally:
        proxy.master._legacy_log_events.uninstall()
    if wired:
        assert names == ["Lifecycle", "InboundGuard", "HeaderTimeout", "PreferHttp2", "Intake", "Identity",
                         "Enforce", "PauseCheck", "NetworkGuard", "Milestones", "HoldForApproval",
                         "PauseCheck(recheck)", "Budgets", "TaskLocks", "Gate", "ResponseStreaming", "Flights",
                         "WebSocketSessions", "Traffic", "BudgetSettle", "Guards", "Capture", "ReleaseBodies"]
        assert services["fleet"].milestones in pipeline.stages
    else:
        assert names == ["Lifecycle", "InboundGuard", "HeaderTimeout", "PreferHttp2", "Identity", "Enforce",
                         "NetworkGuard", "Gate", "ResponseStreaming", "Flights", "WebSocketSessions", "Traffic",
                         "ReleaseBodies"]
    assert proxy.flights is next(s for s in pipeline.stages if type(s).__name__ == "Flights")
