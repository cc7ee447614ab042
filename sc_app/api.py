"""All methods through one door: `generate(model_or_pipe, prompt, height, width, method=...)`."""
from __future__ import annotations

from .cascade import Result, direct, self_cascade
from .models import Model

METHODS = ("self-cascade", "direct", "scalecrafter", "attn-sf")


def as_model(model) -> Model:
    """A loaded Model as it is, or a diffusers SD / SD XL pipeline the user already has."""
    return model if isinstance(model, Model) else Model.from_pipeline(model)


def generate(model, prompt: str | list[str], height: int, width: int, method: str = "self-cascade", *,
             k: int | list[int] | None = None, stages: int | None = None, upsample: str = "bilinear",
             upsampler=None, **common) -> Result:
    """Run one method. `common` takes negative_prompt, num_inference_steps, guidance_scale, seed or
    generator, callback, on_stage, progress. `upsampler` (an Adapter or a .safetensors path) turns the
    self-cascade into its tuned version in every stage whose scale the adapter fits."""
    model = as_model(model)
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if method != "self-cascade" and (k is not None or stages is not None or upsampler is not None):
        raise ValueError(f"k, stages and upsampler apply to the self-cascade only, not to method {method!r}")
    if method == "self-cascade":
        stage_denoiser = None
        if upsampler is not None:
            from .upsampler import Adapter, load_adapter, stage_denoiser_for
            adapter = upsampler if isinstance(upsampler, Adapter) else load_adapter(upsampler, model)
            k = adapter.k if k is None else k  # the adapter only saw timesteps 1..its K in training
            stage_denoiser = stage_denoiser_for(model, adapter)
        return self_cascade(model, prompt, height, width, k=k, stages=stages, upsample=upsample,
                            stage_denoiser=stage_denoiser, **common)
    if method == "direct":
        return direct(model, prompt, height, width, **common)
    if method == "scalecrafter":
        from .baselines.scalecrafter import scalecrafter
        return scalecrafter(model, prompt, height, width, **common)
    from .baselines.attn_sf import attn_sf
    return attn_sf(model, prompt, height, width, **common)
