"""Bursts at the intake: while mail arrives faster than the workers could ever take it in,
they wait, for a bounded time, and the intake has the machine.

The pipeline takes in some tens of records a second; the SMTP intake stores thousands. In
a burst far above what the pipeline can follow, the backlog grows whatever the pipeline
does, so working it off during the burst only takes CPU, cache and disk from the sessions
being answered (measured in bench/intake.py: `broker serve` kept 0.77x of a bare sink
against 0.83x for its intake alone; with the workers waiting, the two were level). The
stored mail is safe in the spool meanwhile, and the workers start on it the moment the
burst ends, or after ``longest`` seconds if it does not: a flood that outlasts that gets
no more waiting until the intake is quiet again, so nothing waits without bound.

Pure: the caller supplies the clock. One arrival is one stored message.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

# Arrivals are counted over this many seconds: short enough that the workers start
# within a fifth of a second of the burst's end.
WINDOW = 0.2


class BurstDeferral:
    """Whether the workers should wait now. ``rate``: stored messages per second above
    which the intake is in a burst; ``longest``: seconds one burst may keep them waiting."""

    def __init__(self, rate: float, longest: float, *, window: float = WINDOW,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0 or longest <= 0 or window <= 0:
            raise ValueError("rate, longest and window must be positive")
        self.window = window
        self.longest = longest
        self._clock = clock
        # The last `count` arrivals: a burst when all of them fall within the window.
        self.count = max(1, round(rate * window))
        self._arrivals: deque[float] = deque(maxlen=self.count)
        self._since: float | None = None  # when the current burst began

    def arrived(self) -> None:
        """A message was stored (any thread: a deque append is atomic)."""
        now = self._clock()
        arrivals = self._arrivals
        if arrivals and now - arrivals[-1] > self.window:
            # A quiet gap: whatever burst there was has ended, even if nobody asked
            # `defer` during the gap.
            self._since = None
        arrivals.append(now)

    def in_burst(self) -> bool:
        """True while the last ``count`` arrivals all fall within the window."""
        now = self._clock()
        arrivals = self._arrivals
        try:
            oldest = arrivals[0]
        except IndexError:
            return False
        return len(arrivals) == self.count and now - oldest <= self.window

    def defer(self) -> bool:
        """True when the workers should wait a moment before their next round."""
        if not self.in_burst():
            self._since = None
            return False
        now = self._clock()
        if self._since is None:
            self._since = now
        return now - self._since < self.longest
