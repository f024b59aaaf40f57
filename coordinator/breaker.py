"""A per-node circuit breaker as a small state machine on (state, event, now). Pure.

Closed counts consecutive failures; at the threshold it opens. Open admits nothing
until reset_timeout has passed, then it is half-open and admits exactly one trial
(a gate, unlike a plain breaker that lets every concurrent caller through). The trial's
success closes it; its failure opens it again. Open never returns to closed without
passing through half-open, except by an operator's reset.
"""

from __future__ import annotations

import dataclasses
import enum


class State(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclasses.dataclass
class Breaker:
    failure_threshold: int = 5
    reset_timeout_s: float = 10.0
    state: State = State.CLOSED
    failures: int = 0
    opened_at: float = 0.0
    trial_in_flight: bool = False

    def current(self, now: float) -> State:
        """The state as of now (an open breaker whose timeout passed reads half-open)."""
        if self.state is State.OPEN and now - self.opened_at >= self.reset_timeout_s:
            self.state = State.HALF_OPEN
            self.trial_in_flight = False
        return self.state

    def admits(self, now: float) -> bool:
        """Whether a new batch may go to the node now."""
        state = self.current(now)
        return state is State.CLOSED or (state is State.HALF_OPEN and not self.trial_in_flight)

    def on_dispatch(self, now: float) -> None:
        """A batch was given to the node; in half-open it is the one trial."""
        if self.current(now) is State.HALF_OPEN:
            self.trial_in_flight = True

    def on_success(self, now: float) -> None:
        state = self.current(now)
        if state is State.HALF_OPEN or state is State.CLOSED:
            self.state = State.CLOSED
            self.failures = 0
            self.trial_in_flight = False

    def on_failure(self, now: float) -> None:
        state = self.current(now)
        if state is State.HALF_OPEN:
            self._open(now)
        elif state is State.CLOSED:
            self.failures += 1
            if self.failures >= self.failure_threshold:
                self._open(now)

    def reset(self) -> None:
        """An operator's reset: closed, counters cleared."""
        self.state = State.CLOSED
        self.failures = 0
        self.trial_in_flight = False

    def _open(self, now: float) -> None:
        self.state = State.OPEN
        self.opened_at = now
        self.trial_in_flight = False
