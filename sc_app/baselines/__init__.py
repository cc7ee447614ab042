"""Baselines for A/B comparisons: ScaleCrafter (re-dilated convolutions) and Attn-SF (attention entropy scaling).

Each is a patch with an apply/remove pair that restores the UNet exactly, plus one sampling call that runs
`sc_app.cascade.direct` with the patch active only inside the UNet calls.

The peers DemoFusion (demofusion.py) and FreeScale (freescale.py) run over the scale plan like the self-cascade
and return every stage; what they share (skip residuals, windows, blur) is in progressive.py.
"""

# The negative prompt the DemoFusion and FreeScale releases' scripts and demos pass (run_freescale.py, demo_lowvram.py);
# our runs pass none unless asked, so that every method sees the same prompt pair: give this to reproduce them.
RELEASE_NEGATIVE_PROMPT = "blurry, ugly, duplicate, poorly drawn, deformed, mosaic"
