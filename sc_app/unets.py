"""Video UNets as the samplers call them: one call signature for ModelScope's and AnimateDiff's layouts.

`sc_app.video` (the video cascade) and `sc_app.upsampler` (the tuned denoiser and the pivot's features) both
call video UNets through `sampling_unet`; it lives here so that neither imports the other for it.
"""

from __future__ import annotations

from diffusers import UNetMotionModel


def sampling_unet(unet):
    """The UNet as `guided_denoiser` calls it, whichever video layout it has.

    UNetMotionModel takes one text embedding per frame (AnimateDiff's pipeline repeats them itself);
    UNet3DConditionModel repeats them inside and has no `added_cond_kwargs`.
    """
    if isinstance(unet, UNetMotionModel):

        def call(sample, timestep, encoder_hidden_states, **kwargs):
            per_frame = encoder_hidden_states.repeat_interleave(sample.shape[2], dim=0)
            return unet(sample, timestep, encoder_hidden_states=per_frame, **kwargs)
    else:

        def call(sample, timestep, encoder_hidden_states, added_cond_kwargs=None, **kwargs):
            return unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, **kwargs)

    return call
