"""The progress lines a person reads while a job runs (`lungray.progress`, shown without --verbose)."""

from __future__ import annotations

import logging
import time

PROGRESS_LOGGER = "lungray.progress"
log = logging.getLogger(PROGRESS_LOGGER)


def duration(seconds: float) -> str:
    """`7 s`, `3 min 14 s`, `2 h 05 min`."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class Progress:
    """A screening run's line: `screen: 4,000 of 12,000 to score (33%), listing done · 41.2 files/s · about 3 min 14 s left`."""

    def __init__(self) -> None:
        self.started = time.time()
        self.listed = self.to_score = self.done = 0
        self.listing_done = False

    def report(self) -> str:
        elapsed = max(time.time() - self.started, 1e-9)
        rate = self.done / elapsed
        share = f" ({100 * self.done / self.to_score:.0f}%)" if self.to_score else ""
        listing = "listing done" if self.listing_done else "still listing"
        line = f"screen: {self.done:,} of {self.to_score:,} to score{share}, {self.listed:,} listed, {listing} · {rate:.1f} files/s"
        if self.listing_done and rate > 0 and self.done < self.to_score:
            line += f" · about {duration((self.to_score - self.done) / rate)} left"
        log.info(line)
        return line
