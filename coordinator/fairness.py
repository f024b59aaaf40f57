"""Which jobs get a batch in one dispatch round. Pure.

Higher priority goes first. Within one priority, tenants take turns (one batch per
tenant per round, however many jobs each has), and each tenant's jobs take turns across
rounds, so a tenant with ten campaigns does not get ten times the share of a tenant
with one, and transactional mail at a higher priority is never behind either.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Eligible:
    job_id: str
    tenant: str
    priority: int


def round_order(jobs: Sequence[Eligible], turn: int) -> list[str]:
    """Job ids to give one batch each in this round, in order.

    Args:
        jobs: jobs with a batch ready to go, in a stable order (e.g. submission order).
        turn: a counter the caller increases every round; it rotates which tenant goes
            first and which of a tenant's jobs is picked.
    """
    by_priority: dict[int, dict[str, list[str]]] = {}
    for job in jobs:
        by_priority.setdefault(job.priority, {}).setdefault(job.tenant, []).append(job.job_id)
    order: list[str] = []
    for priority in sorted(by_priority, reverse=True):
        tenants = sorted(by_priority[priority])
        start = turn % len(tenants)
        for tenant in tenants[start:] + tenants[:start]:
            own = by_priority[priority][tenant]
            order.append(own[turn % len(own)])
    return order
