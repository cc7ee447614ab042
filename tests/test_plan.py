import pytest

from sc_app.plan import num_stages, plan_stages


@pytest.mark.parametrize("factor, expected", [(1, 0), (2, 1), (4, 1), (5, 2), (16, 2), (64, 3), (0.5, 0)])
def test_stage_count_is_ceil_log4_of_pixel_ratio(factor, expected):
    side = 512 * factor**0.5
    assert num_stages(int(side), int(side), 512) == expected


def test_square_4x_16x_64x():
    assert plan_stages(1024, 1024, 512, 64) == [(512, 512), (1024, 1024)]
    assert plan_stages(2048, 2048, 512, 64) == [(512, 512), (1024, 1024), (2048, 2048)]
    assert plan_stages(4096, 4096, 512, 64) == [(512, 512), (1024, 1024), (2048, 2048), (4096, 4096)]


@pytest.mark.parametrize("height, width", [(1024, 2048), (2048, 1024), (1152, 2048), (2048, 1152), (768, 1024)])
def test_non_square_targets_keep_aspect_and_grow_about_4x(height, width):
    sizes = plan_stages(height, width, 512, 64)
    assert sizes[-1] == (height, width)
    pivot_h, pivot_w = sizes[0]
    assert abs(pivot_w / pivot_h - width / height) < 0.3  # aspect kept up to rounding to 64
    assert 0.6 < pivot_h * pivot_w / 512**2 < 1.5  # about the base pixel count
    for (h0, w0), (h1, w1) in zip(sizes, sizes[1:]):
        assert h1 >= h0 and w1 >= w0
        assert h1 * w1 / (h0 * w0) <= 4.5
    assert all(h % 64 == 0 and w % 64 == 0 for h, w in sizes)


def test_stages_override():
    assert len(plan_stages(2048, 2048, 512, 64, stages=1)) == 2
    assert plan_stages(2048, 2048, 512, 64, stages=0) == [(2048, 2048)]


def test_size_must_be_reachable():
    with pytest.raises(ValueError, match="multiples of 64"):
        plan_stages(1000, 1024, 512, 64)


def test_integer_phases_are_the_demofusion_release_plan():
    from sc_app.plan import integer_phases, phase_number

    assert integer_phases(4096, 4096, 1024, 64) == [(1024, 1024), (2048, 2048), (3072, 3072), (4096, 4096)]
    assert integer_phases(3072, 3072, 1024, 64) == [(1024, 1024), (2048, 2048), (3072, 3072)]
    assert integer_phases(2048, 1024, 1024, 64) == [(1024, 512), (2048, 1024)]  # the target over 2, as released
    assert integer_phases(2560, 2560, 1024, 64) == [(1280, 1280), (2560, 2560)]  # the last is the target itself
    assert integer_phases(1536, 1536, 1024, 64) == [(1536, 1536)]  # under twice the base side: one phase
    assert integer_phases(256, 256, 64, 16) == [(64, 64), (128, 128), (192, 192), (256, 256)]
    assert [phase_number(s, 1024) for s in [(1024, 512), (2048, 1024), (3072, 3072), (2560, 2560)]] == [1, 2, 3, 2]
    with pytest.raises(ValueError, match="multiples of 64"):
        integer_phases(1000, 1000, 1024, 64)
