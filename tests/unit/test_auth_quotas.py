"""Tokens, the auth file and quotas: the pure parts of issue 6's tenants and tokens."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from coordinator.auth import (
    Principal,
    bearer_token,
    hash_token,
    load_auth_file,
    main,
    new_token,
    parse_auth,
    token_matches,
)
from coordinator.quotas import QuotaExceeded, Quotas, check_job_size, window_retry_after

DEFAULT = Quotas(max_active_jobs=3)


def _file(tenant_token: str, admin_token: str) -> dict[str, object]:
    return {
        "tenants": {
            "acme": {"tokens": [hash_token(tenant_token)], "quotas": {"messages_per_hour": 10}},
            "beta": {"tokens": []},
        },
        "admins": [hash_token(admin_token)],
    }


def test_hash_is_sha256_hex_of_the_token() -> None:
    assert hash_token("abc") == "sha256:" + hashlib.sha256(b"abc").hexdigest()
    assert token_matches("abc", hash_token("abc"))
    assert not token_matches("abd", hash_token("abc"))


def test_new_tokens_are_random_and_prefixed() -> None:
    a, b = new_token(), new_token()
    assert a != b and a.startswith("mlr_") and len(a) > 40


@pytest.mark.parametrize(
    ("metadata", "token"),
    [
        ([("authorization", "Bearer t1")], "t1"),
        ([("authorization", "bearer t1 ")], "t1"),
        ([("Authorization", "Bearer t1")], "t1"),
        ([], None),
        ([("authorization", "t1")], None),
        ([("authorization", "Basic dTpw")], None),
        ([("authorization", "Bearer ")], None),
        ([("authorization", "Bearer a"), ("authorization", "Bearer b")], None),
    ],
)
def test_bearer_token(metadata: list[tuple[str, str]], token: str | None) -> None:
    assert bearer_token(metadata) == token


def test_identify_tenants_admins_and_strangers() -> None:
    # Given an auth file with one tenant token and one admin token
    auth = parse_auth(_file("tenant-secret", "admin-secret"), DEFAULT)
    # Then each token maps to its principal, anything else to None
    assert auth.identify([("authorization", "Bearer tenant-secret")]) == Principal("acme")
    assert auth.identify([("authorization", "Bearer admin-secret")]) == Principal("", admin=True)
    assert auth.identify([("authorization", "Bearer nope")]) is None
    assert auth.identify([]) is None
    # And quotas: the file's where given, the defaults elsewhere
    assert auth.quotas_for("acme", DEFAULT) == Quotas(messages_per_hour=10, max_active_jobs=3)
    assert auth.quotas_for("beta", DEFAULT) == DEFAULT
    assert auth.quotas_for("unknown", DEFAULT) == DEFAULT


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"tenant": {}}, "auth file: unknown keys ['tenant']"),
        ({"tenants": {"Acme": {"tokens": []}}}, "tenants.Acme: tenant ids are"),
        ({"tenants": {"a/b": {"tokens": []}}}, "tenants.a/b: tenant ids are"),
        ({"tenants": {"a": {"tokens": ["mlr_plaintoken"]}}}, "tenants.a.tokens[0]: is not a"),
        ({"tenants": {"a": {"tokens": "x"}}}, "tenants.a.tokens: must be a list"),
        ({"tenants": {"a": {"quotas": {"per_day": 1}}}}, "tenants.a: unknown quotas"),
        ({"tenants": {"a": {"quotas": {"max_active_jobs": -1}}}}, "max_active_jobs: must be"),
        ({"admins": ["sha256:xyz"]}, "admins[0]: is not a sha256"),
        ({"tenants": {"a": {"bounce_domain": "not a domain"}}}, "a.bounce_domain: must be"),
        ({"tenants": {"a": {"bounce_domain": 7}}}, "a.bounce_domain: must be"),
    ],
)
def test_bad_auth_files_are_refused_without_echoing_secrets(
    raw: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError) as info:
        parse_auth(raw, DEFAULT)
    assert message in str(info.value)
    assert "mlr_plaintoken" not in str(info.value)


def test_a_tenant_may_have_its_own_bounce_domain() -> None:
    raw = {"tenants": {"a": {"bounce_domain": "Bounces.A.Example"}, "b": {}}}
    auth = parse_auth(raw, DEFAULT)
    assert auth.bounce_domain_for("a") == "bounces.a.example"
    assert auth.bounce_domain_for("b") == auth.bounce_domain_for("nobody") == ""
    assert auth.bounce_domains() == frozenset({"bounces.a.example"})


def test_a_token_may_not_belong_to_two_tenants_or_be_an_admin_too() -> None:
    h = hash_token("t")
    with pytest.raises(ValueError, match="two tenants"):
        parse_auth({"tenants": {"a": {"tokens": [h]}, "b": {"tokens": [h]}}}, DEFAULT)
    with pytest.raises(ValueError, match="both an admin"):
        parse_auth({"tenants": {"a": {"tokens": [h]}}, "admins": [h]}, DEFAULT)


def test_load_json_and_toml(tmp_path: Path) -> None:
    (tmp_path / "auth.json").write_text(json.dumps(_file("t", "a")))
    (tmp_path / "auth.toml").write_text(
        f'admins = ["{hash_token("a")}"]\n[tenants.acme]\ntokens = ["{hash_token("t")}"]\n'
    )
    for name in ("auth.json", "auth.toml"):
        auth = load_auth_file(tmp_path / name, DEFAULT)
        assert auth.identify([("authorization", "Bearer t")]) == Principal("acme")
    (tmp_path / "bad.json").write_text('{"admins": ["mlr_secret"')
    with pytest.raises(ValueError) as info:
        load_auth_file(tmp_path / "bad.json", DEFAULT)
    assert "mlr_secret" not in str(info.value)


def test_hash_command_prints_a_token_and_its_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["hash", "--tenant", "acme"]) == 0
    out = capsys.readouterr().out.splitlines()
    token = out[0].removeprefix("token: ")
    assert out[1] == f'tenants["acme"].tokens: "{hash_token(token)}"'


# ---- quotas ------------------------------------------------------------------------------


def test_job_size() -> None:
    q = Quotas(max_recipients_per_job=5, messages_per_hour=100, max_active_jobs=2)
    check_job_size(q, 5)
    with pytest.raises(QuotaExceeded) as info:
        check_job_size(q, 6)
    assert (str(info.value), info.value.retry_after_s) == (
        "quota: more than 5 recipients in one job",
        None,
    )
    # 0 is unlimited
    check_job_size(Quotas(), 10**9)


def test_window_retry_waits_for_enough_room() -> None:
    # Given 3 recipients accepted in each of the minutes starting at 0, 60 and 120
    minutes = [(0.0, 3), (60.0, 3), (120.0, 3)]
    # When 4 must leave the window at t=300: the minutes of 0 and 60 must have left it
    assert window_retry_after(minutes, 4, now=300.0) == pytest.approx(3600.0 + 60.0 - 300.0)
    # And when nothing leaves soon enough, a whole window
    assert window_retry_after(minutes, 10, now=300.0) == 3600.0
    # And never less than a second
    assert window_retry_after(minutes, 1, now=3600.0) == 1.0
