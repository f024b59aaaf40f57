"""``RelayPool`` against Postfix's ``smtp-sink``, a relay implementation that is not ours.

Each test runs twice: with ``smtp-sink`` advertising PIPELINING (its default; the pool
pipelines) and with ``-p`` (it does not; the pool waits for each reply). ``-d`` dumps
every transaction it accepts to a file, dot-unstuffed, so the tests read back exactly
what arrived. Faults come from ``smtp-sink``'s own options (``-q``: disconnect without
replying, ``-Q``: 421 and disconnect, ``-f``: a 5xx, which implies ``-p``).

``smtp-sink`` comes with Debian's ``postfix`` package (``bash dev.sh bench`` installs
it). Without it the tests are skipped locally and fail in CI (``CI`` set).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mailers_dev.procs import free_port, wait_for_port
from sender_node.classify import Failure, Outcome, Phase, classify
from sender_node.smtp_client import RelayPool, SendOutcome
from tests.helpers import assert_eventually, unavailable

FROM = "news@example.com"


def _binary() -> str:
    found = shutil.which("smtp-sink") or shutil.which("smtp-sink", path="/usr/sbin:/usr/bin")
    if found is None:
        unavailable(
            "smtp-sink is not installed (apt-get install postfix)",
            "smtp-sink is not installed on this CI machine (Debian package postfix)",
        )
    return found


@dataclasses.dataclass
class PostfixSink:
    address: str
    dumps: Path
    """One file per accepted transaction (smtp-sink ``-d``)."""

    def transactions(self) -> list[str]:
        """What each accepted transaction carried (a transaction abandoned before DATA
        leaves an empty file: skipped)."""
        dumped = [p.read_text(errors="replace") for p in sorted(self.dumps.iterdir())]
        return [text for text in dumped if text]


StartPostfix = Callable[..., PostfixSink]


@pytest.fixture(params=[True, False], ids=["pipelined", "unpipelined"])
def pipelining(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


@pytest.fixture
def postfix(pipelining: bool) -> Iterator[StartPostfix]:
    binary = _binary()
    started: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(*options: str) -> PostfixSink:
        port = free_port()
        # smtp-sink drops to user postfix when started as root: the dump directory must
        # be reachable for it, which pytest's private tmp_path is not.
        dumps = Path(tempfile.mkdtemp(prefix="mailers-smtp-sink-"))
        dumps.chmod(0o777)
        argv = [binary, *(["-u", "postfix"] if os.geteuid() == 0 else [])]
        argv += [*([] if pipelining else ["-p"]), *options, "-d", f"{dumps}/%H%M%S."]
        argv += [f"127.0.0.1:{port}", "64"]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started.append((proc, dumps))
        wait_for_port(port, 10, proc)
        return PostfixSink(f"127.0.0.1:{port}", dumps)

    yield start
    for proc, dumps in started:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        shutil.rmtree(dumps, ignore_errors=True)


@pytest.fixture
async def pools() -> AsyncIterator[Callable[..., RelayPool]]:
    made: list[RelayPool] = []

    def make(address: str, **kwargs: Any) -> RelayPool:
        pool = RelayPool([address], timeout_s=5.0, final_reply_timeout_s=5.0, **kwargs)
        made.append(pool)
        return pool

    yield make
    for pool in made:
        await pool.close()


def verdict(outcome: SendOutcome) -> Outcome:
    return classify(outcome.code, outcome.text, outcome.phase, outcome.failure).outcome


BODY = (
    b"From: news@example.com\r\nSubject: dots\r\nMessage-ID: <pf@example.com>\r\n\r\n"
    b".leading dot\r\n..two dots\r\n.\r\nbare LF line\nend"
)


async def test_messages_arrive_intact_over_one_connection(
    postfix: StartPostfix, pools: Callable[..., RelayPool]
) -> None:
    # Given smtp-sink and a pool
    sink = postfix()
    pool = pools(sink.address)

    # When a message with lines starting with dots is sent, then a group of three
    first = await pool.send(FROM, "a@example.org", BODY)
    group = await pool.send_group(FROM, ["b@x.org", "c@x.org", "d@x.org"], b"Subject: g\r\n\r\nhi")

    # Then each was delivered, on one pooled connection
    assert [(o.code, o.phase) for o in [first, *group]] == [(250, Phase.DATA_END)] * 4
    assert pool.relays()[0].open_connections == 1
    await assert_eventually(lambda: len(sink.transactions()) == 2, timeout_s=5)
    # (dump names are the second plus a random suffix: told apart by content, not order)
    single, shared = sorted(sink.transactions(), key=lambda t: "<a@example.org>" not in t)
    # And the body arrived exactly as given (dot-stuffing undone by the relay, CRLF
    # normalised), with the envelope the pool declared
    assert single.endswith(
        "Subject: dots\nMessage-ID: <pf@example.com>\n\n"
        ".leading dot\n..two dots\n.\nbare LF line\nend\n\n"
    )
    assert "X-Mail-Args: <news@example.com>\n" in single
    assert "X-Rcpt-Args: <a@example.org>\n" in single
    assert [line for line in shared.splitlines() if line.startswith("X-Rcpt-Args")] == [
        "X-Rcpt-Args: <b@x.org>",
        "X-Rcpt-Args: <c@x.org>",
        "X-Rcpt-Args: <d@x.org>",
    ]


async def test_disconnect_after_the_final_dot_is_ambiguous(
    postfix: StartPostfix, pools: Callable[..., RelayPool]
) -> None:
    # Given smtp-sink hanging up, without a reply, when it receives the final dot
    sink = postfix("-q", ".")
    outcome = await pools(sink.address).send(FROM, "a@example.org", BODY)
    assert (outcome.phase, outcome.failure, verdict(outcome)) == (
        Phase.DATA_END,
        Failure.DISCONNECTED,
        Outcome.AMBIGUOUS,
    )


async def test_421_at_rcpt_is_a_transient_relay_fault(
    postfix: StartPostfix, pools: Callable[..., RelayPool]
) -> None:
    # Given smtp-sink answering RCPT with 421 and hanging up
    sink = postfix("-Q", "RCPT")
    outcomes = await pools(sink.address).send_group(FROM, ["a@x.org", "b@x.org"], BODY)
    # Then both recipients are deferred, nothing delivered
    assert [(o.code, o.phase, verdict(o)) for o in outcomes] == [
        (421, Phase.RCPT, Outcome.TRANSIENT)
    ] * 2
    assert classify(421, outcomes[0].text, Phase.RCPT).relay_fault
    assert sink.transactions() == []


async def test_hard_rejects_fail_the_recipients(
    postfix: StartPostfix, pools: Callable[..., RelayPool], pipelining: bool
) -> None:
    if pipelining:
        pytest.skip("smtp-sink -f implies -p: no PIPELINING with hard rejects")
    # Given smtp-sink rejecting every RCPT with a 5xx
    sink = postfix("-f", "RCPT")
    pool = pools(sink.address)
    outcomes = await pool.send_group(FROM, ["a@x.org", "b@x.org"], BODY)
    # Then each recipient fails permanently at RCPT, no DATA was sent
    assert {(o.phase, verdict(o)) for o in outcomes} == {(Phase.RCPT, Outcome.PERMANENT)}
    assert all(500 <= o.code < 600 for o in outcomes)
    # And the connection stays usable (RSET first, then the next transaction)
    again = await pool.send(FROM, "c@x.org", BODY)
    assert (again.phase, verdict(again)) == (Phase.RCPT, Outcome.PERMANENT)
    assert pool.relays()[0].open_connections == 1
