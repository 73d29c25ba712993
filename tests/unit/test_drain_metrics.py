"""The drain's figures as arithmetic (``opsync.monitoring.drain_metrics``): histogram buckets, quantiles bounded as
``histogram_quantile`` bounds them, the mean batch and the error classes. Counted in Redis by a real drain:
tests/test_drain_metrics.py."""

import math

import pytest

from opsync.monitoring.drain_metrics import BATCH_BUCKETS, DrainMetrics, bucket_label, known_class


@pytest.mark.parametrize(("seconds", "label"), [(0.0, "0.05"), (0.05, "0.05"), (0.051, "0.1"), (0.3, "0.5"), (60.0, "60.0"), (61, "inf")])
def test_an_observation_falls_in_the_smallest_bucket_at_or_above_it(seconds, label):
    assert bucket_label(seconds) == label


def test_quantiles_are_the_upper_bound_of_the_bucket_holding_them_and_unknown_before_any_batch():
    none = DrainMetrics()
    assert none.mean_batch_s is None and none.batch_quantile(0.5) is None
    cumulative = tuple((bound, count) for bound, count in zip(BATCH_BUCKETS, (0, 0, 1, 6, 9, 10, 10, 10, 10, 10, 10), strict=True))
    m = DrainMetrics(batches=10, batch_seconds_sum=6.5, batch_buckets=cumulative)
    assert m.mean_batch_s == 0.65
    assert (m.batch_quantile(0.1), m.batch_quantile(0.5), m.batch_quantile(0.9), m.batch_quantile(0.99)) == (0.25, 0.5, 1.0, 2.5)
    assert math.isinf(DrainMetrics(batches=1, batch_buckets=((1.0, 0), (math.inf, 1))).batch_quantile(0.5))


def test_an_unknown_error_class_counts_as_other_so_labels_stay_few():
    assert [known_class(c) for c in ("transient", "poison", "ConnectionError", "")] == ["transient", "poison", "other", "other"]
