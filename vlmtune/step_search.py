"""The largest step that fits a memory cap: doubling (or a probe aimed by the last two), then bisection.

Pure logic, no model: ``measure(size)`` runs (or fakes) a training step of ``size`` (a batch size, or a token
budget) and returns its peak memory in bytes, or ``None`` when it ran out of memory. Memory grows with the step,
so the sizes that fit are a prefix: doubling from the smallest size finds a size that does not fit, and bisection
between the last fit and the first miss finds the largest fit to within ``granularity``. ``vlmtune.step_probe``
supplies the real measure (a forward, backward and optimiser step on the longest samples of the data).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

GIB = 2**30
PREDICT_MARGIN = 0.03
"""With ``predict``: the probe aims this share below where the line puts the cap."""
LONG_STRIDE = 4
"""With ``predict``: the growth of a probe over the last fit while the line puts the cap (less the margin) at least
that far away; doubling otherwise. On the probe curves of Qwen2.5-VL-7B and Gemma-3-4B measured on an H200 (24 GiB),
the small probes' lines put the cap beyond the next two doublings: this stride takes 5 probes where doubling took 8."""


class NothingFits(ValueError):
    """Not even the smallest step fits the memory cap."""


@dataclass
class SearchResult:
    """The size chosen and every probe on the way.

    Attributes:
        size: the largest size that fit.
        peak_bytes: its probe's peak memory.
        probes: ``(size, peak bytes or None for out of memory)`` in the order they ran.
    """

    size: int
    peak_bytes: int
    probes: list[tuple[int, int | None]] = field(default_factory=list)


def largest_fitting(
    measure: Callable[[int], int | None],
    cap_bytes: int,
    smallest: int,
    largest: int,
    granularity: int = 1,
    describe: Callable[[int], str] = str,
    what: str = "step",
    tolerance: float = 0.0,
    predict: bool = False,
) -> SearchResult:
    """The largest size in ``[smallest, largest]`` whose ``measure`` is at most ``cap_bytes``.

    Args:
        measure: peak bytes of a step of that size, ``None`` when it ran out of memory.
        cap_bytes: the most a step may use.
        smallest: the first size tried; it must fit.
        largest: no size above it is tried (the data's size: a step cannot hold more).
        granularity: the search stops when the gap between a fit and a miss is at most this.
        tolerance: ... or at most this share of the last fit (``0.125``: within 1/8 of the largest fit, which
            saves the last probes, each as large as the step; ``0``: to within ``granularity``).
        predict: once two sizes fit, aim the next probe just short of where the line through their peaks reaches
            ``cap_bytes`` (when that is before the doubled size), grow by :data:`LONG_STRIDE` instead of doubling
            while the line puts the cap beyond that, and stop where the line puts the cap within the tolerance of
            a fit. A step's memory is close to linear in its size, so this usually lands one probe under the cap
            instead of one past it.
        describe: a size in words, for the error (``"batch_size=1 (the longest sample, 812 tokens)"``).
        what: the knob searched, for log lines.

    Raises:
        NothingFits: ``smallest`` does not fit; the message names the cap and what the smallest step needs.
    """
    if smallest < 1 or largest < smallest or granularity < 1:
        raise ValueError(
            f"need 1 <= smallest <= largest and granularity >= 1, got {smallest}, {largest}, {granularity}"
        )
    probes: list[tuple[int, int | None]] = []

    def fits(size: int) -> bool:
        peak = measure(size)
        probes.append((size, peak))
        shown = "out of memory" if peak is None else f"{peak / GIB:.2f} GiB"
        logger.info("%s %d: %s (cap %.2f GiB)", what, size, shown, cap_bytes / GIB)
        return peak is not None and peak <= cap_bytes

    if not fits(smallest):
        peak = probes[0][1]
        needs = "runs out of memory" if peak is None else f"needs {peak / GIB:.2f} GiB"
        raise NothingFits(
            f"no {what} fits the memory cap of {cap_bytes / GIB:.2f} GiB: the smallest, {describe(smallest)}, {needs}. "
            "Raise memory_limit_gib, lower max_length or the image size (image_options, e.g. max_pixels), or save "
            "memory (QLoRA, gradient checkpointing, a frozen vision tower)"
        )

    def close_enough(low: int, high: float) -> bool:
        return high - low <= max(granularity, int(low * tolerance))

    low, high, previous = smallest, None, None
    while high is None and low < largest:
        size = min(2 * low, largest)
        at_cap = _where_the_cap_falls(probes, previous, low, cap_bytes) if predict else None
        if at_cap is not None and at_cap * (1 - PREDICT_MARGIN) >= LONG_STRIDE * low:
            size = min(LONG_STRIDE * low, largest)  # far from the cap: skip a doubling
        elif at_cap is not None and at_cap < size:
            if close_enough(low, at_cap):
                break  # the line through the last two fits puts the cap within tolerance of the last fit
            # Just short of where the line puts the cap, on the granularity's grid: a fit there saves probing
            # past the cap (a miss runs until it is out of memory) and the bisection back.
            guess = low + int((at_cap * (1 - PREDICT_MARGIN) - low) // granularity * granularity)
            size = min(max(guess, low + granularity), largest)
        if fits(size):
            previous, low = low, size
        else:
            high = size
    while high is not None and not close_enough(low, high):
        # Halfway, on the granularity's grid from the last fit (which is below ``high - granularity``).
        mid = low + max(granularity, (high - low) // 2 // granularity * granularity)
        if fits(mid):
            low = mid
        else:
            high = mid
    peak = next(p for s, p in reversed(probes) if s == low)
    return SearchResult(size=low, peak_bytes=peak, probes=probes)


def _where_the_cap_falls(probes, previous: int | None, last: int, cap_bytes: int) -> float | None:
    """The size at which the line through the peaks of the fits ``previous`` and ``last`` reaches the cap."""
    if previous is None:
        return None
    peaks = {size: peak for size, peak in probes if peak is not None}
    slope = (peaks[last] - peaks[previous]) / (last - previous)
    return last + (cap_bytes - peaks[last]) / slope if slope > 0 else None
