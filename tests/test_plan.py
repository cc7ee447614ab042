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
