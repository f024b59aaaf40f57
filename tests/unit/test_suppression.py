"""Which SMTP outcomes put an address on the suppression list, and its stored form."""

from __future__ import annotations

import pytest

from coordinator.model import Counts, JobState, JobStatus, Status, dump_status, load_status
from coordinator.suppression import Reason, Suppression, dump, is_hard_bounce, load, normalize


@pytest.mark.parametrize(
    ("code", "enhanced"),
    [(550, "5.1.1"), (550, "5.1.2"), (550, "5.1.10"), (553, "5.1.3"), (551, "5.1.6"),
     (550, ""), (551, ""), (553, "")],
)  # fmt: skip
def test_bad_mailbox_refusals_suppress(code: int, enhanced: str) -> None:
    # Given a permanent refusal that says the address is bad, Then it suppresses
    assert is_hard_bounce(True, code, enhanced)


@pytest.mark.parametrize(
    ("code", "enhanced"),
    [(550, "5.7.1"), (554, "5.7.1"), (550, "5.7.26"), (552, "5.2.2"), (550, "5.2.1"),
     (554, ""), (552, ""), (550, "5.1.7"), (553, "5.1.8"), (550, "5.4.4"), (550, "5.6.0"),
     (450, "4.1.1"), (451, ""), (250, "2.0.0"), (0, "")],
)  # fmt: skip
def test_policy_blocks_and_other_replies_do_not(code: int, enhanced: str) -> None:
    # Given a policy block, a full mailbox, a sender problem or no refusal at all,
    # Then the address stays sendable
    assert not is_hard_bounce(True, code, enhanced)


def test_only_refusals_the_node_reported_as_failed_count() -> None:
    # Given a 550 5.1.1 the node reported as a deferral (e.g. a relay fault) that later
    # ran out of attempts, Then it does not suppress
    assert not is_hard_bounce(False, 550, "5.1.1")


def test_addresses_are_normalised() -> None:
    assert normalize("  Ann@Example.COM ") == "ann@example.com"


def test_json_round_trip() -> None:
    bounced = Suppression("a@x.example", Reason.HARD_BOUNCE, 12.5, 550, "5.1.1", "no such user")
    manual = Suppression("b@x.example", Reason.UNSUBSCRIBE, 13.0)
    assert load(dump(bounced)) == bounced
    assert load(dump(manual)) == manual


def test_suppressed_is_final_and_counted() -> None:
    counts = Counts(total=3)
    counts.add(Status.SUPPRESSED)
    counts.add(Status.DELIVERED)
    assert Status.SUPPRESSED.final
    assert (counts.suppressed, counts.done, counts.queued) == (1, 2, 1)
    status = JobStatus(JobState.RUNNING, counts, 1.0)
    assert load_status(dump_status(status)).counts == counts


def test_status_records_from_before_suppression_load() -> None:
    raw = b'{"state":"completed","counts":[2,1,1,0,0],"updated_at":1.0,"finished_at":2.0}'
    assert load_status(raw).counts == Counts(2, 1, 1, 0, 0, 0)
