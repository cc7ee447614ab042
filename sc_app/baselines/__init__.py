"""Baselines for A/B comparisons: ScaleCrafter (re-dilated convolutions) and Attn-SF (attention entropy scaling).

Each is a patch with an apply/remove pair that restores the UNet exactly, plus one sampling call that runs
`sc_app.cascade.direct` with the patch active only inside the UNet calls.

The peers DemoFusion (demofusion.py) and FreeScale (freescale.py) run over the scale plan like the self-cascade
and return every stage; what they share (skip residuals, windows, blur) is in progressive.py.
"""
