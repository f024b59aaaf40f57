"""The ``mailers`` command's connection settings, contexts, output formats and shell
completion (``mailers.config``, ``mailers.output``, ``mailers.cli``), without a cluster."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from mailers.cli import build_parser, main
from mailers.config import DEFAULT_COORDINATORS, ConfigError, ConfigFile, resolve
from mailers.output import Column, dump, print_table, table

JOB_ID = "01a24801d936-7a24a49d"


@pytest.fixture
def config_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A config file of the test's own, and none of the user's variables."""
    for name in ("MAILER_COORDINATORS", "MAILER_CONTEXT", "MAILER_TOKEN", "MAILER_TLS_CA",
                 "MAILER_TLS_CERT", "MAILER_TLS_KEY", "MAILER_TLS_SERVER_NAME"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MAILERS_CONFIG", str(tmp_path / "config.toml"))
    return {"MAILERS_CONFIG": str(tmp_path / "config.toml")}


def test_contexts_are_made_listed_chosen_and_removed(
    config_env: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    token = tmp_path / "prod.token"
    token.write_text("s3cret\n")
    # When two contexts are set up through the command
    assert main(["config", "set-context", "prod", "--coordinators", "p:1,p:2",
                 "--token-file", str(token)]) == 0  # fmt: skip
    assert main(["config", "set-context", "stage", "--coordinators", "s:1"]) == 0
    capsys.readouterr()
    # Then the first became current, and the file is private
    assert main(["config", "get-contexts"]) == 0
    assert capsys.readouterr().out == "* prod  p:1,p:2\n  stage  s:1\n"
    assert (Path(config_env["MAILERS_CONFIG"]).stat().st_mode & 0o777) == 0o600
    ns = build_parser().parse_args(["jobs"])
    conn = resolve(ns, config_env)
    assert conn.coordinators == ("p:1", "p:2") and conn.token == "s3cret"
    # And --context, MAILER_CONTEXT and use-context choose another
    ns = build_parser().parse_args(["--context", "stage", "jobs"])
    assert resolve(ns, config_env).coordinators == ("s:1",)
    ns = build_parser().parse_args(["jobs"])
    assert resolve(ns, {**config_env, "MAILER_CONTEXT": "stage"}).coordinators == ("s:1",)
    assert main(["config", "use-context", "stage"]) == 0
    assert ConfigFile.load(config_env).current == "stage"
    assert main(["config", "delete-context", "stage"]) == 0
    assert set(ConfigFile.load(config_env).contexts) == {"prod"}


def test_a_setting_comes_from_flag_then_variable_then_context_then_default(
    config_env: dict[str, str],
) -> None:
    assert main(["config", "set-context", "prod", "--coordinators", "ctx:1"]) == 0
    parse = build_parser().parse_args
    env = {**config_env, "MAILER_COORDINATORS": "env:1, env:2"}
    # The flag may come before or after the subcommand's name
    assert resolve(parse(["--coordinators", "f:1", "jobs"]), env).coordinators == ("f:1",)
    assert resolve(parse(["jobs", "--coordinators", "f:2"]), env).coordinators == ("f:2",)
    assert resolve(parse(["jobs"]), env).coordinators == ("env:1", "env:2")
    assert resolve(parse(["jobs"]), config_env).coordinators == ("ctx:1",)
    empty = {"MAILERS_CONFIG": str(Path(config_env["MAILERS_CONFIG"]).with_name("none.toml"))}
    assert resolve(parse(["jobs"]), empty).coordinators == DEFAULT_COORDINATORS
    with pytest.raises(ConfigError, match="--coordinators: no address"):
        resolve(parse(["jobs", "--coordinators", " , "]), config_env)


def test_an_unknown_context_is_a_usage_error_on_stderr(
    config_env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--context", "nope", "jobs"]) == 2
    captured = capsys.readouterr()
    assert "no context 'nope'" in captured.err and captured.out == ""


def test_output_before_or_after_the_subcommand() -> None:
    parse = build_parser().parse_args
    assert parse(["-o", "yaml", "jobs"]).output == "yaml"
    assert parse(["jobs", "-o", "wide"]).output == "wide"
    assert parse(["jobs", "--json"]).json is True
    assert parse(["jobs"]).output == "table"


def test_a_table_never_cuts_an_identifier_or_a_number() -> None:
    # Given a listing far wider than an 80-column terminal
    columns = [Column("job"), Column("name", text=True), Column("state"),
               Column("total", right=True), Column("delivered", right=True),
               Column("created", wide=True)]  # fmt: skip
    rows = [[JOB_ID, "a very long campaign name " * 3, "running", "1000000", "999999",
             "2026-12-05 21:00:00"]]  # fmt: skip
    for wide in (False, True):
        out = io.StringIO()
        # When it is printed at 80 columns
        print_table(table(columns, rows, wide), Console(file=out, width=80))
        text = out.getvalue()
        # Then every whole cell is there, uncut, and only the name wrapped
        for cell in (JOB_ID, "running", "1000000", "999999"):
            assert cell in text, text
        assert "…" not in text
        assert ("2026-12-05 21:00:00" in text) is wide


def test_json_and_yaml_documents() -> None:
    data = {"job_id": JOB_ID, "total": 3, "tags": ["a", "é"]}
    assert json.loads(dump(data, "json")) == data
    assert yaml.safe_load(dump(data, "yaml")) == data


def _complete(line: str) -> list[str]:
    """What bash completes ``line`` to, through the script ``mailers completion bash``
    prints (run by a real bash, with this environment's ``mailers`` on PATH)."""
    script = (
        'eval "$(mailers completion bash)"; '
        'COMP_LINE=$LINE; COMP_POINT=${#COMP_LINE}; read -ra COMP_WORDS <<< "$LINE"; '
        '[[ "$LINE" == *" " ]] && COMP_WORDS+=(""); COMP_CWORD=$((${#COMP_WORDS[@]} - 1)); '
        '_python_argcomplete mailers; printf "%s\\n" "${COMPREPLY[@]}"'
    )
    bindir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ.get('PATH', '')}", "LINE": line}
    done = subprocess.run(
        ["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return sorted(w.strip() for w in done.stdout.splitlines() if w.strip())


def test_the_completion_script_completes_commands_actions_options_and_contexts(
    config_env: dict[str, str],
) -> None:
    assert main(["config", "set-context", "production", "--coordinators", "p:1"]) == 0
    assert _complete("mailers jo") == ["job", "jobs"]
    assert _complete("mailers job pa") == ["pause"]
    assert _complete("mailers jobs -o y") == ["yaml"]
    assert _complete("mailers --context pro") == ["production"]
