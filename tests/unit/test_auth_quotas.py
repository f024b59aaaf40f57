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
from coordinator.quotas import (
    ACTIVE_JOBS_RETRY_S,
    HourlyWindow,
    QuotaExceeded,
    Quotas,
    check_active_jobs,
    check_job_size,
)

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
    ],
)
def test_bad_auth_files_are_refused_without_echoing_secrets(
    raw: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError) as info:
        parse_auth(raw, DEFAULT)
    assert message in str(info.value)
    assert "mlr_plaintoken" not in str(info.value)


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


def test_job_size_and_active_jobs() -> None:
    q = Quotas(max_recipients_per_job=5, messages_per_hour=100, max_active_jobs=2)
    check_job_size(q, 5)
    with pytest.raises(QuotaExceeded) as info:
        check_job_size(q, 6)
    assert (str(info.value), info.value.retry_after_s) == (
        "quota: more than 5 recipients in one job",
        None,
    )
    check_active_jobs(q, 1)
    with pytest.raises(QuotaExceeded) as info:
        check_active_jobs(q, 2)
    assert info.value.retry_after_s == ACTIVE_JOBS_RETRY_S
    # 0 is unlimited
    check_job_size(Quotas(), 10**9)
    check_active_jobs(Quotas(), 10**6)


def test_hourly_window_slides_with_a_fake_clock() -> None:
    # Given a tenant allowed 100 messages an hour
    q = Quotas(messages_per_hour=100)
    w = HourlyWindow()
    # When it sends 60 at t=0 and 40 at t=600
    w.reserve("a", q, 60, now=0.0)
    w.reserve("a", q, 40, now=600.0)
    # Then one more at t=1000 is refused until the first 60 leave the window (t=3600)
    with pytest.raises(QuotaExceeded) as info:
        w.reserve("a", q, 1, now=1000.0)
    assert info.value.retry_after_s == pytest.approx(2600.0)
    assert str(info.value) == "quota: 100 recipients per hour; 100 used in the last hour"
    # And other tenants are not affected
    w.reserve("b", q, 100, now=1000.0)
    # And once the window has slid, it fits again
    w.reserve("a", q, 60, now=3600.0)
    assert w.used("a", 3600.0) == 100
    # And a reservation can be released (a commit that did not happen)
    w.release("a", 60, at=3600.0)
    assert w.used("a", 3600.0) == 40


def test_hourly_retry_waits_for_enough_room() -> None:
    q = Quotas(messages_per_hour=10)
    w = HourlyWindow()
    for t in (0.0, 100.0, 200.0):
        w.reserve("a", q, 3, now=t)
    # 9 used; 5 more need 4 freed: the entries of t=0 and t=100 must leave
    with pytest.raises(QuotaExceeded) as info:
        w.reserve("a", q, 5, now=300.0)
    assert info.value.retry_after_s == pytest.approx(3600.0 + 100.0 - 300.0)
    with pytest.raises(QuotaExceeded) as info:
        w.reserve("a", q, 11, now=300.0)
    assert info.value.retry_after_s is None
