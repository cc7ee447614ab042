"""ControlNet in a stage (sc_app.controlnet) on tiny ControlNets built from the tiny UNets: a zero-initialised one
changes nothing, a trained-looking one does, within its window only, at each stage's size, summed over several,
together with LoRAs and the feature upsamplers; bad requests and unfit ControlNets refused in one line."""

import math

import pytest
import torch
from diffusers import ControlNetModel
from PIL import Image

from sc_app.controlnet import (
    check_control,
    control_tensor,
    controlled_denoiser,
    load_controlnets,
    prepare_control,
)
from sc_app.sampling import added_conditions, encode_prompt, guided_denoiser, make_scheduler, sample_ddim

MODELS = ["sd_model", "sdxl_model"]


def tiny_controlnet(model, seed: int = 0, zero: bool = True) -> ControlNetModel:
    """`ControlNetModel.from_unet` of the model's UNet, its control images read at the VAE's scale. As made, its
    output convolutions are zero (the anchor); `zero=False` fills them with random values, as training would."""
    torch.manual_seed(seed)
    levels = int(math.log2(model.vae_scale))
    net = ControlNetModel.from_unet(model.unet, conditioning_embedding_out_channels=(4,) + (8,) * levels)
    if not zero:
        generator = torch.Generator().manual_seed(seed)
        outputs = [*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out]
        with torch.no_grad():
            for param in (p for module in outputs for p in module.parameters()):
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    return net.eval()


def layout(width: int = 40, height: int = 20) -> Image.Image:
    """A control image: a red left half and a blue right half."""
    image = Image.new("RGB", (width, height), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, width // 2, height))
    return image


def stage(model, height: int = 32, width: int = 48, prompts=("a red circle",), guidance: float = 3.0):
    """A stage's guided denoiser and starting latents at height x width pixels."""
    cond = encode_prompt(model, list(prompts), None, guidance)
    denoiser = guided_denoiser(model.unet, cond, added_conditions(model, cond, height, width))
    shape = (len(prompts), 4, height // model.vae_scale, width // model.vae_scale)
    return cond, denoiser, torch.randn(shape, generator=torch.Generator().manual_seed(0))


def sample(model, denoiser, x, steps: int = 3) -> torch.Tensor:
    scheduler = make_scheduler(model, steps)
    return sample_ddim(denoiser, x, scheduler, scheduler.timesteps, disable=True)


def control_for(model, nets, image=None, **kwargs):
    nets = nets if isinstance(nets, list) else [nets]
    images = [image if image is not None else layout()] * len(nets)
    return prepare_control(model, nets if len(nets) > 1 else nets[0], images, **kwargs)


def spy(net) -> list[dict]:
    """Each call of `net`: its control image's shape, scale and added conditions."""
    calls = []

    def record(module, args, kwargs):
        calls.append(
            {
                "cond": tuple(kwargs["controlnet_cond"].shape),
                "sample": tuple(args[0].shape),
                "scale": kwargs["conditioning_scale"],
                "added": kwargs.get("added_cond_kwargs"),
            }
        )

    net.register_forward_pre_hook(record, with_kwargs=True)
    return calls


# ---- the anchor and the effect ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_zero_initialised_controlnet_changes_nothing(name, request):
    model = request.getfixturevalue(name)
    _, denoiser, x = stage(model)
    control = control_for(model, tiny_controlnet(model))
    calls = spy(control.nets[0])
    plain = sample(model, denoiser, x)
    controlled = sample(model, controlled_denoiser(model, control, denoiser, 3), x)
    assert len(calls) == 3  # it ran, every step
    assert torch.equal(plain, controlled)
    assert not model.unet._forward_pre_hooks  # the hook lives for one call only


@pytest.mark.parametrize("name", MODELS)
def test_controlnet_changes_the_output_and_scale_zero_is_none(name, request):
    model = request.getfixturevalue(name)
    _, denoiser, x = stage(model)
    plain = sample(model, denoiser, x)
    net = tiny_controlnet(model, zero=False)
    controlled = sample(model, controlled_denoiser(model, control_for(model, net), denoiser, 3), x)
    assert (controlled - plain).abs().max() > 1e-3
    other_image = sample(
        model, controlled_denoiser(model, control_for(model, net, layout().rotate(180)), denoiser, 3), x
    )
    assert (other_image - controlled).abs().max() > 1e-4  # the image itself steers it
    off = control_for(model, net, controlnet_conditioning_scale=0.0)
    calls = spy(net)
    assert torch.equal(sample(model, controlled_denoiser(model, off, denoiser, 3), x), plain)
    assert calls == []  # scale 0: not even run


def test_sdxl_controlnet_gets_the_unets_added_conditions(sdxl_model):
    model = sdxl_model
    cond, denoiser, x = stage(model, 32, 48)
    control = control_for(model, tiny_controlnet(model, zero=False))
    calls = spy(control.nets[0])
    controlled_denoiser(model, control, denoiser, 1)(x, torch.tensor(500), 0)
    added = added_conditions(model, cond, 32, 48)
    assert len(calls) == 1 and set(calls[0]["added"]) == {"text_embeds", "time_ids"}
    assert torch.equal(calls[0]["added"]["time_ids"], added["time_ids"])  # this stage's size, both CFG halves
    assert torch.equal(calls[0]["added"]["text_embeds"], cond.pooled)


# ---- the guidance window, the size, the batch ------------------------------------------------------------


def test_window_counts_over_the_stages_own_steps(sd_model):
    control = check_control("cn", layout(), 0.5, 0.2, 0.5)
    # diffusers' rule over the steps run: i / n >= start and (i + 1) / n <= end
    assert [i for i in range(10) if control.scales_at(i, 10)[0]] == [2, 3, 4]
    assert control.scales_at(2, 10) == [0.5]
    assert [i for i in range(3) if control.scales_at(i, 3)[0]] == []  # too few steps for a window of 0.3
    model = sd_model
    _, denoiser, x = stage(model)
    net = tiny_controlnet(model, zero=False)
    control = control_for(model, net, control_guidance_start=0.25, control_guidance_end=0.75)
    controlled = controlled_denoiser(model, control, denoiser, 4)
    calls = spy(net)
    scheduler = make_scheduler(model, 4)
    applied = []
    for i, t in enumerate(scheduler.timesteps):
        before = len(calls)
        same = torch.equal(controlled(x, t, i), denoiser(x, t, i))
        applied.append(len(calls) > before)
        assert same != applied[-1]  # outside the window the step is the plain one, inside it is not
    assert applied == [False, True, True, False]


def test_control_image_is_resized_to_each_stage(sd_model):
    model = sd_model
    net = tiny_controlnet(model)
    control = control_for(model, net)
    calls = spy(net)
    for height, width, prompts in ((16, 16, 1), (32, 48, 1), (48, 32, 2)):
        _, denoiser, x = stage(model, height, width, prompts=["a red circle"] * prompts)
        controlled_denoiser(model, control, denoiser, 1)(x, torch.tensor(500), 0)
        # the stage's pixel size, repeated over the batch: prompts x (uncond, cond)
        assert calls[-1]["cond"] == (2 * prompts, 3, height, width)
        assert calls[-1]["sample"] == (2 * prompts, 4, height // 2, width // 2)
    unguided = stage(model, 32, 32, guidance=1.0)
    controlled_denoiser(model, control, unguided[1], 1)(unguided[2], torch.tensor(500), 0)
    assert calls[-1]["cond"] == (1, 3, 32, 32)


def test_control_image_covers_the_stage_and_is_centre_cropped():
    bands = Image.new("RGB", (60, 20), (0, 255, 0))  # green | red | blue, 20 px each
    bands.paste((255, 0, 0), (20, 0, 40, 20))
    bands.paste((0, 0, 255), (40, 0, 60, 20))
    square = control_tensor(bands, 32, 32)  # 96 x 32 covers it; the middle 32 columns are the red band
    assert square.shape == (1, 3, 32, 32) and square.dtype == torch.float32
    assert square.min() >= 0 and square.max() <= 1
    inner = square[0, :, :, 4:28].mean((1, 2))
    assert inner[0] > 0.95 and inner[1] < 0.05 and inner[2] < 0.05
    wide = control_tensor(bands, 16, 48)  # the same aspect ratio: all three bands, resized
    assert wide[0, 1, :, 2:12].mean() > 0.95 and wide[0, 2, :, 36:46].mean() > 0.95


# ---- several ControlNets, LoRAs, feature upsamplers ------------------------------------------------------


def test_two_controlnets_sum(sd_model):
    model = sd_model
    _, denoiser, x = stage(model)
    a, b = tiny_controlnet(model, 1, zero=False), tiny_controlnet(model, 2, zero=False)
    only_a = sample(model, controlled_denoiser(model, control_for(model, a), denoiser, 3), x)
    with_zero = control_for(model, [tiny_controlnet(model), a])
    assert torch.equal(sample(model, controlled_denoiser(model, with_zero, denoiser, 3), x), only_a)
    b_off = control_for(model, [a, b], controlnet_conditioning_scale=[1.0, 0.0])
    assert torch.equal(sample(model, controlled_denoiser(model, b_off, denoiser, 3), x), only_a)
    only_a = sample(model, controlled_denoiser(model, control_for(model, a), denoiser, 4), x, 4)
    both = control_for(model, [a, b], control_guidance_end=[1.0, 0.5])
    calls_a, calls_b = spy(a), spy(b)
    summed = sample(model, controlled_denoiser(model, both, denoiser, 4), x, 4)
    assert (summed - only_a).abs().max() > 1e-4
    assert (len(calls_a), len(calls_b)) == (4, 2)  # b's window is the first half


def test_controlnet_with_a_lora(sd_model, tmp_path):
    from sc_app.lora import applied_loras
    from tiny_models import random_lora

    model = sd_model
    lora = random_lora(model, tmp_path / "style.safetensors")
    _, denoiser, x = stage(model)
    plain = sample(model, denoiser, x)
    zero, net = control_for(model, tiny_controlnet(model)), control_for(model, tiny_controlnet(model, zero=False))
    controlled = sample(model, controlled_denoiser(model, net, denoiser, 3), x)
    with applied_loras(model, [(lora, 1.0)]):
        lora_plain = sample(model, denoiser, x)
        lora_zero = sample(model, controlled_denoiser(model, zero, denoiser, 3), x)
        lora_controlled = sample(model, controlled_denoiser(model, net, denoiser, 3), x)
    assert (lora_plain - plain).abs().max() > 1e-3  # the LoRA acts
    assert torch.equal(lora_zero, lora_plain)
    assert (lora_controlled - lora_plain).abs().max() > 1e-3
    assert (lora_controlled - controlled).abs().max() > 1e-3  # both act together
    assert torch.equal(sample(model, controlled_denoiser(model, net, denoiser, 3), x), controlled)  # LoRA gone


def test_controlnet_with_the_feature_upsamplers(sd_model):
    from sc_app.upsampler import Adapter, stage_denoiser_for

    model = sd_model
    cond, denoiser, x = stage(model, 32, 32)
    pivot = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    adapters = []
    for trained in (False, True):
        adapter = Adapter(model.unet.config, width=4, scale=2.0, base_model=model.name)
        if trained:
            torch.manual_seed(3)
            with torch.no_grad():
                for upsampler in adapter.upsamplers:
                    upsampler.proj_out.weight.normal_(std=0.1)
        adapters.append(adapter.eval())

    def tuned(adapter):
        return stage_denoiser_for(model, adapter)(1, pivot, denoiser, cond, None)

    net = tiny_controlnet(model, zero=False)
    control = control_for(model, net)
    calls = spy(net)
    controlled_alone = sample(model, controlled_denoiser(model, control, denoiser, 3), x)
    # an untrained adapter adds zeros: the ControlNet's residuals reach the tuned denoiser's UNet pass unchanged
    untrained = sample(model, controlled_denoiser(model, control, tuned(adapters[0]), 3), x)
    assert torch.allclose(untrained, controlled_alone, atol=1e-6)
    trained = sample(model, tuned(adapters[1]), x)
    both = sample(model, controlled_denoiser(model, control, tuned(adapters[1]), 3), x)
    assert (both - trained).abs().max() > 1e-3 and (both - controlled_alone).abs().max() > 1e-3
    assert {c["sample"][-2:] for c in calls} == {(16, 16)}  # the pivot's feature pass (8 x 8) has no ControlNet
    assert not model.unet._forward_pre_hooks


def test_hook_is_removed_when_the_denoiser_fails(sd_model):
    model = sd_model
    control = control_for(model, tiny_controlnet(model))

    def failing(x, t, i):
        raise RuntimeError("stopped")

    with pytest.raises(RuntimeError, match="stopped"):
        controlled_denoiser(model, control, failing, 2)(torch.zeros(1, 4, 8, 8), torch.tensor(1), 0)
    assert not model.unet._forward_pre_hooks
    assert controlled_denoiser(model, None, failing, 2) is failing


# ---- loading ---------------------------------------------------------------------------------------------


def test_folder_loads_through_load_controlnets(sd_model, tmp_path):
    model = sd_model
    net = tiny_controlnet(model, zero=False)
    net.save_pretrained(tmp_path / "cn", safe_serialization=True)
    net.save_pretrained(tmp_path / "pipe" / "controlnet", safe_serialization=True)
    for source in (tmp_path / "cn", str(tmp_path / "pipe")):
        (loaded,) = load_controlnets(source, model)
        assert isinstance(loaded, ControlNetModel) and not loaded.training
        assert all(torch.equal(v, net.state_dict()[k]) for k, v in loaded.state_dict().items())
    _, denoiser, x = stage(model)
    from_folder = prepare_control(model, str(tmp_path / "cn"), layout(), 0.7)
    from_module = control_for(model, net, controlnet_conditioning_scale=0.7)
    a = sample(model, controlled_denoiser(model, from_folder, denoiser, 2), x)
    assert torch.equal(a, sample(model, controlled_denoiser(model, from_module, denoiser, 2), x))
    assert from_folder.summary()[0]["controlnet"] == str(tmp_path / "cn")
    assert from_folder.summary()[0]["scale"] == 0.7 and from_folder.summary()[0]["image"]["width"] == 40


def test_control_image_from_a_file(sd_model, tmp_path):
    layout().save(tmp_path / "layout.png")
    control = prepare_control(sd_model, tiny_controlnet(sd_model), str(tmp_path / "layout.png"))
    assert control.image_info[0]["source"] == "file" and control.images[0].size == (40, 20)


def one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"control_image": [layout(), layout()]}, "control_image: one image per ControlNet (1), got 2"),
        ({"control_image": None}, "controlnet needs a control_image"),
        ({"control_image": "/no/such/layout.png"}, "control_image /no/such/layout.png: no such file"),
        ({"control_image": 3}, "control_image must be a PIL image"),
        ({"control_guidance_start": 0.5, "control_guidance_end": 0.5}, "control_guidance_start must be below"),
        ({"control_guidance_start": 0.6, "control_guidance_end": 0.2}, "got 0.6 and 0.2"),
        ({"control_guidance_start": -0.1}, "control_guidance_start must be in [0, 1], got -0.1"),
        ({"control_guidance_end": 1.5}, "control_guidance_end must be in [0, 1], got 1.5"),
        ({"control_guidance_end": [0.5, 1.0]}, "control_guidance_end: one value per ControlNet (1), got 2"),
        ({"controlnet_conditioning_scale": float("nan")}, "controlnet_conditioning_scale must be a finite number"),
        ({"controlnet_conditioning_scale": -1.0}, "controlnet_conditioning_scale must be in [0, 5]"),
        ({"controlnet_conditioning_scale": [1.0, 1.0]}, "controlnet_conditioning_scale: one value per ControlNet"),
    ],
)
def test_bad_requests_refused_in_one_line(kwargs, expected):
    arguments = {"controlnet": "some/controlnet", "control_image": layout(), **kwargs}
    with pytest.raises(ValueError) as error:
        check_control(**arguments)
    assert expected in one_line(error)


def test_bad_requests_for_several_controlnets():
    with pytest.raises(ValueError) as error:
        check_control(["a", "b"], [layout()])
    assert "control_image: one image per ControlNet (2), got 1" in one_line(error)
    with pytest.raises(ValueError) as error:
        check_control(["a", "b"], [layout(), layout()], control_guidance_start=[0.0, 0.9], control_guidance_end=0.5)
    assert "control_guidance_start[1] must be below control_guidance_end[1], got 0.9 and 0.5" in one_line(error)
    with pytest.raises(ValueError) as error:
        check_control(None, layout())
    assert "need a controlnet" in one_line(error)
    assert check_control(None, None) is None
    control = check_control(["a", "b"], [layout(), layout()], [0.5, 1.0], [0.0, 0.1], 0.9)
    assert (control.scales, control.starts, control.ends) == ([0.5, 1.0], [0.0, 0.1], [0.9, 0.9])


def test_controlnet_for_another_model_refused(sd_model, sdxl_model):
    with pytest.raises(ValueError) as error:
        load_controlnets(tiny_controlnet(sdxl_model), sd_model)
    assert "made for SD XL (addition_embed_type 'text_time'), but" in one_line(error)
    with pytest.raises(ValueError) as error:
        load_controlnets(tiny_controlnet(sd_model), sdxl_model)
    assert "made for SD 1.x/2.x" in one_line(error)
    wide = ControlNetModel.from_config({**tiny_controlnet(sd_model).config, "cross_attention_dim": 8})
    with pytest.raises(ValueError) as error:
        load_controlnets([tiny_controlnet(sd_model), wide], sd_model)
    assert "controlnet[1] (ControlNetModel): cross_attention_dim 8, but" in one_line(error)
    assert "UNet has 16: a ControlNet for another base model" in one_line(error)
    sd_scale = ControlNetModel.from_unet(sd_model.unet)  # control images at 8x the latent size, as SD's
    with pytest.raises(ValueError) as error:
        load_controlnets(sd_scale, sd_model)
    assert "reads control images at 8x the latent size, but" in one_line(error)
    narrow = ControlNetModel.from_config({**tiny_controlnet(sd_model).config, "block_out_channels": (8, 8)})
    with pytest.raises(ValueError) as error:
        load_controlnets(narrow, sd_model)
    assert "its residuals do not fit" in one_line(error)
    with pytest.raises(ValueError) as error:
        load_controlnets(sd_model.unet, sd_model)
    assert "must be a diffusers ControlNetModel, a folder or a hub id, got UNet2DConditionModel" in one_line(error)


def test_unfit_folders_refused(sd_model, sd_folder, tmp_path):
    net = tiny_controlnet(sd_model)
    net.save_pretrained(tmp_path / "pickled", safe_serialization=False)
    with pytest.raises(ValueError) as error:
        load_controlnets(str(tmp_path / "pickled"), sd_model)
    assert "only pickle weights (diffusion_pytorch_model.bin); this program reads safetensors only" in one_line(error)
    with pytest.raises(ValueError) as error:  # found before any model is needed
        check_control([str(tmp_path / "pickled")], [layout()])
    assert f"controlnet {str(tmp_path / 'pickled')!r}: it holds only pickle weights" in one_line(error)
    with pytest.raises(ValueError) as error:
        load_controlnets(str(sd_folder / "unet"), sd_model)
    assert "a UNet2DConditionModel, not a ControlNetModel" in one_line(error)
    with pytest.raises(ValueError) as error:
        load_controlnets(str(tmp_path / "missing"), sd_model)
    assert "no such folder" in one_line(error)
    with pytest.raises(ValueError) as error:
        load_controlnets(str(sd_folder), sd_model)
    assert "not a diffusers ControlNet folder (no config.json)" in one_line(error)


def test_nan_weights_refused(sd_model, tmp_path):
    net = tiny_controlnet(sd_model)
    with torch.no_grad():
        net.controlnet_mid_block.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError) as error:
        load_controlnets(net, sd_model)
    assert "1 tensor is not finite (NaN or inf): controlnet_mid_block.weight" in one_line(error)
    net.save_pretrained(tmp_path / "nan", safe_serialization=True)
    with pytest.raises(ValueError) as error:
        load_controlnets(tmp_path / "nan", sd_model)
    assert f"controlnet {str(tmp_path / 'nan')!r}: 1 tensor is not finite" in one_line(error)
