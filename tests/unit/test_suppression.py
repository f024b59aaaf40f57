"""Which SMTP outcomes put an address on the suppression list."""

from __future__ import annotations

import pytest

from coordinator.model import Counts, Status
from coordinator.suppression import is_hard_bounce, normalize


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


def test_suppressed_is_final_and_counted() -> None:
    counts = Counts(total=3)
    counts.add(Status.SUPPRESSED)
    counts.add(Status.DELIVERED)
    assert Status.SUPPRESSED.final
    assert (counts.suppressed, counts.done, counts.queued) == (1, 2, 1)
