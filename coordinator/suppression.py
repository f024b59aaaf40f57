"""Per-tenant suppression lists: which replies suppress an address. Pure.

An address on its tenant's list is never sent to again: at dispatch the leader ends it
as SUPPRESSED with reason ``"suppressed: <reason>"`` instead of handing it to a node.

Which failures add an address automatically (:func:`is_hard_bounce`): the node must
have reported the recipient FAILED (a permanent refusal, not a transient failure that
ran out of attempts) with a 5xx reply, and

- when the reply carries an RFC 3463 enhanced code, it is one that says the
  *recipient's* address is bad: 5.1.0 (other address status), 5.1.1 (bad mailbox),
  5.1.2 (bad destination system), 5.1.3 (bad mailbox syntax), 5.1.6 (mailbox moved),
  5.1.10 (null MX, RFC 7505). Not 5.1.7/5.1.8 (the *sender's* address is bad), and no
  other class: 5.7.x policy blocks, 5.2.x full or disabled mailboxes, 5.3.x/5.4.x
  system and routing trouble, 5.5.x protocol errors and 5.6.x content rejections say
  nothing lasting about the address;
- when it carries none, the code is 550, 551 or 553 (mailbox unavailable, user not
  local, mailbox name not allowed). 552 and 554 are size and catch-all refusals.
"""

from __future__ import annotations

import dataclasses
import enum

BAD_ADDRESS_ENHANCED_CODES = frozenset({"5.1.0", "5.1.1", "5.1.2", "5.1.3", "5.1.6", "5.1.10"})
BAD_ADDRESS_CODES = frozenset({550, 551, 553})


class Reason(enum.StrEnum):
    HARD_BOUNCE = "hard_bounce"
    UNSUBSCRIBE = "unsubscribe"
    MANUAL = "manual"
    COMPLAINT = "complaint"


@dataclasses.dataclass(frozen=True)
class Suppression:
    """One address on a tenant's list; ``email`` is normalised (see :func:`normalize`)."""

    email: str
    reason: Reason
    created_at: float
    code: int = 0
    enhanced_code: str = ""
    text: str = ""


def normalize(email: str) -> str:
    """The form addresses are listed and looked up by: trimmed and lower-cased.

    Lower-casing the local part is not strictly RFC 5321, but no mainstream mailbox
    provider distinguishes case, and missing a suppression is worse than over-matching.
    """
    return email.strip().lower()


def is_hard_bounce(reported_failed: bool, code: int, enhanced_code: str) -> bool:
    """Whether a recipient's outcome puts its address on the suppression list.

    Args:
        reported_failed: The node reported the recipient FAILED (a permanent refusal);
            False for deliveries, deferrals and failures decided by the coordinator
            (out of attempts, expired, lost batches).
        code: The SMTP reply code, 0 when none.
        enhanced_code: The RFC 3463 code of the reply, "" when none.
    """
    if not reported_failed or not 500 <= code < 600:
        return False
    if enhanced_code:
        return enhanced_code in BAD_ADDRESS_ENHANCED_CODES
    return code in BAD_ADDRESS_CODES
