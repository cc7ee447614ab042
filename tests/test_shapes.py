"""The shapes world: renderer facts (design.md "Shapes world"), prompt parsing, and the detector."""

from __future__ import annotations

import re
import time
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from sc_app.shapes import (
    MAX_OBJECTS,
    PALETTE,
    RADIUS_RANGE,
    SHAPES,
    Scene,
    ShapeObject,
    describe,
    detect,
    matches,
    parse_prompt,
    random_prompts,
    render,
    render_batch,
    scene_from_seed,
)

SIZES = [(64, 64), (128, 128), (256, 256), (64, 128), (128, 64)]  # (height, width), 2:1 and 1:2 included


def _exact_mask(image: np.ndarray, colour: str) -> np.ndarray:
    return (image == np.array(PALETTE[colour], np.uint8)).all(-1)


def _footprints(scene: Scene, height: int, width: int) -> list[np.ndarray]:
    """Per object, the pixels it touches at all (anti-aliased edge included): its render minus the background's."""
    background = render(replace(scene, objects=()), height, width)
    return [(render(replace(scene, objects=(o,)), height, width) != background).any(-1) for o in scene.objects]


def _detector_accuracy(seeds, height: int, width: int, transform=lambda image, rng: image) -> float:
    rng = np.random.default_rng(0)
    right = [
        matches(transform(render(scene_from_seed(s), height, width), rng), scene_from_seed(s).prompt) for s in seeds
    ]
    return float(np.mean(right))


def _blur_and_noise(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A stand-in for a diffusion model's output: soft edges and mild pixel noise."""
    soft = ndimage.gaussian_filter(image.astype(float), sigma=(1.0, 1.0, 0)) + rng.normal(0, 6, image.shape)
    return np.clip(np.round(soft), 0, 255).astype(np.uint8)


# --- scenes and prompts ---


def test_palette_and_shapes_are_the_designed_ones():
    assert PALETTE == {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
    assert SHAPES == ("circle", "square", "triangle")


def test_scenes_have_distinct_colours_radii_in_range_no_overlap_and_stay_inside():
    counts = set()
    for seed in range(400):
        objects = scene_from_seed(seed).objects
        counts.add(len(objects))
        assert len({o.colour for o in objects}) == len(objects)
        for o in objects:
            assert o.colour in PALETTE and o.shape in SHAPES
            assert RADIUS_RANGE[0] <= o.r <= RADIUS_RANGE[1]
            assert o.r < o.cx < 1 - o.r and o.r < o.cy < 1 - o.r
        for i, a in enumerate(objects):
            for b in objects[i + 1 :]:  # bounding squares apart, in the unit square and so at every aspect
                assert max(abs(a.cx - b.cx), abs(a.cy - b.cy)) > a.r + b.r
    assert counts == set(range(1, MAX_OBJECTS + 1))


def test_same_seed_gives_the_same_scene():
    assert scene_from_seed(7) == scene_from_seed(7)
    assert scene_from_seed(7) != scene_from_seed(8)


def test_prompt_format_follows_the_scene():
    scene = Scene(
        (ShapeObject("red", "circle", 0.3, 0.3, 0.15), ShapeObject("blue", "square", 0.7, 0.7, 0.15)),
        (220, 220, 220),
        (210, 210, 210),
    )
    assert scene.prompt == "a red circle and a blue square"
    one = r"a (red|green|blue|yellow) (circle|square|triangle)"
    pattern = re.compile(rf"^{one}( and {one}){{0,2}}$")
    for seed in range(50):
        scene = scene_from_seed(seed)
        assert pattern.match(scene.prompt)
        assert parse_prompt(scene.prompt) == [(o.colour, o.shape) for o in scene.objects]


def test_random_prompts_are_deterministic_and_parse():
    prompts = random_prompts(20, seed=3)
    assert prompts == random_prompts(20, seed=3) and prompts != random_prompts(20, seed=4)
    assert all(1 <= len(parse_prompt(p)) <= MAX_OBJECTS for p in prompts)


def test_parse_prompt_accepts_case_spacing_and_an():
    assert parse_prompt("a red circle") == [("red", "circle")]
    assert parse_prompt("  A Red Circle  and a blue square and an yellow triangle ") == [
        ("red", "circle"),
        ("blue", "square"),
        ("yellow", "triangle"),
    ]


@pytest.mark.parametrize(
    "prompt",
    [
        "",
        "a purple circle",
        "a red hexagon",
        "red circle",
        "a red circle and",
        "a red circle, a blue square",
        "a photo of a cat",
        "a big red circle",
    ],
)
def test_parse_prompt_rejects_other_text(prompt):
    with pytest.raises(ValueError, match="not a shapes-world prompt"):
        parse_prompt(prompt)


# --- rendering ---


@pytest.mark.parametrize("height,width", SIZES)
def test_objects_sit_at_their_relative_place_and_size_in_exact_palette_colour(height, width):
    short = min(height, width)
    for seed in range(25):
        scene = scene_from_seed(seed)
        image = render(scene, height, width)
        assert image.shape == (height, width, 3) and image.dtype == np.uint8
        for o, footprint in zip(scene.objects, _footprints(scene, height, width)):
            # the footprint is centred on (cx, cy) and 2r wide, plus its anti-aliased fringe
            ys, xs = np.nonzero(footprint)
            assert (xs.min() + xs.max() + 1) / 2 == pytest.approx(o.cx * width, abs=1.0)
            assert (ys.min() + ys.max() + 1) / 2 == pytest.approx(o.cy * height, abs=1.0)
            assert xs.max() + 1 - xs.min() == pytest.approx(2 * o.r * short + 1, abs=1.5)
            assert ys.max() + 1 - ys.min() == pytest.approx(2 * o.r * short + 1, abs=1.5)
            # inside it the colour is exactly the palette's, over the shape's area less its edge pixels
            exact = _exact_mask(image, o.colour)
            assert not (exact & ~footprint).any()
            r = o.r * short
            area, perimeter = {
                "circle": (np.pi * r * r, 2 * np.pi * r),
                "square": (4 * r * r, 8 * r),
                "triangle": (2 * r * r, (2 + 2 * np.sqrt(5)) * r),
            }[o.shape]
            assert area - perimeter <= exact.sum() <= area


def test_objects_never_overlap_in_pixels():
    for seed in range(60):
        scene = scene_from_seed(seed)
        for height, width in [(64, 64), (64, 128), (128, 64)]:
            assert (np.sum(_footprints(scene, height, width), axis=0) <= 1).all()


def test_background_is_a_light_low_saturation_gradient_far_from_the_palette():
    palette = np.array(list(PALETTE.values()), float)
    for seed in range(100):
        scene = scene_from_seed(seed)
        background = render(replace(scene, objects=()), 64, 48).astype(float)
        assert (background.min(-1) >= 190).all()
        assert (background.max(-1) - background.min(-1) <= 20).all()  # chroma: near grey
        assert np.linalg.norm(background[:, :, None] - palette, axis=-1).min() > 150
        assert (background == background[:, :1]).all()  # vertical: each row is one colour
        # objects keep off the border, so the corners are background in the full render too
        corners = ([0, 0, -1, -1], [0, -1, 0, -1])
        full = render(scene, 128, 96)
        assert (full[corners] == render(replace(scene, objects=()), 128, 96)[corners]).all()


@pytest.mark.parametrize("small,factor", [((64, 64), 2), ((64, 64), 4), ((32, 64), 4), ((64, 32), 4)])
def test_same_seed_renders_the_same_picture_at_every_resolution(small, factor):
    height, width = small
    for seed in range(10):
        scene = scene_from_seed(seed)
        large = render(scene, height * factor, width * factor).astype(float)
        pooled = large.reshape(height, factor, width, factor, 3).mean((1, 3))
        difference = np.abs(pooled - render(scene, height, width))
        assert difference.mean() < 1.0  # differences are only anti-aliasing along edges
        assert np.quantile(difference, 0.95) < 5


def test_render_batch_stacks_renders():
    scenes = [scene_from_seed(s) for s in range(3)]
    batch = render_batch(scenes, 32, 48)
    assert batch.shape == (3, 32, 48, 3) and batch.dtype == np.uint8
    assert all((batch[i] == render(s, 32, 48)).all() for i, s in enumerate(scenes))


# --- the detector ---


@pytest.mark.parametrize(
    "height,width,count",
    [
        (64, 64, 200),
        (128, 128, 120),
        (256, 256, 50),
        (64, 128, 80),
        (128, 64, 80),
        (512, 512, 12),
        (512, 1024, 3),
        (1024, 512, 3),
    ],
)
def test_detector_reads_renders_at_every_size_and_aspect(height, width, count):
    assert _detector_accuracy(range(1000, 1000 + count), height, width) >= 0.99


@pytest.mark.parametrize("height,width", [(64, 64), (128, 128), (256, 256)])
def test_detector_survives_blur_and_noise(height, width):
    assert _detector_accuracy(range(2000, 2060), height, width, _blur_and_noise) >= 0.97


def _wrong_prompts(scene: Scene) -> list[str]:
    objects = [(o.colour, o.shape) for o in scene.objects]
    unused = next(c for c in PALETTE if c not in {c for c, _ in objects})
    other_shape = next(s for s in SHAPES if s != objects[0][1])
    variants = [
        [(unused, objects[0][1])] + objects[1:],  # wrong colour
        [(objects[0][0], other_shape)] + objects[1:],  # wrong shape
        objects + [(unused, "circle")],  # one more than there is
        objects + [objects[0]],  # the same object twice
    ]
    if len(objects) > 1:
        variants.append(objects[1:])  # one missing
    return [" and ".join(f"a {c} {s}" for c, s in v) for v in variants]


def test_matches_rejects_wrong_prompts():
    for seed in range(40):
        scene = scene_from_seed(seed)
        image = render(scene, 128, 128)
        assert matches(image, scene.prompt)
        assert matches(image, " and ".join(reversed(scene.prompt.split(" and "))))  # order is free
        for prompt in _wrong_prompts(scene):
            assert not matches(image, prompt), (scene.prompt, prompt)


def _with_extra(scene: Scene, r: float) -> Scene:
    """The scene plus a small square of its first object's colour, in the free corner of the unit square."""
    for cx, cy in [(0.06, 0.06), (0.94, 0.06), (0.06, 0.94), (0.94, 0.94), (0.5, 0.06), (0.5, 0.94)]:
        if all(max(abs(cx - o.cx), abs(cy - o.cy)) > r + o.r + 0.01 for o in scene.objects):
            extra = ShapeObject(scene.objects[0].colour, "square", cx, cy, r)
            return replace(scene, objects=scene.objects + (extra,))
    return scene


def test_an_extra_small_object_makes_a_mismatch_but_a_speck_does_not():
    tried = 0
    for seed in range(40):
        scene = scene_from_seed(seed)
        repeated = _with_extra(scene, r=0.04)  # smaller than the world draws, as diffusion repeats often are
        if repeated == scene:
            continue
        tried += 1
        for height, width in [(128, 128), (256, 128)]:
            assert not matches(render(repeated, height, width), scene.prompt)
            assert sorted(detect(render(repeated, height, width))) == sorted(
                [(o.colour, o.shape) for o in repeated.objects]
            )
            speck = _with_extra(scene, r=0.01)
            assert matches(render(speck, height, width), scene.prompt)
    assert tried >= 20


def test_detector_takes_pil_images_and_rgba_and_finds_nothing_on_a_bare_background():
    scene = scene_from_seed(5)
    image = render(scene, 96, 160)
    assert matches(Image.fromarray(image), scene.prompt)
    assert matches(np.concatenate([image, np.full((96, 160, 1), 255, np.uint8)], -1), scene.prompt)
    assert detect(render(replace(scene, objects=()), 96, 160)) == []
    with pytest.raises(ValueError):
        detect(np.zeros((8, 8), np.uint8))


def test_describe_reads_back_as_the_scene_prompt():
    for seed in range(20):
        scene = scene_from_seed(seed)
        said = describe(render(scene, 128, 128))
        assert sorted(parse_prompt(said)) == sorted(parse_prompt(scene.prompt))
    assert describe(np.full((64, 64, 3), 225, np.uint8)) == "nothing"


def test_detector_is_fast_at_512px():
    image = render(scene_from_seed(1), 512, 512)
    detect(image)
    assert min(_cpu_seconds(detect, image) for _ in range(3)) < 0.1


def _cpu_seconds(function, *args) -> float:
    """CPU time, not wall time: the check must not fail because other jobs share the cores."""
    start = time.process_time()
    function(*args)
    return time.process_time() - start


def test_shape_fidelity_is_near_one_on_renders_and_drops_on_distorted_ones():
    from scipy import ndimage

    from sc_app.shapes import random_scene, render, shape_fidelity

    rng = np.random.default_rng(11)
    scenes = [random_scene(rng) for _ in range(12)]
    for size in (64, 256):
        scores = [s for scene in scenes for s in shape_fidelity(render(scene, size, size))]
        assert len(scores) == sum(len(scene.objects) for scene in scenes)
        assert min(scores) > 0.97
    # wobbly outlines (what the cascade's 16x samples show): every object scores clearly lower
    yy, xx = np.mgrid[0:256, 0:256]
    for scene in scenes[:4]:
        image = render(scene, 256, 256)
        wavy = np.stack(
            [
                ndimage.map_coordinates(image[..., c], [yy + 6 * np.sin(xx / 7), xx + 6 * np.sin(yy / 7)], order=1)
                for c in range(3)
            ],
            -1,
        )
        assert max(shape_fidelity(wavy)) < 0.92
    # a square with rounded corners (a soft 16x sample's square) is still a square, but a worse one
    yy, xx = np.mgrid[0:256, 0:256]
    rounded = np.full((256, 256, 3), 225, np.uint8)
    corner = np.maximum(np.abs(yy - 128) - 40, 0) ** 2 + np.maximum(np.abs(xx - 128) - 40, 0) ** 2 <= 30**2
    rounded[corner] = PALETTE["blue"]
    assert detect(rounded) == [("blue", "square")]
    assert 0.8 < shape_fidelity(rounded)[0] < 0.97
    assert shape_fidelity(np.full((64, 64, 3), 220, np.uint8)) == []
