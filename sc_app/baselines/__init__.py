"""Baselines for A/B comparisons: ScaleCrafter (re-dilated convolutions) and Attn-SF (attention entropy scaling).

Each is a patch with an apply/remove pair that restores the UNet exactly, plus one sampling call that runs
`sc_app.cascade.direct` with the patch active only inside the UNet calls.
"""
