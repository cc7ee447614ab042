"""ScaleCrafter (He et al. 2023): re-dilated UNet convolutions in the early steps, noise-damped guidance.

A plan names blocks and their dilation d. For steps i < tau the ResNet convs (`resnets.*.conv1/conv2`) and
the down/upsampler convs of those blocks run with dilation ceil(d) and matching padding; conv_in, conv_out,
shortcuts and attention never change. tau counts steps of a 50-step schedule, as in ScaleCrafter's
configs: with another step count, step i is re-dilated while i / steps < tau / 50.

As the release's text2image scripts run it by default: FreeU on (its values for SD 1.x, 2.x and XL, by the
channels entering each up-block ResNet: `freeu.py`; none for other UNets, for which no values were released) and
guidance 5 on SD XL (7.5 on SD 1.x/2.x, the model's guidance elsewhere), unless the call or the model folder says
otherwise (`self_cascade.json`, key "scalecrafter").
"""

from __future__ import annotations

import math
import re
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from ..cascade import Result, check_inputs, direct
from ..sampling import Conditioning, Denoiser, guided_denoiser
from .freeu import RULES, check_values, freeu_applied, released_values
from .progressive import model_settings

BASE_STEPS = 50
XL_GUIDANCE = 5.0  # text2image_xl.py's default
# A conv that re-dilation may touch: a ResNet conv1/conv2 or a sampler conv, inside a down, mid or up block.
_CONV = re.compile(
    r"(?P<block>(?:down|up)_blocks\.\d+|mid_block)\.(?P<part>resnets|downsamplers|upsamplers)"
    r"\.\d+\.(?:conv1|conv2|conv)"
)
_SAVED = "_scalecrafter_saved"  # on a patched conv: (dilation, padding, hook handles) that apply replaced


@dataclass(frozen=True)
class Plan:
    """Blocks to re-dilate, for steps i < tau (of 50).

    Keys are `down_blocks.N`, `mid_block`, `up_blocks.N`, or one part of a block (`down_blocks.N.resnets`,
    `down_blocks.N.downsamplers`, `up_blocks.N.upsamplers`), which wins over its block.
    `progressive`: d_i = max(ceil(d (tau - i) / tau), 2). `ndcfg`: the mild dilations of the unconditional
    branch of noise-damped guidance, used for the same steps (and progressive schedule) as `dilations`.
    """

    dilations: dict[str, float]
    tau: int
    progressive: bool = False
    ndcfg: dict[str, float] | None = None
    preset: str = "custom"

    def __post_init__(self):
        if not 0 <= self.tau <= BASE_STEPS:
            raise ValueError(f"tau counts steps of {BASE_STEPS} and must be in 0..{BASE_STEPS}, got {self.tau}")
        for name, table in (("dilations", self.dilations), ("ndcfg", self.ndcfg or {})):
            bad = {block: d for block, d in table.items() if not d >= 1}
            if bad:
                raise ValueError(f"{name}: every dilation must be >= 1, got {bad}")

    def settings(self, steps: int) -> dict:
        """What result.json records about the run."""
        return {
            "preset": self.preset,
            "dilations": dict(self.dilations),
            "tau": self.tau,
            "redilated_steps": -(-self.tau * steps // BASE_STEPS),
            "progressive": self.progressive,
            "ndcfg": dict(self.ndcfg) if self.ndcfg else None,
        }


# ---- presets: ScaleCrafter's released settings, by UNet family and (long side, short side) ------------
# Transcribed from github.com/YingqingHe/ScaleCrafter: configs/<family>_<W>x<H>.yaml give tau (`dilate_tau`),
# `progressive` and the settings files; assets/dilate_settings/<family>_<W>x<H>.txt list conv -> d, and
# assets/ndcfg_dilate_settings/<family>_<W>x<H>.txt the noise-damped branch's, used only where the config's
# `ndcfg_tau` > 0 (it then always equals `dilate_tau`, which is why a Plan has one tau). The files name the
# convs of the SD layout; SD XL's files also list `down_blocks.3`, which SD XL's UNet does not have.


def _same(blocks: list[str], d: float) -> dict[str, float]:
    return dict.fromkeys(blocks, d)


_SD_DEEP = [  # every level below the top, in SD 1.x / 2.x: the 1024x1024 and 1280x1280 tables
    "down_blocks.1",
    "down_blocks.2",
    "down_blocks.3",
    "mid_block",
    "up_blocks.0",
    "up_blocks.1",
    "up_blocks.2",
]
_SD_PROGRESSIVE = {  # SD 2.1's 2048x1024 table; SD 1.5's at both 2048x1024 and 2048x2048
    "down_blocks.1": 2,
    "down_blocks.2": 3,
    "down_blocks.3": 4,
    "mid_block": 4,
    "up_blocks.0": 4,
    "up_blocks.1": 3,
    "up_blocks.2": 2,
}
_SD15_NDCFG = {k: d for k, d in _SD_PROGRESSIVE.items() if k not in ("down_blocks.1", "up_blocks.2")}
_SD21_2048 = {
    "down_blocks.2.resnets": 3,
    "down_blocks.2.downsamplers": 4,
    "down_blocks.3": 4,
    "mid_block": 4,
    "up_blocks.0": 4,
    "up_blocks.1": 4,
    "up_blocks.2": 3,
}
_XL_DEEP = ["mid_block", "up_blocks.0"]
_XL_PROGRESSIVE = {"mid_block": 4, "up_blocks.0": 4, "up_blocks.1": 3, "up_blocks.2": 2}

PRESETS: dict[str, dict[tuple[int, int], Plan]] = {
    "sd1.5": {  # 512 base
        (1024, 1024): Plan(_same(_SD_DEEP, 2), 30, preset="sd1.5 1024x1024"),
        (1280, 1280): Plan(_same(_SD_DEEP, 2.5), 35, preset="sd1.5 1280x1280"),
        (2048, 1024): Plan(
            dict(_SD_PROGRESSIVE), 35, progressive=True, ndcfg=dict(_SD15_NDCFG), preset="sd1.5 2048x1024"
        ),
        (2048, 2048): Plan(
            dict(_SD_PROGRESSIVE), 35, progressive=True, ndcfg=dict(_SD15_NDCFG), preset="sd1.5 2048x2048"
        ),
    },
    "sd2.1": {  # 512 base
        (1024, 1024): Plan(_same(_SD_DEEP, 2), 20, preset="sd2.1 1024x1024"),
        (1280, 1280): Plan(_same(_SD_DEEP, 2.5), 30, preset="sd2.1 1280x1280"),
        # The repo ships an ndcfg table for 2048x1024 too, but its config sets ndcfg_tau 0: not used.
        (2048, 1024): Plan(dict(_SD_PROGRESSIVE), 37, progressive=True, preset="sd2.1 2048x1024"),
        (2048, 2048): Plan(
            {**_SD21_2048, "up_blocks.3": 2}, 37, progressive=True, ndcfg=dict(_SD21_2048), preset="sd2.1 2048x2048"
        ),
    },
    "sdxl": {  # 1024 base
        (2048, 2048): Plan(_same(_XL_DEEP, 2), 30, preset="sdxl 2048x2048"),
        (2560, 2560): Plan(_same(_XL_DEEP, 2.5), 30, preset="sdxl 2560x2560"),
        (4096, 2048): Plan(
            {"down_blocks.2": 3, **_XL_PROGRESSIVE},
            35,
            progressive=True,
            ndcfg=_same(_XL_DEEP, 2),
            preset="sdxl 4096x2048",
        ),
        (4096, 4096): Plan(
            {"down_blocks.2": 4, **_XL_PROGRESSIVE},
            35,
            progressive=True,
            ndcfg=_same(_XL_DEEP, 2),
            preset="sdxl 4096x4096",
        ),
    },
}

_SD_CHANNELS = (320, 640, 1280, 1280)
_SD_TEXT_WIDTH = {768: "sd1.5", 1024: "sd2.1"}  # CLIP ViT-L/14 (SD 1.x), OpenCLIP ViT-H/14 (SD 2.x)


def unet_family(unet, base_size: int) -> str | None:
    """'sd1.5', 'sd2.1' or 'sdxl' when the UNet has that layout and base size, else None.

    SD 1.x and SD 2.x share the four-level (320, 640, 1280, 1280) layout and the 512 base; the text width
    (cross_attention_dim 768 or 1024) tells them apart, and each has its own released presets. The layout
    with any other text width is neither: it gets the general rule.
    """
    config = unet.config
    channels, xl = tuple(config.block_out_channels), config.addition_embed_type == "text_time"
    if xl and channels == (320, 640, 1280) and base_size == 1024:
        return "sdxl"
    if not xl and channels == _SD_CHANNELS and base_size == 512:
        width = getattr(config, "cross_attention_dim", None)
        return _SD_TEXT_WIDTH.get(width) if isinstance(width, int) else None
    return None


def general_plan(unet, base_size: int, height: int, width: int) -> Plan:
    """The rule for other models and sizes: d = sqrt(target pixels / base pixels) on every block below the
    top level, tau = min(37, round(20 (d - 1))) (SD 2.1's 20 at d=2, 30 at 2.5, 37 from 4x2x), progressive
    above d = 2.5 as SD 2.1's presets are; no noise-damped guidance. At or below the base size: no change."""
    d = math.sqrt(height * width / base_size**2)
    if d <= 1:
        return Plan({}, 0, preset="general rule")
    return Plan(_same(_below_top(unet), d), min(37, round(20 * (d - 1))), progressive=d > 2.5, preset="general rule")


def _below_top(unet) -> list[str]:
    """Every block below the UNet's top level: the general rule's blocks."""
    levels = len(unet.config.down_block_types)
    down, up = [f"down_blocks.{n}" for n in range(1, levels)], [f"up_blocks.{n}" for n in range(levels - 1)]
    return down + ["mid_block"] + up


def plan_for(unet, base_size: int, height: int, width: int) -> Plan:
    """The released preset for this UNet and size (either orientation: dilation is isotropic), else the
    general rule."""
    presets = PRESETS.get(unet_family(unet, base_size), {})
    return presets.get((max(height, width), min(height, width))) or general_plan(unet, base_size, height, width)


def plan_with(
    unet,
    base_size: int,
    height: int,
    width: int,
    dilation: float | None = None,
    tau: int | None = None,
    ndcfg: float | None = None,
) -> Plan:
    """plan_for's plan with its dilation factor, tau and/or noise-damped branch replaced: the points of a
    settings search around it.

    `dilation` goes on the blocks the plan re-dilates (the general rule's blocks also where the rule itself
    changes nothing) as one constant factor for the steps before tau: a preset's per-block table and its
    progressive schedule (which never goes below 2) give way to it, and a noise-damped branch is capped at it,
    so that it stays the milder one. `ndcfg` turns on noise-damped guidance (or replaces the preset's) with
    that milder factor on the same blocks. ValueError for a tau or dilation that a Plan refuses, or an
    ndcfg above the dilation.
    """
    plan = plan_for(unet, base_size, height, width)
    changes = {} if tau is None else {"tau": tau}
    if dilation is not None:
        changes["dilations"] = _same(list(plan.dilations) or _below_top(unet), dilation)
        changes["ndcfg"] = {block: min(d, dilation) for block, d in plan.ndcfg.items()} if plan.ndcfg else None
        changes["progressive"] = False
    if ndcfg is not None:
        dilations = changes.get("dilations", plan.dilations)
        if not dilations:
            raise ValueError(f"ndcfg: the plan re-dilates nothing at {width}x{height}; give a dilation too")
        if ndcfg > min(dilations.values()):
            raise ValueError(f"ndcfg {ndcfg:g} must be at most the plan's dilation {min(dilations.values()):g}")
        changes["ndcfg"] = _same(list(dilations), ndcfg)
    if not changes:
        return plan
    given = ", ".join(
        f"{key} {value:g}"
        for key, value in (("dilation", dilation), ("tau", tau), ("ndcfg", ndcfg))
        if value is not None
    )
    return replace(plan, **changes, preset=f"{plan.preset}, {given}")


# ---- schedule ------------------------------------------------------------------------------------


def step_dilation(d: float, tau: int, i: int, steps: int, progressive: bool) -> float | None:
    """The dilation at step i of `steps`, None once the schedule has passed tau (of 50)."""
    # Integer arithmetic in 50-step units, so ceil never sees rounding noise.
    left, span = tau * steps - BASE_STEPS * i, tau * steps
    if left <= 0:
        return None
    return max(math.ceil(d * left / span), 2) if progressive else d


def conv_targets(unet, blocks: dict[str, float]) -> dict[str, float]:
    """Conv module name -> d for the convs that `blocks` selects (a block part wins over its block)."""
    targets = {}
    for name, module in unet.named_modules():
        match = _CONV.fullmatch(name)
        if match is None or not isinstance(module, nn.Conv2d):
            continue
        block = match["block"]
        d = blocks.get(f"{block}.{match['part']}", blocks.get(block))
        if d is not None:
            targets[name] = d
    return targets


def _at_step(targets: dict[str, float], plan: Plan, i: int, steps: int) -> dict[str, float]:
    at = {name: step_dilation(d, plan.tau, i, steps, plan.progressive) for name, d in targets.items()}
    return {name: d for name, d in at.items() if d is not None}


# ---- the patch -----------------------------------------------------------------------------------


def _out_size(size: int, conv: nn.Conv2d, axis: int, dilation: tuple, padding: tuple) -> int:
    k, s = conv.kernel_size[axis], conv.stride[axis]
    return (size + 2 * padding[axis] - dilation[axis] * (k - 1) - 1) // s + 1


def _resize_hooks(conv: nn.Conv2d, factor: float, dilation: tuple, padding: tuple) -> list:
    """Fractional d: the input is resized by ceil(d)/d before the conv, the output back to the plain size."""
    pending = []  # the plain output size of each call in flight

    def before(module, args):
        x = args[0]
        pending.append(tuple(_out_size(n, conv, a, dilation, padding) for a, n in enumerate(x.shape[-2:])))
        size = [round(n * factor) for n in x.shape[-2:]]
        return (F.interpolate(x, size=size, mode="bilinear", align_corners=False), *args[1:])

    def after(module, args, out):
        return F.interpolate(out, size=pending.pop(), mode="bilinear", align_corners=False)

    return [conv.register_forward_pre_hook(before), conv.register_forward_hook(after)]


def _redilate(conv: nn.Conv2d, name: str, d: float) -> None:
    if not isinstance(conv, nn.Conv2d) or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise ValueError(f"{name}: only a zero-padded nn.Conv2d with numeric padding can be re-dilated")
    whole = math.ceil(d)
    saved = (conv.dilation, conv.padding)
    conv.dilation = (whole, whole)
    conv.padding = (whole * (conv.kernel_size[0] // 2), whole * (conv.kernel_size[1] // 2))
    handles = _resize_hooks(conv, whole / d, *saved) if whole != d else []
    setattr(conv, _SAVED, (*saved, handles))


def remove_redilation(unet: nn.Module) -> None:
    """Put back every conv that apply_redilation changed: dilation, padding, and no hooks left."""
    for module in unet.modules():
        saved = module.__dict__.pop(_SAVED, None)
        if saved is not None:
            module.dilation, module.padding, handles = saved
            for handle in handles:
                handle.remove()


def apply_redilation(unet: nn.Module, convs: dict[str, float]) -> None:
    """Re-dilate the named convs (conv name -> d >= 1). Replaces an earlier apply, so twice is safe."""
    remove_redilation(unet)
    try:
        for name, d in convs.items():
            if d != 1:
                _redilate(unet.get_submodule(name), name, d)
    except Exception:
        remove_redilation(unet)
        raise


@contextmanager
def redilated(unet: nn.Module, convs: dict[str, float]):
    """apply_redilation for the body of a `with`, removed on the way out, also when it raised."""
    apply_redilation(unet, convs)
    try:
        yield unet
    finally:
        remove_redilation(unet)


# ---- sampling ------------------------------------------------------------------------------------


def _unconditional(cond: Conditioning, added: dict | None) -> tuple[Conditioning, dict | None]:
    """The unconditional half of a guided batch (cond.embeds is [uncond, cond])."""
    n = len(cond.embeds) // 2
    pooled = cond.pooled[:n] if cond.pooled is not None else None
    return Conditioning(cond.embeds[:n], pooled, 0.0), ({k: v[:n] for k, v in added.items()} if added else None)


def scalecrafter_denoiser(
    unet,
    plan: Plan,
    steps: int,
    denoiser: Denoiser,
    cond: Conditioning,
    added: dict | None,
    first_step: int = 0,
) -> Denoiser:
    """`denoiser` with re-dilation for i < tau; with a guided `cond` and plan.ndcfg, noise-damped guidance:
    eps = eps_uncond(mild) + w (eps_cond(full) - eps_uncond(full)). `first_step`: the step of the whole
    schedule the run starts at (an SDEdit run starts at K), so i counts from there."""
    full = conv_targets(unet, plan.dilations)
    mild = conv_targets(unet, plan.ndcfg) if plan.ndcfg and cond.guided else None
    if mild is not None:
        # Guidance scale 0 makes guided_denoiser one plain UNet pass over the batch it is given.
        both = guided_denoiser(unet, replace(cond, guidance_scale=0.0), added)
        uncond_only = guided_denoiser(unet, *_unconditional(cond, added))

    def denoise(x: torch.Tensor, t: torch.Tensor, i: int) -> torch.Tensor:
        convs = _at_step(full, plan, first_step + i, steps)
        if not convs:
            return denoiser(x, t, i)
        if mild is None:
            with redilated(unet, convs):
                return denoiser(x, t, i)
        with redilated(unet, convs):
            uncond_full, text_full = both(torch.cat([x, x]), t, i).chunk(2)
        with redilated(unet, _at_step(mild, plan, first_step + i, steps)):
            uncond_mild = uncond_only(x, t, i)
        return uncond_mild + cond.guidance_scale * (text_full - uncond_full)

    return denoise


def scalecrafter(
    model,
    prompt: str | list[str],
    height: int,
    width: int,
    *,
    num_inference_steps: int = 50,
    plan: Plan | None = None,
    freeu: dict | bool | None = None,
    freeu_rule: str | None = None,
    **common,
) -> Result:
    """Direct sampling at the target size with ScaleCrafter's re-dilation (He et al. 2023).

    `plan`: None picks the released preset for the model and size, else the general rule (see plan_for).
    `common` takes the other arguments of `sc_app.cascade.direct`, `image` (SDEdit, re-dilated where its
    steps are among the schedule's first tau of 50) and `sampling` among them. tau and the noise-damped
    guidance count steps from the start of the schedule, whichever the sampler: step i is re-dilated while
    i / steps < tau / 50. `freeu` (a dict of b1, b2, s1, s2, or False for none) by `freeu_rule` ("channels",
    the release's; "blocks", diffusers'): default the release's for the model's family (see the module).
    """
    release = {"freeu": released_values(model), "freeu_rule": "channels"}
    release["guidance_scale"] = XL_GUIDANCE if model.is_xl else None  # None: the model's own
    given = {"freeu": freeu, "freeu_rule": freeu_rule, "guidance_scale": common.get("guidance_scale")}
    settings = model_settings(model, "scalecrafter", release, given)
    settings["freeu"] = check_values(settings["freeu"])
    if settings["freeu_rule"] not in RULES:
        raise ValueError(f"freeu_rule must be one of {', '.join(RULES)}, got {settings['freeu_rule']!r}")
    common["guidance_scale"] = settings["guidance_scale"]
    check_inputs(model, height, width, num_inference_steps, common.get("guidance_scale") or 0.0)
    plan = plan or plan_for(model.unet, model.base_size, height, width)

    def factory(denoiser, cond, added, h, w, first_step=0):
        return scalecrafter_denoiser(model.unet, plan, num_inference_steps, denoiser, cond, added, first_step)

    with freeu_applied(model.unet, settings["freeu"], settings["freeu_rule"]):
        result = direct(
            model,
            prompt,
            height,
            width,
            num_inference_steps=num_inference_steps,
            denoiser_factory=factory,
            method="scalecrafter",
            **common,
        )
    result.settings.update(plan.settings(num_inference_steps))
    result.settings |= {"freeu": settings["freeu"], "freeu_rule": settings["freeu_rule"]}
    if result.settings.get("image_mode") == "sdedit":  # the steps before K were never run
        skipped = num_inference_steps - result.stages[-1].steps
        result.settings["redilated_steps"] = max(0, result.settings["redilated_steps"] - skipped)
    return result
