"""LoRAs in the page (Generate, Compare, Video: shipped, uploaded, at a scale) and Compare's sr and lanczos, through
the handlers and the HTTP API, on tiny models built in code."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import numpy as np
import pytest
import torch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image
from test_app import free_port
from test_app_video import read_mp4, video_args

from sc_app.files import write_safetensors
from tiny_models import make_upscaler, random_lora

MAX_PIXELS = 4 * 64 * 64
RUN = ("a red circle", "", "1:1", "4x", "auto", 700, 3, 5.0, 0, "none")  # Generate's widgets, up to the adapter


@pytest.fixture(scope="module")
def app(sd_model, animatediff_model, tmp_path_factory):
    """The page on the tiny SD model, with the tiny AnimateDiff model (LoRAs load into its UNet) for Video."""
    from sc_app import ui

    work = tmp_path_factory.mktemp("work")
    demo = ui.build(sd_model, max_pixels=MAX_PIXELS, work_dir=work, video_model=animatediff_model)
    port = free_port()
    ui.launch(demo, host="127.0.0.1", port=port, prevent_thread_lock=True, quiet=True, ssr_mode=False)
    yield SimpleNamespace(url=f"http://127.0.0.1:{port}/", studio=demo.studio, model=sd_model, work=work)
    demo.close()


@pytest.fixture(scope="module")
def style(sd_model, app, tmp_path_factory) -> str:
    """A LoRA with large random weights, uploaded: its label."""
    path = random_lora(sd_model, tmp_path_factory.mktemp("lora") / "style.safetensors")
    chosen, _, cleared = app.studio.upload_lora(str(path))
    assert cleared is None
    return chosen["value"]


def final(outputs) -> bytes:
    with Image.open(outputs[1]) as image:
        return image.tobytes()


def kept(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []


# ---- Generate --------------------------------------------------------------------------------------


def test_a_lora_changes_the_image_is_recorded_and_does_not_leak(app, style):
    before = list(app.studio.generate(*RUN))[-1]
    styled = list(app.studio.generate(*RUN, style, 0.8))[-1]
    after = list(app.studio.generate(*RUN))[-1]
    assert final(styled) != final(before) and final(after) == final(before)  # nothing of the LoRA stays
    assert app.model.pipe.get_list_adapters() == {}
    path = app.studio.loras.choices()[style]
    assert styled[2].endswith(f", seed 0, LoRA {style} at 0.8.")
    result = styled[3]
    assert [(r["file"], r["scale"]) for r in result["loras"]] == [(str(path), 0.8)]
    assert len(result["loras"][0]["sha256"]) == 64
    assert f"--lora {path}:0.8 " in result["settings"]
    assert "--lora" not in before[3]["settings"] and before[3]["loras"] == []


def test_the_settings_line_with_a_lora_makes_the_same_image_on_the_command_line(app, style, tmp_path):
    from sc_app.__main__ import main

    outputs = list(app.studio.generate(*RUN, style, -1.5))[-1]
    argv = shlex.split(outputs[3]["settings"])
    assert argv[argv.index("--lora") + 1].endswith(":-1.5")
    argv[argv.index("--out") + 1] = str(tmp_path / "run")
    assert main([*argv[3:], "--device", "cpu"]) == 0
    with Image.open(tmp_path / "run" / "final.png") as image:
        assert image.tobytes() == final(outputs)
    recorded = json.loads((tmp_path / "run" / "result.json").read_text())["loras"]
    assert recorded == outputs[3]["loras"]


def test_a_lora_is_chosen_and_used_through_the_api(app, style, tmp_path):
    client = Client(app.url, verbose=False, analytics_enabled=False, download_files=str(tmp_path))
    gallery, image, status = client.predict("a red circle", steps=3, seed=0, lora=style, api_name="/generate")
    assert len(gallery) == 2 and status.endswith(f"LoRA {style} at 1.")
    with pytest.raises(AppError, match=r"LoRA scale must be in \[-4, 4\], got 5"):
        client.predict("a red circle", steps=3, lora=style, lora_scale=5, api_name="/generate")


@pytest.mark.parametrize(
    "scale, message",
    [
        (4.5, r"LoRA scale must be in \[-4, 4\], got 4.5"),
        (float("nan"), "LoRA scale must be a finite number, got nan"),
        (None, "LoRA scale is empty: enter a number from -4 to 4"),  # the field left empty, in plain words
    ],
)
def test_an_out_of_range_lora_scale_is_an_error_that_names_the_field(app, style, scale, message):
    with pytest.raises(gr.Error, match=message):
        app.studio.request("self-cascade", *RUN, style, scale)
    app.studio.request("self-cascade", *RUN, "none", scale)  # no LoRA: its scale is not used


def test_a_lora_label_is_looked_up_never_used_as_a_path(app):
    with pytest.raises(gr.Error, match="LoRA '../../etc/passwd' is not one this server has"):
        app.studio.request("direct", *RUN, "../../etc/passwd", 1.0)


# ---- uploads ---------------------------------------------------------------------------------------


def _other_models_lora(path: Path) -> Path:
    """A LoRA whose metadata says it was trained for another base model (as ours say)."""
    tensors = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(2, 8)}
    return write_safetensors(tensors, path, metadata={"base_model": "tiny-sdxl", "base_fingerprint": "0" * 16})


@pytest.mark.parametrize(
    "name, make, message",
    [
        ("weights.bin", lambda p: p.write_bytes(b"a pickle"), "LoRA weights.bin: only .safetensors files are loaded"),
        ("cut.safetensors", lambda p: p.write_bytes(b"\x00" * 64), "LoRA cut.safetensors: not a safetensors file"),
        ("sdxl.safetensors", _other_models_lora, "LoRA sdxl.safetensors was trained for another base model"),
    ],
)
def test_a_bad_lora_upload_is_an_error_that_names_it_and_is_not_kept(app, tmp_path, name, make, message):
    folder = app.studio.loras.uploads
    before = kept(folder)
    path = tmp_path / name
    make(path)
    with pytest.raises(gr.Error, match=message):
        app.studio.upload_lora(str(path))
    assert kept(folder) == before  # nothing kept, nothing left half-checked
    assert name.removesuffix(".safetensors") not in " ".join(app.studio.loras.choices())


def test_a_bad_lora_upload_through_the_api_is_an_error(app, tmp_path):
    path = tmp_path / "cut.safetensors"
    path.write_bytes(b"\x00" * 64)
    client = Client(app.url, verbose=False, analytics_enabled=False, download_files=str(tmp_path / "downloads"))
    with pytest.raises(AppError, match="LoRA cut.safetensors: not a safetensors file"):
        client.predict(handle_file(str(path)), api_name="/load_lora")


def _unfit_lora(model, path: Path, kind: str) -> Path:
    """A LoRA for `model` made unfit: a NaN in it, a tensor of another width, or tensors of another architecture."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if kind == "foreign":  # FLUX's names, no metadata: only its tensors tell
        names = ("transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight", "transformer.x.lora_B.weight")
        return write_safetensors({name: torch.zeros(2, 2) for name in names}, path)
    good = random_lora(model, path.with_name("good-" + path.name))
    with safe_open(str(good), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(good))
    key = sorted(tensors)[0]
    if kind == "nan":
        tensors[key][0, 0] = float("nan")
    else:
        tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 1)
    return write_safetensors(tensors, path, metadata=metadata)


@pytest.mark.parametrize(
    "kind, message",
    [
        ("nan", r"LoRA nan.safetensors: 1 tensor is not finite \(NaN or inf\): unet\.down_blocks\.0\."),
        (
            "wide",
            r"LoRA wide.safetensors: 1 tensor does not fit this model's UNet \(unet\.down_blocks\.0\..*, expected",
        ),
        ("foreign", r"LoRA foreign.safetensors: 2 tensors are for layers this model \(.*\) does not have"),
    ],
)
def test_an_unfit_lora_is_refused_at_upload_and_not_kept(app, tmp_path, kind, message):
    folder = app.studio.loras.uploads
    before, choices = kept(folder), list(app.studio.loras.choices())
    with pytest.raises(gr.Error, match=message):
        app.studio.upload_lora(str(_unfit_lora(app.model, tmp_path / f"{kind}.safetensors", kind)))
    assert kept(folder) == before and list(app.studio.loras.choices()) == choices


def test_an_unfit_lora_is_refused_at_upload_through_the_api_and_on_the_video_tab(app, animatediff_model, tmp_path):
    client = Client(app.url, verbose=False, analytics_enabled=False, download_files=str(tmp_path / "downloads"))
    path = _unfit_lora(app.model, tmp_path / "wide.safetensors", "wide")
    with pytest.raises(AppError, match="LoRA wide.safetensors: 1 tensor does not fit this model's UNet"):
        client.predict(handle_file(str(path)), api_name="/load_lora")
    video = app.studio.video.loras.uploads
    before = kept(video)
    with pytest.raises(gr.Error, match="LoRA clip.safetensors: 1 tensor is not finite"):
        app.studio.video.upload_lora(str(_unfit_lora(animatediff_model, tmp_path / "clip.safetensors", "nan")))
    assert kept(video) == before


def test_an_uploaded_name_never_becomes_a_path(app, sd_model, tmp_path):
    lora = random_lora(sd_model, tmp_path / "lora.safetensors")
    (tmp_path / "in" / "deep").mkdir(parents=True)
    evil = tmp_path / "in" / "..\\..\\evil.safetensors"  # a name, on Linux, with Windows separators in it
    shutil.copyfile(lora, evil)
    traversing = tmp_path / "in" / "evil2.safetensors"
    shutil.copyfile(lora, traversing)
    labels = [
        app.studio.upload_lora(str(evil))[0]["value"],
        app.studio.upload_lora(str(tmp_path / "in" / "deep" / ".." / "evil2.safetensors"))[0]["value"],
        app.studio.upload_lora(str(evil))[0]["value"],  # the same name again: kept beside the first
    ]
    assert labels == ["uploaded-evil", "uploaded-evil2", "uploaded-evil-2"]
    uploads = app.studio.loras.uploads
    assert uploads.resolve().is_relative_to(app.work.resolve())
    for label in labels:
        assert app.studio.loras.choices()[label] == uploads / f"{label}.safetensors"
    assert not list(tmp_path.parent.glob("evil*")) and not list(app.work.parent.glob("evil*"))


def test_a_lora_uploaded_on_compare_is_chosen_there_and_offered_on_generate(app, sd_model, tmp_path):
    chosen, other, _ = app.studio.upload_lora(str(random_lora(sd_model, tmp_path / "from-compare.safetensors")))
    assert chosen["value"] == "uploaded-from-compare" and "value" not in other
    assert "uploaded-from-compare" in other["choices"]


def test_loras_shipped_in_the_model_folder_are_offered(sd_folder, sd_model, tmp_path):
    from sc_app.models import load_model
    from sc_app.ui import NO_ADAPTER, Studio

    folder = shutil.copytree(sd_folder, tmp_path / "model")
    random_lora(sd_model, folder / "loras" / "shipped-style.safetensors")
    studio = Studio(load_model(str(folder), device="cpu"), work_dir=tmp_path / "work")
    assert list(studio.loras.choices()) == [NO_ADAPTER, "shipped: shipped-style"]
    request = studio.request("direct", *RUN, "shipped: shipped-style", 0.5)
    assert request["loras"] == [(str((folder / "loras" / "shipped-style.safetensors").resolve()), 0.5)]


# ---- Compare -----------------------------------------------------------------------------------------


def test_compare_runs_lanczos_with_the_lora_and_offers_no_sr_without_an_sr_model(app, style):
    assert "sr" not in app.studio.compare_methods and "lanczos" in app.studio.compare_methods
    *_, (gallery, table, _, results, status, lines) = list(
        app.studio.compare("a red circle", "", "1:1", "4x", None, 3, 5.0, 0, "none", False, "direct", "lanczos", style)
    )
    assert list(results) == [
        "self-cascade",
        "direct",
        "scalecrafter",
        "demofusion",
        "freescale",
        "hidiffusion",
        "lanczos",
    ]
    assert table[-1][0] == "lanczos" and table[-1][1:2] == ["32 x 32"] and table[-1][3] == "pivot + Lanczos resize"
    with Image.open(results["lanczos"]) as image:
        assert image.size == (32, 32)
    assert status.endswith(f", seed 0, LoRA {style} at 1.")
    assert all(f"--lora {app.studio.loras.choices()[style]}:1.0 " in line for line in lines.values())
    assert "--method lanczos" in lines["lanczos"]


@pytest.fixture(scope="module")
def upscaler(sd_folder, tmp_path_factory):
    from diffusers import StableDiffusionUpscalePipeline

    pipe = StableDiffusionUpscalePipeline.from_pretrained(make_upscaler(tmp_path_factory.mktemp("sr"), sd_folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_compare_offers_sr_where_the_model_has_one_and_counts_its_steps(sd_model, upscaler, tmp_path, monkeypatch):
    from sc_app.baselines import upscale
    from sc_app.ui import Studio
    from sc_app.ui.progress import stage_plan

    monkeypatch.setattr(upscale, "load_upscaler", lambda source, model: upscaler)  # as the embedded model's own
    studio = Studio(sd_model, max_pixels=MAX_PIXELS, work_dir=tmp_path / "work")
    assert studio.compare_methods[-2:] == ("sr", "lanczos")
    requests = [studio.request(m, *RUN[:5], None, 3, 5.0, 0, "none") for m in ("sr", "lanczos")]
    assert [stage_plan(sd_model, r) for r in requests] == [[(3, 16, 16), (3, 32, 32)], [(3, 16, 16)]]
    steps: dict[tuple[int, int], int] = {}
    stages: dict[int, list] = {}
    for event in studio.gpu_generate(requests, str(tmp_path / "stop")):
        if event[0] == "step":
            steps[event[1:3]] = max(steps.get(event[1:3], 0), event[3] + 1)
        elif event[0] == "stage":
            stages.setdefault(event[1], []).append(event[4:6])
        assert event[0] not in ("error", "unavailable"), event
    # every step the run reports is one the plan counts: sr's pivot and its upscale; lanczos's pivot alone
    assert steps == {(0, 0): 3, (0, 1): 3, (1, 0): 3}
    assert stages == {0: [(16, 16), (32, 32)], 1: [(16, 16), (32, 32)]}
    *_, (gallery, table, _, results, status, _) = list(
        studio.compare("a red circle", "", "1:1", "4x", None, 3, 5.0, 0, "none", False, "sr", "lanczos")
    )
    assert [row[0] for row in table][-2:] == ["sr", "lanczos"] and table[-2][3] == "pivot + 1 x4 upscale"
    assert status.startswith("Done: 8 methods at 32 x 32")  # HiDiffusion among them


def test_the_progress_line_plans_sr_and_lanczos():
    from sc_app.plan import plan_stages
    from sc_app.ui import ProgressLine
    from sc_app.ui.progress import stage_plan

    model = SimpleNamespace(base_size=16, size_multiple=4, num_train_timesteps=1000, default_k=500)
    request = {"height": 128, "width": 96, "num_inference_steps": 10}
    ph, pw = plan_stages(128, 96, 16, 4)[0]  # the pivot, as the self-cascade's
    assert 4 * ph < 128  # two x4 upscales: the second one's output resized to the target
    assert stage_plan(model, {**request, "method": "sr"}) == [(10, ph, pw), (10, 4 * ph, 4 * pw), (10, 128, 96)]
    assert stage_plan(model, {**request, "method": "lanczos"}) == [(10, ph, pw)]
    line = ProgressLine(model, [{**request, "method": "lanczos"}, {**request, "method": "sr"}])
    assert line.line(0, 0, 9, now=0.0).startswith("Method 1 of 2 (lanczos), step 10 of 10 · ")
    assert line.line(1, 2, 9, now=1.0).startswith("Method 2 of 2 (sr), stage 2 of 2 (96 x 128), step 10 of 10 · 100%")


# ---- Video -------------------------------------------------------------------------------------------


def test_video_with_a_lora_changes_the_clip_and_records_it(app, animatediff_model, tmp_path):
    from sc_app.video import generate_video

    tab = app.studio.video
    path = random_lora(animatediff_model, tmp_path / "motion-style.safetensors")
    chosen, cleared = tab.upload_lora(str(path))
    label = chosen["value"]
    assert label == "uploaded-motion-style" and cleared is None
    assert tab.loras.uploads.resolve().is_relative_to(app.work.resolve())

    def clip(**kwargs):
        *_, cascade, _, _, status = list(tab.generate(**video_args(with_direct=False, **kwargs)))[-1]
        return read_mp4(cascade["value"])[1], status

    plain, _ = clip()
    styled, status = clip(lora=label, lora_scale=0.5)
    assert not np.array_equal(plain, styled) and status.endswith(f"LoRA {label} at 0.5.")
    assert np.array_equal(clip()[0], plain)  # nothing of the LoRA stays
    assert animatediff_model.pipe.get_list_adapters() == {}
    stored = tab.loras.choices()[label]
    result = generate_video(animatediff_model, "a red circle", 16, 16, "direct", num_frames=2, num_inference_steps=2)
    with_lora = generate_video(
        animatediff_model, "a red circle", 16, 16, "direct", num_frames=2, num_inference_steps=2, loras=[(stored, 0.5)]
    )
    assert "loras" not in result.settings
    assert [(r["file"], r["scale"]) for r in with_lora.settings["loras"]] == [(str(stored), 0.5)]


def test_a_video_lora_for_another_model_is_refused(app, sd_model, tmp_path):
    before = kept(app.studio.video.loras.uploads)
    with pytest.raises(gr.Error, match="LoRA image.safetensors was trained for another base model"):
        app.studio.video.upload_lora(str(random_lora(sd_model, tmp_path / "image.safetensors")))
    assert kept(app.studio.video.loras.uploads) == before


def test_modelscope_takes_no_lora_and_says_so(sd_model, modelscope_model, tmp_path):
    from sc_app.ui import Studio

    studio = Studio(sd_model, max_pixels=MAX_PIXELS, work_dir=tmp_path / "work", video_model=modelscope_model)
    plain = write_safetensors({"unet.x.lora_A.weight": torch.zeros(2, 2)}, tmp_path / "plain.safetensors")
    with pytest.raises(gr.Error, match=r"LoRA plain.safetensors: UNet3DConditionModel \(modelscope\) models take no"):
        studio.video.upload_lora(str(plain))
    assert kept(studio.video.loras.uploads) == []


def test_generate_video_on_the_command_line_takes_a_lora(sd_folder, motion_folder, animatediff_model, tmp_path):
    from sc_app.__main__ import main

    lora = random_lora(animatediff_model, tmp_path / "clip-style.safetensors")
    run = ["generate-video", "--model", str(sd_folder), "--motion-adapter", str(motion_folder)]
    run += ["--prompt", "a red circle", "--height", "16", "--width", "16", "--frames", "2", "--steps", "2"]
    run += ["--device", "cpu", "--method", "direct"]
    assert main([*run, "--lora", f"{lora}:0.7", "--out", str(tmp_path / "run")]) == 0
    recorded = json.loads((tmp_path / "run" / "result.json").read_text())["loras"]
    assert [(r["file"], r["scale"]) for r in recorded] == [(str(lora), 0.7)]
    assert main([*run, "--lora", str(tmp_path / "nope.ckpt"), "--out", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()
