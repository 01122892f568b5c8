"""``bench train``'s step timer on the CPU (the GPU path is in tests/test_gpu.py)."""


def test_measure_training_times_exactly_the_steps_after_warmup(one_thread):
    """steps + warmup + 1 calls of the step function give steps + warmup gaps between them; the
    first ``warmup`` are dropped, so exactly ``steps`` are timed."""
    from wsss.bench_train import measure_training

    r = measure_training("resnet18", 32, 2, steps=3, warmup=2, device="cpu", cuda_amp=False)
    assert r["steps_timed"] == 3
    assert 0 < r["step_s"] < 60 and r["peak_rss_mib"] > 0
    assert r["world"] == 1 and "peak_cuda_mib" not in r


def test_random_images_are_fixed_by_their_seed():
    from wsss.bench_train import RandomImages

    a, b, c = RandomImages(3, 8, seed=5), RandomImages(3, 8, seed=5), RandomImages(3, 8, seed=6)
    assert (a.x == b.x).all() and (a.y == b.y).all() and not (a.x == c.x).all()
    x, y, i = a[2]
    assert x.shape == (3, 8, 8) and y.shape == (20,) and i == 2
