"""Stress (small, CPU): repeated jitted forwards of the tiny model and generations of one prompt in
shuffled batches, serially and from several threads at once, give exactly one output hash. The full
runs (10,000 forwards, 1,000 generations, 8 threads) are ``scripts/reliability.py --profile long``."""

from conftest import reliability_module

rel = reliability_module()


def test_stress_one_hash():
    # One batch size (3): the needle at every position among shuffled neighbours, greedy and
    # sampled (two compiled programs on CPU).
    r = rel.stress(forwards=200, generations=10, threads=4, batch_sizes=(3,), verbose=False)
    assert r["forward_serial"]["distinct"] == 1, r
    assert r["forward_threads"]["distinct"] == 1, r
    assert r["generate_serial"]["distinct_greedy"] == 1, r
    assert r["generate_threads"]["distinct_greedy"] == 1, r
    assert r["generate_threads"]["distinct_sampled"] == 1, r
    assert r["ok"]
