"""How `Hooks` calls plugins: through pluggy's caller (wrappers, firstresult), awaiting async results."""

from __future__ import annotations

import hashlib
import hmac
import inspect
from collections.abc import Generator

import trio

from hookgate.hookspecs import hookimpl
from hookgate.plugin_host.components import ConfiguredComponents
from hookgate.plugin_host.hooks import Hooks
from hookgate.types import HandshakeResponse, IngressRequest, Rejection, SourceView
from tests.plugin_support import ingress_request, load_verifier

SECRET = "s3cret"


def signed(body: bytes) -> dict[str, str]:
    return {"X-Sig": hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()}


class VerdictLog:
    """A third-party wrapper around signature verification: it sees (and may change) every verdict."""

    def __init__(self, *, veto: bool = False) -> None:
        self.seen: list[list[object]] = []
        self.veto = veto

    @hookimpl(wrapper=True)
    def hookgate_verify_signature(
        self, request: IngressRequest, source: SourceView
    ) -> Generator[None, list[object], list[object]]:
        results = yield
        self.seen.append(list(results))
        if self.veto:
            return [Rejection(status=403, code="vetoed", message="by the wrapper"), *results]
        return results


def hmac_source(hooks: Hooks) -> SourceView:
    verifier = load_verifier(hooks, "acme", {"type": "hmac", "header": "X-Sig", "secret": SECRET})
    return SourceView(name="acme", verifier=verifier)


async def test_a_third_party_wrapper_wraps_the_built_in_verifier() -> None:
    wrapper = VerdictLog()
    hooks = Hooks((wrapper,))  # the built-in `hmac` verifier comes from its entry point
    hooks.register(ConfiguredComponents(), name="hookgate.core.components")
    source = hmac_source(hooks)
    good = ingress_request("acme", headers=signed(b"{}"), body=b"{}")
    bad = ingress_request("acme", headers=signed(b"{}"), body=b'{"x": 1}')

    assert await hooks.first_rejection("hookgate_verify_signature", request=good, source=source) is None
    rejection = await hooks.first_rejection("hookgate_verify_signature", request=bad, source=source)

    assert rejection is not None and rejection.code == "invalid_signature"
    (accepted, refused) = wrapper.seen
    assert accepted == []
    assert [r.code for r in refused if isinstance(r, Rejection)] == ["invalid_signature"]


async def test_what_a_wrapper_returns_is_the_result_of_the_call() -> None:
    hooks = Hooks((VerdictLog(veto=True),))
    hooks.register(ConfiguredComponents(), name="hookgate.core.components")
    good = ingress_request("acme", headers=signed(b"{}"), body=b"{}")
    source = hmac_source(hooks)
    rejection = await hooks.first_rejection("hookgate_verify_signature", request=good, source=source)
    assert rejection is not None and rejection.code == "vetoed"


class SlowCheck:
    @hookimpl
    async def hookgate_verify_signature(
        self, request: IngressRequest, source: SourceView
    ) -> Rejection | None:
        await trio.lowlevel.checkpoint()
        return Rejection(status=401, code="slow_no", message="refused after a checkpoint")


class SeesAwaitables:
    """A wrapper around an async implementation sees its coroutine, and may wrap it in its own."""

    def __init__(self) -> None:
        self.kinds: list[bool] = []
        self.finished: list[str] = []

    @hookimpl(wrapper=True)
    def hookgate_verify_signature(
        self, request: IngressRequest, source: SourceView
    ) -> Generator[None, list[object], list[object]]:
        results = yield
        self.kinds = [inspect.isawaitable(r) for r in results]
        return [self._after(r) if inspect.isawaitable(r) else r for r in results]

    async def _after(self, pending: object) -> object:
        assert inspect.isawaitable(pending)
        result = await pending
        self.finished.append(result.code if isinstance(result, Rejection) else repr(result))
        return result


async def test_a_wrapper_sees_the_awaitable_of_an_async_implementation() -> None:
    wrapper = SeesAwaitables()
    hooks = Hooks((SlowCheck(), wrapper), load_entry_points=False)
    request, source = ingress_request("acme"), SourceView("acme")
    rejection = await hooks.first_rejection("hookgate_verify_signature", request=request, source=source)
    assert wrapper.kinds == [True]
    assert wrapper.finished == ["slow_no"]
    assert rejection is not None and rejection.code == "slow_no"


class Answer:
    def __init__(self, answer: bytes | None, calls: list[str], name: str) -> None:
        self.answer, self.calls, self.name = answer, calls, name

    @hookimpl
    def hookgate_handshake(self, request: IngressRequest, source: SourceView) -> HandshakeResponse | None:
        self.calls.append(self.name)
        return None if self.answer is None else HandshakeResponse(body=self.answer)


class AsyncAnswer(Answer):
    @hookimpl
    async def hookgate_handshake(  # type: ignore[override]
        self, request: IngressRequest, source: SourceView
    ) -> HandshakeResponse | None:
        await trio.lowlevel.checkpoint()
        return Answer.hookgate_handshake(self, request, source)


async def test_first_result_hooks_stop_at_the_first_answer_and_at_an_async_implementation() -> None:
    calls: list[str] = []
    request, source = ingress_request("acme", method="GET"), SourceView("acme")
    # Registered last, called first: the sync "no opinion" lets the next one answer.
    plugins: tuple[Answer, ...] = (
        Answer(b"late", calls, "c"),
        AsyncAnswer(b"async", calls, "b"),
        Answer(None, calls, "a"),
    )
    hooks = Hooks(plugins, load_entry_points=False)
    answer = await hooks.call_first("hookgate_handshake", request=request, source=source)
    assert answer == HandshakeResponse(body=b"async")
    assert calls == ["a", "b"]

    # An async implementation ends the call even when it has no answer (its coroutine is a result).
    calls.clear()
    plugins = (Answer(b"late", calls, "b"), AsyncAnswer(None, calls, "a"))
    hooks = Hooks(plugins, load_entry_points=False)
    assert await hooks.call_first("hookgate_handshake", request=request, source=source) is None
    assert calls == ["a"]
