"""The page: `build()` puts the tabs together for a loaded model, `launch()` queues and serves it.

Each tab is its own module (`sc_app.ui.generate`, `.compare`, `.tune`, `.video`, `.review`) that builds the tab
and wires its events; what crosses tabs is wired here: an adapter loaded or tuned on one tab is offered on the
others, and so is a LoRA uploaded on Generate or Compare.

What the server serves is decided here too (`launch`): of the work folder, only served/ (what pages are shown:
each run's images and clips, a tuned adapter to download, the votes as CSV); the folders the app keeps state in
(the review store with its browser secret, jobs with their uploads and checkpoints, adapters, LoRAs, stop files)
are refused by name as well, in case a path ever leads there.
"""

from __future__ import annotations

import sys
from pathlib import Path

import gradio as gr

from ..checks import megapixels
from .common import EMBEDDED_EXAMPLES, SD_EXAMPLES, model_label
from .compare import compare_tab
from .generate import generate_tab
from .review import REVIEW_CSS, review_page, review_tab
from .runner import LINK_ROUTE, Runner
from .status import CSS
from .studio import Studio
from .tune import tune_tab
from .video import video_tab

MAX_UPLOAD_SIZE = "200mb"  # per file, enforced by gradio on upload
QUEUE_SIZE = 32


def build(
    model,
    *,
    max_pixels: int | None = None,
    work_dir: str | Path | None = None,
    video_model="embedded",
    motion_adapter: str | None = None,
    review_token: str | None = None,
) -> gr.Blocks:
    """The Blocks for a loaded model. `max_pixels`: the size limit (else $SC_MAX_PIXELS, else a default
    for the device); `work_dir`: the app's own folder (else $SC_WORK_DIR, else one in the temp folder);
    `video_model`: the Video tab's model, a loaded VideoModel or a name for `load_video_model` (loaded on
    first use), with `motion_adapter` for an SD 1.5 folder; `review_token`: the owner's token for resetting the
    Review tab's votes (else $SC_REVIEW_TOKEN; none: no reset)."""
    studio = Studio(
        model, max_pixels=max_pixels, work_dir=work_dir, video_model=video_model, motion_adapter=motion_adapter
    )
    base, m = model.base_size, model.size_multiple
    examples = EMBEDDED_EXAMPLES if model.name in ("embedded", "embedded-flow") else SD_EXAMPLES  # the shapes world
    gpu = dict(concurrency_id="gpu", concurrency_limit=1)
    adapters = list(studio.adapters())

    with gr.Blocks(title="Self-Cascade Studio", analytics_enabled=False, delete_cache=(3600, 86400)) as demo:
        demo.studio = studio
        gr.Markdown(
            f"# Self-Cascade Studio\nHigher resolutions from a pre-trained diffusion model: a pivot at the "
            f"model's own size, then stages of about 4x the pixels, each re-noised to K and denoised again. "
            f"Model **{model_label(model.name)}**, trained at {base} x {base}; sizes are multiples of {m}; limit "
            f"{megapixels(studio.max_pixels)}."
        )
        with gr.Tabs():
            adapter, adapter_upload, lora, lora_upload = generate_tab(studio, examples, adapters, gpu)
            c_adapter, c_lora, c_lora_upload = compare_tab(studio, examples, adapters, gpu)
            tune_tab(studio, [adapter, c_adapter])
            video_tab(studio, gpu)
            review_tab(studio, work_dir, review_token)
        # an adapter loaded on Generate is offered on Compare too (a tuned one: `tune_tab`)
        adapter_upload.upload(studio.upload_adapter, adapter_upload, [adapter, c_adapter], api_name="load_adapter")
        # a LoRA uploaded on Generate or Compare is selected there and offered on the other
        lora_upload.upload(studio.upload_lora, lora_upload, [lora, c_lora, lora_upload], api_name="load_lora")
        c_lora_upload.upload(studio.upload_lora, c_lora_upload, [c_lora, lora, c_lora_upload], api_visibility="private")
    return demo


class ReviewServer(Runner):
    """What reviewer mode's page stands on: the work folder (its served/, the links to the pairs' images) and the
    review store; no model."""

    def __init__(self, work_dir: str | Path | None = None):
        super().__init__(None, work_dir)

    def private_dirs(self) -> list[Path]:
        return [*super().private_dirs(), self.review.store.root]


def build_review(*, work_dir: str | Path | None = None, review_token: str | None = None) -> gr.Blocks:
    """Reviewer mode (`python app.py --review-only`): a page with the blind pairs and nothing else, over the review
    store of `work_dir` (the one the full app's Compare runs fill; else $SC_WORK_DIR, else the temp folder's). The
    API has the review's endpoints alone; Results need `review_token` (else $SC_REVIEW_TOKEN)."""
    server = ReviewServer(work_dir)
    # the page names nothing that hints at a method, the studio's own name (a method's) included
    with gr.Blocks(title="Image review", analytics_enabled=False, delete_cache=(3600, 86400)) as demo:
        demo.studio = server
        gr.Markdown("# Which image is better?")
        review_page(server, work_dir, review_token)
    return demo


class _RunningIterators(dict):
    """gradio's table of running event iterators, where removing one that is gone is a no-op. Its /cancel route
    checks for the event outside its lock and deletes it inside: a cancel sent twice (a client retrying on a
    busy server) or for an event that has just finished raised KeyError, a traceback in the server's log."""

    def __delitem__(self, key) -> None:
        self.pop(key, None)


def launch(demo: gr.Blocks, *, host: str | None = None, port: int | None = None, share: bool = False, **kwargs):
    """Queue (GPU events one at a time, a bounded queue) and serve; `kwargs` go to `Blocks.launch`. A cancel of
    a finished or unknown event is a no-op (`_RunningIterators`).

    gradio's file route serves its own cache (uploads, and copies of what handlers return) and the allowed
    paths: here only the work folder's served/. The app's private folders are blocked paths, which gradio
    checks first, both on that route and on every file a handler returns."""
    studio: Studio = demo.studio
    demo.queue(max_size=QUEUE_SIZE, default_concurrency_limit=1)
    wait = not kwargs.pop("prevent_thread_lock", False)
    quiet = kwargs.pop("quiet", False)
    # gradio's own lines say "set share=True in launch()"; ours name the --share flag
    kwargs.setdefault("css", CSS + REVIEW_CSS)
    served = demo.launch(
        server_name=host,
        server_port=port,
        share=share,
        max_file_size=MAX_UPLOAD_SIZE,
        allowed_paths=[str(studio.served_dir)],
        blocked_paths=[str(folder) for folder in studio.private_dirs()],
        prevent_thread_lock=True,
        quiet=True,
        **kwargs,
    )
    if not quiet:
        print(f"* Running on local URL: {demo.local_url}")
        print(
            f"* Running on public URL: {demo.share_url}"
            if demo.share_url
            else "* For a public link, start the app with --share.",
            flush=True,
        )
    demo.server_app.iterators = _RunningIterators(demo.server_app.iterators)
    # the page's pictures by opaque links (`Runner.links`): the stage rows, the review pairs
    demo.server_app.add_api_route(f"{LINK_ROUTE}/{{token}}/{{name}}", studio.links.response, methods=["GET"])
    if wait and not bool(getattr(sys, "ps1", sys.flags.interactive)):  # as Blocks.launch itself would
        demo.block_thread()
    return served
