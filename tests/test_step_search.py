"""The step-size search: doubling then bisection under a fake memory measure, and a clear refusal."""

import pytest

from vlmtune.step_search import GIB, NothingFits, largest_fitting


def linear(base_gib: float, per_size_gib: float, log: list[int] | None = None):
    """A fake measure: weights plus a share per unit of size (what a step's memory looks like)."""

    def measure(size: int) -> int:
        if log is not None:
            log.append(size)
        return int((base_gib + per_size_gib * size) * GIB)

    return measure


def test_picks_the_largest_batch_under_the_cap_in_few_probes():
    sizes: list[int] = []
    # 2 GiB + 0.5 GiB per sample under 6 GiB: 8 samples use exactly 6 GiB, 9 do not fit.
    found = largest_fitting(linear(2.0, 0.5, sizes), 6 * GIB, smallest=1, largest=100)
    assert found.size == 8 and found.peak_bytes == 6 * GIB
    assert sizes == [1, 2, 4, 8, 16, 12, 10, 9]  # doubling to the first miss, then bisection
    assert [s for s, _ in found.probes] == sizes


def test_stops_at_the_largest_size_the_data_allows():
    found = largest_fitting(linear(1.0, 0.01, None), 24 * GIB, smallest=1, largest=20)
    assert found.size == 20 and [s for s, _ in found.probes] == [1, 2, 4, 8, 16, 20]


def test_token_budget_on_a_granularity_grid():
    # Tokens: the smallest budget is the longest sample (300); 1 GiB per 1000 tokens over 4 GiB of weights.
    found = largest_fitting(linear(4.0, 0.001, None), 10 * GIB, smallest=300, largest=100_000, granularity=128)
    assert found.size <= 6000 < found.size + 128  # within one granularity of the true largest
    assert len(found.probes) <= 12


def test_out_of_memory_counts_as_a_miss():
    def measure(size: int) -> int | None:
        return None if size > 5 else size * GIB  # a probe that raised OutOfMemoryError

    assert largest_fitting(measure, 100 * GIB, smallest=1, largest=64).size == 5


def test_a_cap_no_sample_fits_is_refused_naming_the_cap_and_the_need():
    with pytest.raises(NothingFits) as err:
        largest_fitting(
            linear(3.0, 0.25, None), 2 * GIB, smallest=1, largest=8, describe=lambda n: f"batch_size={n}", what="batch"
        )
    message = str(err.value)
    assert "memory cap of 2.00 GiB" in message and "batch_size=1" in message and "needs 3.25 GiB" in message


def test_a_smallest_step_out_of_memory_says_so():
    with pytest.raises(NothingFits, match="runs out of memory"):
        largest_fitting(lambda size: None, GIB, smallest=1, largest=8)


def test_predicting_from_two_fits_lands_under_the_cap_without_a_miss():
    sizes: list[int] = []
    # Linear memory: 4 GiB + 1 GiB per 1000 tokens under 10 GiB; the largest fit is 6000 tokens.
    found = largest_fitting(
        linear(4.0, 0.001, sizes),
        10 * GIB,
        smallest=300,
        largest=100_000,
        granularity=128,
        tolerance=0.125,
        predict=True,
    )
    assert 6000 * (1 - 0.125) <= found.size <= 6000
    assert all(peak <= 10 * GIB for _, peak in found.probes)  # no probe past the cap
    plain = largest_fitting(linear(4.0, 0.001, None), 10 * GIB, 300, 100_000, 128, tolerance=0.125)
    assert len(found.probes) < len(plain.probes)


def test_a_prediction_that_misses_falls_back_to_bisection():
    def curved(size: int) -> int:  # memory grows faster than the line through small steps says
        return int((2.0 + 0.001 * size + 2e-7 * size**2) * GIB)

    found = largest_fitting(curved, 10 * GIB, 300, 100_000, 128, tolerance=0.0, predict=True)
    true_largest = max(s for s in range(300, 10_000) if curved(s) <= 10 * GIB)
    assert true_largest - 128 < found.size <= true_largest


def test_probes_on_the_measured_h200_curve():
    # Peak reserved GiB of Qwen2.5-VL-7B QLoRA probes on an H200 (24 GiB cap, 90% usable), interpolated.
    measured = {235: 6.40, 470: 6.42, 940: 6.56, 1880: 6.95, 3760: 7.75, 7520: 9.45, 15040: 12.85, 30080: 20.00}
    sizes, peaks = sorted(measured), [measured[s] for s in sorted(measured)]

    def curve(size: int) -> int:
        above = next((i for i, s in enumerate(sizes) if s >= size), len(sizes) - 1)
        a, b = max(above - 1, 0), max(above, 1)
        share = (size - sizes[a]) / (sizes[b] - sizes[a])
        return int((peaks[a] + share * (peaks[b] - peaks[a])) * GIB)

    cap = int(21.6 * GIB)
    found = largest_fitting(curve, cap, 235, 300_000, 235, tolerance=0.125, predict=True)
    # Doubling twice, then every other doubling skipped: 5 probes, none past the cap.
    assert [s for s, _ in found.probes] == [235, 470, 1880, 7520, 30080] and found.size == 30080
    assert all(peak <= cap for _, peak in found.probes)
