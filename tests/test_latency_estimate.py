import pytest

from compressor.latency_estimate import LatencyFromMacs


def test_interpolates_and_extrapolates_between_measurements():
    est = LatencyFromMacs()
    est.add(100.0, 10.0)
    assert est.predict(50.0) == pytest.approx(5.0)  # one point: proportional
    est.add(20.0, 4.0)
    assert est.predict(60.0) == pytest.approx(7.0)
    assert est.predict(120.0) == pytest.approx(11.5)
    assert est.predict(0.0) == pytest.approx(2.5)


def test_noise_cannot_make_latency_fall_with_macs():
    est = LatencyFromMacs()
    for macs, ms in [(10, 2.0), (50, 1.5), (100, 4.0)]:
        est.add(macs, ms)
    preds = [est.predict(m) for m in range(10, 101, 5)]
    assert all(b >= a - 1e-12 for a, b in zip(preds, preds[1:]))


def test_newer_measurement_replaces_same_point():
    est = LatencyFromMacs()
    est.add(100, 10.0)
    est.add(100, 12.0)
    assert est.points == [(100.0, 12.0)]
