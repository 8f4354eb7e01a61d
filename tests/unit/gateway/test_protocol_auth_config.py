import hashlib

import pytest

from gateway.auth import ANONYMOUS, ApiKey, Authenticator, RateLimiter
from gateway.config import AuthSection, GatewayConfig, load_gateway_config
from gateway.protocol import CHAT_ROUTE, COMPLETIONS_ROUTE, parse_request
from unbroken.config import ConfigError
from unbroken.errors import (
    AuthenticationError,
    InvalidRequestError,
    PermissionDeniedError,
    RateLimitError,
    ValidationError,
)

CHAT = {"model": "qwen", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("patch,err,param", [
    ({"max_tokens": "5"}, ValidationError, "max_tokens"),
    ({"max_tokens": 0}, ValidationError, "max_tokens"),
    ({"max_tokens": True}, ValidationError, "max_tokens"),
    ({"temperature": 3}, ValidationError, "temperature"),
    ({"stream": "yes"}, ValidationError, "stream"),
    ({"messages": "hi"}, ValidationError, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, ValidationError, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, ValidationError, "messages[0].content"),
    ({"model": 7}, ValidationError, "model"),
    ({"stop": [1]}, ValidationError, "stop"),
    ({"n": 0}, ValidationError, "n"),
    ({"resume_token_ids": [1]}, InvalidRequestError, "resume_token_ids"),
])
def test_bad_chat_bodies_name_the_field(patch, err, param) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(err) as ei:
        parse_request(CHAT_ROUTE, {**CHAT, **patch}, {}, None)
    assert ei.value.param == param
    assert 400 <= ei.value.status < 500


def test_good_requests_parse() -> None:
    r = parse_request(CHAT_ROUTE, {**CHAT, "stream": True, "max_tokens": 9, "user": "u1"},
                      {"X-Priority": "critical"}, None)
    assert (r.stream, r.max_tokens, r.priority, r.session_key, r.transferable) == (True, 9, "critical", "u1", True)
    r = parse_request(CHAT_ROUTE, CHAT, {"X-Session-ID": "  s "}, None)
    assert r.session_key == "s"  # blanks stripped, as the replica does
    r = parse_request(COMPLETIONS_ROUTE, {"prompt": ["a"]}, {}, "qwen")
    assert r.model == "qwen" and r.openai.prompt_text == "a"
    for bad, param in (({**CHAT, "n": 2}, "n"), ({"model": "q", "prompt": ["a", "b"]}, "prompt")):
        route = CHAT_ROUTE if "messages" in bad else COMPLETIONS_ROUTE
        with pytest.raises(InvalidRequestError) as ei:
            parse_request(route, bad, {}, None)
        assert ei.value.param == param and ei.value.status == 400
    r = parse_request(CHAT_ROUTE, {**CHAT, "model": "qwen:sql"}, {}, None)
    assert r.adapter == "sql" and r.base_model == "qwen"
    with pytest.raises(InvalidRequestError):
        parse_request(CHAT_ROUTE, CHAT, {"X-Priority": "urgent"}, None)
    with pytest.raises(InvalidRequestError):
        parse_request(COMPLETIONS_ROUTE, {"model": "qwen"}, {}, None)


def _auth(**kw) -> Authenticator:  # type: ignore[no-untyped-def]
    h = hashlib.sha256(b"k1").hexdigest()
    return Authenticator(AuthSection.model_validate({
        "enabled": True, "api_keys": [{"name": "team", "sha256": h, "requests_per_minute": 2}],
        "admin_key_sha256": hashlib.sha256(b"adm").hexdigest(), **kw}))


def test_authentication_and_admin() -> None:
    a = _auth()
    assert a.authenticate("Bearer k1").name == "team"
    for bad in (None, "", "Bearer", "Basic k1", "Bearer k2"):
        with pytest.raises(AuthenticationError):
            a.authenticate(bad)
    a.check_admin("Bearer adm")
    with pytest.raises(PermissionDeniedError):
        a.check_admin("Bearer k1")
    with pytest.raises(AuthenticationError):
        a.check_admin(None)
    assert Authenticator(AuthSection()).authenticate(None) is ANONYMOUS
    with pytest.raises(PermissionDeniedError):
        _auth(admin_key_sha256="").check_admin("Bearer adm")


def test_rate_limits_per_minute() -> None:
    now = [120.0]
    lim = RateLimiter(clock=lambda: now[0])
    key = ApiKey("t", requests_per_minute=2, tokens_per_minute=100)
    lim.admit(key)
    lim.admit(key)
    with pytest.raises(RateLimitError) as ei:
        lim.admit(key)
    assert ei.value.code == "requests_per_minute" and 0 < ei.value.retry_after_s <= 60
    now[0] += 60
    lim.admit(key)
    lim.add_tokens(key, 100)
    with pytest.raises(RateLimitError) as ei:
        lim.admit(key)
    assert ei.value.code == "tokens_per_minute"


def test_config_fails_on_bad_values_with_the_field_name() -> None:
    with pytest.raises(ConfigError, match="health.heartbeat_interval_ms"):
        load_gateway_config(None, {"health.heartbeat_interval_ms": -1}, environ={})
    with pytest.raises(ConfigError, match="supported: least_load, power_of_two, round_robin"):
        load_gateway_config(None, {"routing.policy": "best"}, environ={})
    with pytest.raises(ConfigError, match="sha256"):
        load_gateway_config(None, {"auth.api_keys": [{"name": "x", "sha256": "abc"}]}, environ={})
    cfg = load_gateway_config(None, environ={"UNBROKEN_GATEWAY__ROUTING__POLICY": "round_robin"})
    assert cfg.routing.policy == "round_robin"
    assert load_gateway_config("configs/gateway.yaml", environ={}) == GatewayConfig()
