"""The concurrency benchmark recommends the smallest level within a few percent of the best."""

import pytest

from qa_pipeline.core.benchmark import LevelResult, recommend_level


def level(concurrency: int, tokens_per_s: float, success_rate: float = 1.0) -> LevelResult:
    requests = 100
    return LevelResult(
        concurrency=concurrency,
        requests=requests,
        successes=round(requests * success_rate),
        duration_s=10.0,
        output_tokens=round(tokens_per_s * 10.0),
    )


def test_smallest_level_within_tolerance_of_the_best_wins():
    results = [level(1, 30), level(4, 110), level(8, 200), level(16, 290), level(32, 300), level(64, 302)]
    assert recommend_level(results, tolerance=0.05) == 16


def test_a_clear_peak_is_chosen_when_nothing_else_is_close():
    results = [level(1, 30), level(8, 150), level(32, 400), level(64, 250)]
    assert recommend_level(results) == 32


def test_levels_that_mostly_fail_are_not_recommended():
    results = [level(8, 200), level(32, 500, success_rate=0.5)]
    assert recommend_level(results) == 8


def test_order_of_results_does_not_matter():
    results = [level(64, 302), level(16, 290), level(1, 30), level(32, 300)]
    assert recommend_level(results, tolerance=0.05) == 16


def test_no_completed_level_is_an_error():
    with pytest.raises(ValueError, match="no benchmark level"):
        recommend_level([LevelResult(concurrency=4)])
