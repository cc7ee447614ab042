"""ControlNet through `generate` (issue 34): every method that runs a UNet of ours takes it, on the tiny SD 1.x and
SD XL models with tiny ControlNets built from their UNets. A zero ControlNet leaves every stage bit-identical, a
trained-looking one acts in every stage that samples, at that stage's size (DemoFusion's windows on their crops,
HiDiffusion's RAU-Net steps with the ControlNet's down path halved too), together with LoRAs and the feature
upsamplers; result.settings records it; bad requests are one line, before anything slow."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
import torch
from test_controlnet import layout, tiny_controlnet
from test_upsampler import trained_like

from sc_app.api import METHODS, generate
from sc_app.controlnet import _crop, control_tensor
from tiny_models import make_upscaler, random_lora

MODELS = ["sd_model", "sdxl_model"]
PROGRESSIVE = ("self-cascade", "demofusion", "freescale", "lanczos")  # a pivot and stages: 16 -> 32 -> 64 px
UNET_METHODS = [m for m in METHODS if m != "sr"]  # SD+SR needs an upscaler: its own test below
PROMPT = "a red circle"
RUN = dict(num_inference_steps=3, seed=0)


def size_of(method: str) -> tuple[int, int]:
    return (64, 64) if method in PROGRESSIVE else (32, 32)


@pytest.fixture(scope="module")
def nets(sd_model, sdxl_model):
    """Per model: a zero-initialised ControlNet (as made) and a trained-looking one, and a second trained one."""
    return {
        name: {
            "zero": tiny_controlnet(model),
            "net": tiny_controlnet(model, 1, zero=False),
            "other": tiny_controlnet(model, 2, zero=False),
        }
        for name, model in (("sd_model", sd_model), ("sdxl_model", sdxl_model))
    }


@contextmanager
def spying(net, stage: list[int] | None = None):
    """Each call of `net` while the body runs: the stage it belongs to (stage[0], which on_stage moves on), its
    control image and the shapes of the residuals it returned."""
    calls = []

    def before(module, args, kwargs):
        calls.append({"stage": stage[0] if stage else 0, "cond": kwargs["controlnet_cond"].detach().clone()})

    def after(module, args, kwargs, out):
        calls[-1]["down"] = [tuple(r.shape[-2:]) for r in out[0]]

    handles = [
        net.register_forward_pre_hook(before, with_kwargs=True),
        net.register_forward_hook(after, with_kwargs=True),
    ]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def stage_counter():
    """[the index of the stage now sampling], and an on_stage that moves it on as each stage finishes."""
    current = [0]

    def on_stage(index, stage):
        current[0] = index + 1

    return current, on_stage


def outputs(result) -> list[torch.Tensor]:
    """Each stage: its latents, or its first image's pixels for a stage made in pixel space."""
    return [
        s.latents if s.latents is not None else torch.from_numpy(np.asarray(s.images[0], dtype=np.float32))
        for s in result.stages
    ]


def clean(model, *nets) -> bool:
    """No hook left on the UNet, nor on any module of the ControlNets; their convs as made."""
    modules = [model.unet, *(m for net in nets for m in net.modules())]
    hooks = any(m._forward_pre_hooks or m._forward_hooks for m in modules)
    strided = all(c.stride in ((1, 1), (2, 2)) for net in nets for c in net.modules() if isinstance(c, torch.nn.Conv2d))
    return not hooks and strided


# ---- a zero ControlNet is no ControlNet; a trained one acts in every stage -------------------------------


@pytest.mark.parametrize("method", UNET_METHODS)
@pytest.mark.parametrize("name", MODELS)
def test_a_zero_controlnet_is_bit_identical_to_none(name, method, request, nets):
    model = request.getfixturevalue(name)
    zero = nets[name]["zero"]
    h, w = size_of(method)
    plain = generate(model, PROMPT, h, w, method, **RUN)
    with spying(zero) as calls:
        zeroed = generate(model, PROMPT, h, w, method, controlnet=zero, control_image=layout(), **RUN)
    assert calls  # it ran
    assert len(zeroed.stages) == len(plain.stages)
    for a, b in zip(outputs(plain), outputs(zeroed)):
        assert torch.equal(a, b)
    assert np.array_equal(np.asarray(plain.images[0]), np.asarray(zeroed.images[0]))
    (entry,) = zeroed.settings["controlnet"]
    assert (entry["scale"], entry["start"], entry["end"]) == (1.0, 0.0, 1.0)
    assert entry["image"]["width"] == 40 and len(entry["image"]["sha256"]) == 64
    assert "controlnet" not in plain.settings and "controlnet_steps" not in plain.settings
    assert clean(model, zero)


@pytest.mark.parametrize("method", UNET_METHODS)
@pytest.mark.parametrize("name", MODELS)
def test_a_controlnet_acts_in_every_stage_that_samples_at_its_size(name, method, request, nets):
    model = request.getfixturevalue(name)
    net = nets[name]["net"]
    h, w = size_of(method)
    plain = generate(model, PROMPT, h, w, method, **RUN)
    current, on_stage = stage_counter()
    with spying(net, current) as calls:
        result = generate(model, PROMPT, h, w, method, controlnet=net, control_image=layout(), on_stage=on_stage, **RUN)
    sampled = [r for r, s in enumerate(result.stages) if s.latents is not None and s.steps]
    assert sampled == list(range(len(result.stages) - (method == "lanczos")))  # lanczos: the pivot only
    assert result.settings["controlnet_steps"] == [s.steps if r in sampled else 0 for r, s in enumerate(result.stages)]
    for r, (stage, a, b) in enumerate(zip(result.stages, outputs(plain), outputs(result))):
        assert (a - b).abs().max() > 1e-3, f"stage {r} unchanged"  # every stage, the pixel-space one included
        conds = {tuple(c["cond"].shape[-2:]) for c in calls if c["stage"] == r}
        if r not in sampled:
            assert conds == set()
        elif method == "demofusion" and r > 0:  # base-size windows and sub-latents
            assert conds == {(model.base_size, model.base_size)}
        else:
            assert conds == {(stage.height, stage.width)}, r
    assert clean(model, net)


def test_demofusion_windows_take_their_crops_and_sub_latents_the_whole_image(sd_model, nets):
    model, net = sd_model, nets["sd_model"]["net"]
    current, on_stage = stage_counter()
    with spying(net, current) as calls:
        generate(model, PROMPT, 32, 32, "demofusion", controlnet=net, control_image=layout(), on_stage=on_stage, **RUN)
    base = model.base_size
    whole = control_tensor(layout(), 32, 32)
    resized = control_tensor(layout(), base, base)
    crops = {
        (top, left): _crop(whole, top, left, base, base) for top in range(-base, 32, 2) for left in range(-base, 32, 2)
    }
    kinds = []
    for call in (c for c in calls if c["stage"] == 1):
        for cond in call["cond"]:  # every item of the batch: each window's own crop, or the whole image
            if torch.equal(cond, resized[0]):
                kinds.append("whole")
            else:
                at = [place for place, crop in crops.items() if torch.equal(cond, crop[0])]
                assert at, "a window's control image is no crop of the stage's"
                kinds.append("left" if at[0][1] < 8 else "right" if at[0][1] > 8 else "middle")
    assert {"whole", "left", "right"} <= set(kinds)  # red-left and blue-right windows both seen


@pytest.mark.parametrize("name", MODELS)
def test_hidiffusion_halves_the_controlnets_down_path_in_rau_net_steps(name, request, nets):
    model, net = request.getfixturevalue(name), nets[name]["net"]
    plain = generate(model, PROMPT, 32, 32, "hidiffusion", **RUN)
    with spying(net) as calls:
        result = generate(model, PROMPT, 32, 32, "hidiffusion", controlnet=net, control_image=layout(), **RUN)
    halved = result.settings["raunet_steps"]
    assert any(start == 0 < stop for start, stop in halved.values()) and all(s < 3 for _, s in halved.values())
    assert len(calls) == 3  # every step, the RAU-Net step 0 included
    assert calls[0]["down"][-1] != calls[-1]["down"][-1]  # step 0: the deepest residuals at RAU-Net's sizes
    assert [r[0] * r[1] for r in calls[0]["down"]] <= [r[0] * r[1] for r in calls[-1]["down"]]
    # a window of step 0 alone, a RAU-Net step: the control still acts
    first = generate(
        model, PROMPT, 32, 32, "hidiffusion", controlnet=net, control_image=layout(), control_guidance_end=0.34, **RUN
    )
    assert first.settings["controlnet_steps"] == [1]
    assert (first.stages[-1].latents - plain.stages[-1].latents).abs().max() > 1e-3
    assert clean(model, net)


def test_sr_controls_its_pivot_and_not_the_upscaler(sd_model, sd_folder, nets, tmp_path):
    upscaler = make_upscaler(tmp_path / "sr", sd_folder)
    net = nets["sd_model"]["net"]
    options = dict(sr_model=str(upscaler), sr_steps=2, **RUN)
    plain = generate(sd_model, PROMPT, 32, 32, "sr", **options)
    current, on_stage = stage_counter()
    with spying(net, current) as calls:
        result = generate(
            sd_model, PROMPT, 32, 32, "sr", controlnet=net, control_image=layout(), on_stage=on_stage, **options
        )
    assert result.settings["controlnet_steps"] == [3, 0]
    assert {c["stage"] for c in calls} == {0}
    assert (result.stages[0].latents - plain.stages[0].latents).abs().max() > 1e-3
    assert not np.array_equal(np.asarray(result.images[0]), np.asarray(plain.images[0]))


@pytest.mark.parametrize("method", ["direct", "self-cascade"])
def test_with_an_input_image_every_stage_after_it_is_controlled(method, sd_model, nets):
    net = nets["sd_model"]["net"]
    picture = layout(16, 16).rotate(90)
    size = 32 if method == "direct" else 64
    current, on_stage = stage_counter()
    with spying(net, current) as calls:
        result = generate(
            sd_model, PROMPT, size, size, method, image=picture, controlnet=net, control_image=layout(),
            on_stage=on_stage, **RUN,
        )  # fmt: skip
    steps = [s.steps for s in result.stages]
    assert steps[0] == 0 and result.settings["controlnet_steps"] == steps
    assert {c["stage"] for c in calls} == set(range(1, len(steps)))


def test_another_sampler_and_attention_mode(sd_model, nets):
    zero, net = nets["sd_model"]["zero"], nets["sd_model"]["net"]
    options = dict(scheduler="euler-a", attention="window", attention_window=4, **RUN)
    plain = generate(sd_model, PROMPT, 64, 64, **options)
    zeroed = generate(sd_model, PROMPT, 64, 64, controlnet=zero, control_image=layout(), **options)
    assert all(torch.equal(a.latents, b.latents) for a, b in zip(plain.stages, zeroed.stages))
    controlled = generate(sd_model, PROMPT, 64, 64, controlnet=net, control_image=layout(), **options)
    assert all((a.latents - b.latents).abs().max() > 1e-3 for a, b in zip(plain.stages, controlled.stages))
    assert controlled.settings["stage_attention"][1:] == ["window 4x4"] * 2


# ---- together with LoRAs and the feature upsamplers; several ControlNets ------------------------------------


def test_a_lora_the_feature_upsamplers_and_a_controlnet_together(sd_model, nets, tmp_path):
    model = sd_model
    lora = random_lora(model, tmp_path / "style.safetensors")
    adapter = trained_like(model)
    zero, net = nets["sd_model"]["zero"], nets["sd_model"]["net"]
    tuned = dict(loras=[(lora, 0.8)], upsampler=adapter, **RUN)
    base = generate(model, PROMPT, 64, 64, **tuned)
    zeroed = generate(model, PROMPT, 64, 64, controlnet=zero, control_image=layout(), **tuned)
    assert all(torch.equal(a.latents, b.latents) for a, b in zip(base.stages, zeroed.stages))
    both = generate(model, PROMPT, 64, 64, controlnet=net, control_image=layout(), **tuned)
    alone = generate(model, PROMPT, 64, 64, controlnet=net, control_image=layout(), **RUN)
    for r in range(3):
        assert (both.stages[r].latents - base.stages[r].latents).abs().max() > 1e-3  # the ControlNet acts
        assert (both.stages[r].latents - alone.stages[r].latents).abs().max() > 1e-3  # and so do the others
    assert set(both.settings) >= {"loras", "upsampler", "controlnet", "controlnet_steps"}
    assert clean(model, net)


@pytest.mark.parametrize("method", ["demofusion", "freescale", "hidiffusion", "scalecrafter"])
def test_a_lora_and_a_controlnet_on_sd_xl(method, sdxl_model, nets, tmp_path):
    model = sdxl_model
    lora = random_lora(model, tmp_path / "style.safetensors")
    zero, net = nets["sdxl_model"]["zero"], nets["sdxl_model"]["net"]
    h, w = size_of(method)
    options = dict(loras=[(lora, 1.0)], **RUN)
    base = generate(model, PROMPT, h, w, method, **options)
    zeroed = generate(model, PROMPT, h, w, method, controlnet=zero, control_image=layout(), **options)
    assert all(torch.equal(a.latents, b.latents) for a, b in zip(base.stages, zeroed.stages))
    both = generate(model, PROMPT, h, w, method, controlnet=net, control_image=layout(), **options)
    assert (both.stages[-1].latents - base.stages[-1].latents).abs().max() > 1e-3


def test_several_controlnets_add_up_and_are_recorded(sd_model, nets):
    zero, net, other = (nets["sd_model"][k] for k in ("zero", "net", "other"))
    alone = generate(sd_model, PROMPT, 64, 64, controlnet=net, control_image=layout(), **RUN)
    with_zero = generate(sd_model, PROMPT, 64, 64, controlnet=[net, zero], control_image=[layout()] * 2, **RUN)
    assert all(torch.equal(a.latents, b.latents) for a, b in zip(alone.stages, with_zero.stages))
    both = generate(
        sd_model, PROMPT, 64, 64, controlnet=[net, other], control_image=[layout(), layout().rotate(180)],
        controlnet_conditioning_scale=[1.0, 0.5], control_guidance_end=[1.0, 0.5], **RUN,
    )  # fmt: skip
    assert (both.stages[-1].latents - alone.stages[-1].latents).abs().max() > 1e-3
    summary = both.settings["controlnet"]
    assert [(e["scale"], e["start"], e["end"]) for e in summary] == [(1.0, 0.0, 1.0), (0.5, 0.0, 0.5)]
    assert summary[0]["image"]["sha256"] != summary[1]["image"]["sha256"]
    assert both.settings["controlnet_steps"] == [3, 3, 3]


def test_a_controlnet_folder_is_named_as_given(sd_model, nets, tmp_path):
    nets["sd_model"]["net"].save_pretrained(tmp_path / "pipe" / "controlnet", safe_serialization=True)
    source = str(tmp_path / "pipe")
    result = generate(sd_model, PROMPT, 32, 32, "direct", controlnet=source, control_image=layout(), **RUN)
    assert result.settings["controlnet"][0]["controlnet"] == source
    from sc_app.controlnet import load_controlnets

    (loaded,) = load_controlnets(source, sd_model)
    again = generate(sd_model, PROMPT, 32, 32, "direct", controlnet=loaded, control_image=layout(), **RUN)
    assert again.settings["controlnet"][0]["controlnet"] == source  # the loaded module keeps the name it came by
    assert torch.equal(again.stages[-1].latents, result.stages[-1].latents)


# ---- refusals: one line, before anything slow -------------------------------------------------------------


@pytest.fixture
def no_sampling(sd_model):
    """A UNet pass fails the test: a refusal must come before any."""

    def fail(*args, **kwargs):
        raise AssertionError("the UNet ran before the request was refused")

    handle = sd_model.unet.register_forward_pre_hook(fail)
    yield
    handle.remove()


@pytest.mark.parametrize(
    "method, kwargs, expected",
    [
        ("sr", {"image": "PICTURE"}, "controlnet: method sr with an input image runs no UNet that a ControlNet steers"),
        ("lanczos", {"image": "PICTURE"}, "method lanczos with an input image runs no UNet"),
        ("self-cascade", {"control_image": None}, "controlnet needs a control_image (one per ControlNet)"),
        ("self-cascade", {"controlnet": None}, "need a controlnet"),
        ("direct", {"controlnet_conditioning_scale": -1.0}, "controlnet_conditioning_scale must be in [0, 5], got -1"),
        ("direct", {"control_guidance_start": 0.6, "control_guidance_end": 0.4}, "got 0.6 and 0.4"),
        ("direct", {"control_image": "/no/such/layout.png"}, "control_image /no/such/layout.png: no such file"),
        ("direct", {"control_image": [layout(), layout()]}, "control_image: one image per ControlNet (1), got 2"),
        ("direct", {"max_pixels": 32 * 32, "control_image": layout(64, 32)}, "control_image: 64x32 is 2,048 pixels"),
        ("direct", {"controlnet": "SDXL"}, "made for SD XL (addition_embed_type 'text_time'), but"),
        ("direct", {"loras": [("/no/such/lora.safetensors", 1.0)], "control_image": None}, "needs a control_image"),
        ("demofusion", {"controlnet": "/no/such/folder"}, "controlnet '/no/such/folder': no such folder"),
    ],
)
def test_bad_requests_are_one_line_before_anything_slow(method, kwargs, expected, sd_model, nets, no_sampling):
    arguments = {"controlnet": nets["sd_model"]["net"], "control_image": layout(), **kwargs}
    if arguments.get("image") == "PICTURE":
        arguments["image"] = layout(16, 16)
    if arguments["controlnet"] == "SDXL":
        arguments["controlnet"] = nets["sdxl_model"]["zero"]
    if method == "sr":
        arguments["sr_model"] = "unused"
    with pytest.raises(ValueError) as error:
        generate(sd_model, PROMPT, 32, 32, method, **RUN, **arguments)
    message = str(error.value)
    assert "\n" not in message and expected in message, message
    assert not sd_model.unet._forward_pre_hooks or len(sd_model.unet._forward_pre_hooks) == 1  # only no_sampling's
