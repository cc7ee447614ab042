"""Feature upsamplers on video UNets (ModelScope's UNet3DConditionModel, AnimateDiff's UNetMotionModel): identity
when untrained, per-frame features, files and wrong models, the tuner on clips, and generate-video --upsampler."""

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

import sc_app.upsampler as up
from sc_app import video
from sc_app.__main__ import main as sc_main
from sc_app.api import generate
from sc_app.moving_shapes import clip_from_seed, render_clip
from sc_app.sampling import encode_prompt
from sc_app.upsampler import Adapter, load_adapter, save_adapter, skip_features, stage_denoiser_for
from sc_app.video import export_gif, export_mp4, generate_video, is_video_model, video_self_cascade
from tuner.__main__ import main as tuner_main
from tuner.upsampler_training import checkpoint_path, train_adapter

PROMPT = "a red circle"
FRAMES = 3  # odd, and unlike the 4 latent channels, so a frames/channels mix-up cannot pass
RUN = dict(num_frames=FRAMES, num_inference_steps=4, guidance_scale=5.0, seed=3, decode_stages=False, k=600)
FAST = dict(batch_size=2, lr=1e-2, checkpoint_every=2, frames=FRAMES)


def untrained(model, scale=2.0) -> Adapter:
    return Adapter(model.unet.config, scale=scale, base_model=model.name, unet_class=type(model.unet).__name__)


def trained_like(model, scale=2.0, seed=0) -> Adapter:
    """An adapter with random weights everywhere, zero-initialised layers included."""
    adapter = untrained(model, scale)
    torch.manual_seed(seed)
    for p in adapter.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return adapter


# ---- the modules on video UNets ----------------------------------------------------------------------


def test_hooks_read_the_skips_the_unet_hands_its_up_blocks(video_model):
    # Frames are folded into the batch; on ModelScope the first skip is transformer_in's output, not conv_in's.
    unet, handed = video_model.unet, []
    hooks = [
        block.register_forward_pre_hook(lambda m, a, kw: handed.append(kw["res_hidden_states_tuple"]), with_kwargs=True)
        for block in unet.up_blocks
    ]
    x = torch.randn(2, 4, FRAMES, 8, 8, generator=torch.Generator().manual_seed(0))
    text = encode_prompt(video_model, [PROMPT, "a blue square"], None, 0.0).embeds
    try:
        with torch.no_grad():
            up.unet_caller(unet)(x, 400, encoder_hidden_states=text)
    finally:
        for hook in hooks:
            hook.remove()
    skips, mid = skip_features(unet, x, 400, text)
    in_order = [s for res in reversed(handed) for s in res]  # each up block takes the last skips left
    assert len(skips) == len(in_order) == 4 and mid.shape[0] == 2 * FRAMES
    for ours, theirs in zip(skips, in_order):
        assert ours.shape[0] == 2 * FRAMES
        torch.testing.assert_close(ours, theirs)


def test_untrained_adapter_reproduces_tuning_free_exactly(video_model):
    plain = video_self_cascade(video_model, PROMPT, 32, 32, **RUN)
    tuned = video_self_cascade(video_model, PROMPT, 32, 32, upsampler=untrained(video_model), **RUN)
    assert len(plain.stages) == 2
    for a, b in zip(plain.stages, tuned.stages):
        assert torch.equal(a.latents, b.latents)


def test_trained_adapter_changes_the_stages_after_the_pivot(video_model, monkeypatch):
    calls = []
    real = up.pivot_features
    monkeypatch.setattr(up, "pivot_features", lambda *a: calls.append(a[2].shape) or real(*a))
    plain = video_self_cascade(video_model, PROMPT, 32, 32, **RUN)
    tuned = video_self_cascade(video_model, PROMPT, 32, 32, upsampler=trained_like(video_model), **RUN)
    assert torch.equal(plain.stages[0].latents, tuned.stages[0].latents)
    assert not torch.allclose(plain.stages[1].latents, tuned.stages[1].latents, atol=1e-3)
    assert calls == [(1, 4, FRAMES, 8, 8)]  # the pivot clip, once per stage, not once per step
    assert tuned.settings["upsampler"] == {"scale": 2.0, "k": 700, "steps": 0, "base_model": video_model.name}


def test_stage_of_another_scale_stays_tuning_free(modelscope_model):
    plain = video_self_cascade(modelscope_model, PROMPT, 32, 32, **RUN)
    other = video_self_cascade(modelscope_model, PROMPT, 32, 32, upsampler=trained_like(modelscope_model, 3.0), **RUN)
    assert torch.equal(plain.stages[-1].latents, other.stages[-1].latents)


def test_file_round_trip_and_k_from_the_adapter(animatediff_model, tmp_path):
    adapter = trained_like(animatediff_model)
    adapter.k, adapter.steps = 500, 7
    path = save_adapter(adapter, tmp_path / "x2.safetensors")
    loaded = load_adapter(path, animatediff_model)
    assert loaded.metadata() == adapter.metadata() and loaded.metadata()["unet_class"] == "UNetMotionModel"
    run = dict(num_frames=FRAMES, num_inference_steps=10, seed=1, decode_stages=False)
    by_path = generate_video(animatediff_model, PROMPT, 32, 32, upsampler=path, **run)
    in_memory = generate_video(animatediff_model, PROMPT, 32, 32, upsampler=adapter, **run)
    assert torch.equal(by_path.stages[-1].latents, in_memory.stages[-1].latents)
    assert by_path.settings["k"] == [500] and by_path.stages[1].start_t <= 500  # K defaults to the adapter's


def test_wrong_models_are_refused_in_one_line(modelscope_model, animatediff_model, sd_model, tmp_path):
    ms = save_adapter(untrained(modelscope_model), tmp_path / "ms.safetensors")
    image = save_adapter(untrained(sd_model), tmp_path / "image.safetensors")
    cases = [
        (
            lambda: load_adapter(ms, animatediff_model),
            "a ModelScope video UNet (UNet3DConditionModel), not for '{}', an AnimateDiff video UNet (UNetMotionModel)".format(  # noqa: E501
                animatediff_model.name
            ),
        ),
        (lambda: load_adapter(image, modelscope_model), "an image UNet (UNet2DConditionModel), not for"),
        (lambda: generate(sd_model, PROMPT, 32, 32, upsampler=ms), "not for '{}', an image UNet".format(sd_model.name)),
        (
            lambda: video_self_cascade(animatediff_model, PROMPT, 32, 32, upsampler=untrained(modelscope_model), **RUN),
            "trained for base model",
        ),
    ]
    for call, message in cases:
        with pytest.raises(ValueError) as error:
            call()
        assert message in str(error.value) and "\n" not in str(error.value)
    # same UNet class, other architecture: the fingerprint still tells them apart
    wider = dict(modelscope_model.unet.config, block_out_channels=[8, 24])
    with pytest.raises(ValueError, match=r"\(UNet [0-9a-f]{16}\), not for"):
        stage_denoiser_for(modelscope_model, Adapter(wider, unet_class="UNet3DConditionModel"))


def test_upsampler_needs_the_self_cascade(modelscope_model):
    with pytest.raises(ValueError, match="upsampler applies to the self-cascade only, not to method 'direct'"):
        generate_video(modelscope_model, PROMPT, 32, 32, "direct", upsampler=untrained(modelscope_model))
    with pytest.raises(ValueError, match="give upsampler or stage_denoiser, not both"):
        video_self_cascade(
            modelscope_model, PROMPT, 32, 32, upsampler=untrained(modelscope_model), stage_denoiser=lambda *a: None
        )


def test_is_video_model(modelscope_folder, sd_folder):
    assert is_video_model(str(modelscope_folder)) and not is_video_model(str(sd_folder))


# ---- the tuner on clips -------------------------------------------------------------------------------


def write_clips(folder):
    """Usable: an mp4 (5 frames, 40x48), a captioned gif (4 frames) and a captioned folder of 4 frames.
    Skipped: one too short, one too small, two broken clips, a note and a lone image."""
    folder.mkdir()
    export_mp4(render_clip(clip_from_seed(0), 5, 40, 48), folder / "a.mp4", fps=5)
    export_gif(render_clip(clip_from_seed(1), 4, 36, 36), folder / "b.gif", fps=5)
    (folder / "b.txt").write_text("a blue square\n")
    (folder / "c").mkdir()
    for i, frame in enumerate(render_clip(clip_from_seed(2), 4, 32, 32)):
        Image.fromarray(frame).save(folder / "c" / f"{i:03d}.png")
    (folder / "c.txt").write_text("a green triangle")
    export_mp4(render_clip(clip_from_seed(3), 2, 40, 40), folder / "short.mp4", fps=5)
    export_gif(render_clip(clip_from_seed(4), 4, 16, 16), folder / "small.gif", fps=5)
    (folder / "broken.mp4").write_text("not a video")
    (folder / "broken.gif").write_bytes(b"GIF89a truncated")
    (folder / "notes.md").write_text("# notes")
    Image.fromarray(render_clip(clip_from_seed(5), 1, 32, 32)[0]).save(folder / "still.png")
    return folder


def tune(*extra):
    return tuner_main(
        [
            "train",
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--lr",
            "1e-2",
            "--frames",
            str(FRAMES),
            "--device",
            "cpu",
            *extra,
        ]
    )


def test_cli_trains_on_a_folder_of_clips_and_skips_bad_files(modelscope_folder, modelscope_model, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    data = write_clips(tmp_path / "clips")
    out = tmp_path / "ms.safetensors"
    assert tune("--model", str(modelscope_folder), "--data", str(data), "--k", "600", "--out", str(out)) == 0
    adapter = load_adapter(out, modelscope_model)
    assert (adapter.steps, adapter.scale, adapter.k, adapter.unet_class) == (2, 2.0, 600, "UNet3DConditionModel")
    for name in ("broken.mp4", "broken.gif", "notes.md", "still.png"):
        assert f"skipped {name}" in caplog.text
    assert (
        "3 usable clips, 1 skipped as smaller than the 32x32 crop, 1 shorter than 3 frames, 4 unreadable" in caplog.text
    )
    run = dict(num_frames=FRAMES, num_inference_steps=4, seed=2, decode_stages=False, k=600)
    plain = video_self_cascade(modelscope_model, PROMPT, 32, 32, **run)
    tuned = video_self_cascade(modelscope_model, PROMPT, 32, 32, upsampler=adapter, **run)
    assert not torch.equal(plain.stages[-1].latents, tuned.stages[-1].latents)


def test_clip_folder_samples_aligned_crops_with_captions(tmp_path):
    from tuner.data import make_dataset

    data = make_dataset(write_clips(tmp_path / "clips"), 32, frames=FRAMES)
    clips, captions = data.sample(np.random.default_rng(0), 6)
    assert clips.shape == (6, FRAMES, 32, 32, 3) and clips.dtype == np.uint8
    assert set(captions) <= {"", "a blue square", "a green triangle"} and len(set(captions)) > 1
    assert all(np.abs(np.diff(c.astype(float), axis=0)).sum() > 0 for c in clips)  # consecutive frames, moving


def test_clip_folder_drops_a_clip_that_breaks_after_the_scan(tmp_path, caplog):
    import shutil

    from tuner.data import make_dataset

    folder = write_clips(tmp_path / "clips")
    data = make_dataset(folder, 32, frames=FRAMES)
    (folder / "a.mp4").write_text("overwritten")  # broken mid-run
    shutil.rmtree(folder / "c")
    clips, captions = data.sample(np.random.default_rng(0), 4)
    assert clips.shape == (4, FRAMES, 32, 32, 3) and captions == ["a blue square"] * 4  # b.gif, the one left
    assert "dropped" in caplog.text and "a.mp4" in caplog.text
    (folder / "b.gif").unlink()
    with pytest.raises(ValueError, match="no readable clip left"):
        data.sample(np.random.default_rng(1), 1)


def test_cli_trains_embedded_video_on_moving_shapes(modelscope_folder, modelscope_model, tmp_path, monkeypatch):
    monkeypatch.setattr(video, "VIDEO_EMBEDDED", modelscope_folder)
    out = tmp_path / "embedded.safetensors"
    assert tune("--model", "embedded-video", "--data", "moving-shapes", "--out", str(out)) == 0
    adapter = load_adapter(out, modelscope_model)
    assert adapter.steps == 2 and adapter.base_model == "embedded" and checkpoint_path(out).is_file()


def test_cli_trains_sd_plus_motion_adapter(sd_folder, motion_folder, animatediff_model, tmp_path):
    out = tmp_path / "ad.safetensors"
    assert (
        tune(
            "--model",
            str(sd_folder),
            "--motion-adapter",
            str(motion_folder),
            "--data",
            "moving-shapes",
            "--shapes-pool",
            "3",
            "--out",
            str(out),
        )
        == 0
    )
    assert load_adapter(out, animatediff_model).unet_class == "UNetMotionModel"


def test_animatediff_resumes_exactly(animatediff_model, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    straight = train_adapter(animatediff_model, "moving-shapes", steps=4, out=tmp_path / "a.safetensors", **FAST)
    resumed = tmp_path / "b.safetensors"
    train_adapter(animatediff_model, "moving-shapes", steps=2, out=resumed, **FAST)
    train_adapter(animatediff_model, "moving-shapes", steps=4, out=resumed, resume=True, **FAST)
    assert "resumed at step 2" in caplog.text
    a, b = load_adapter(straight, animatediff_model), load_adapter(resumed, animatediff_model)
    assert b.steps == 4 and any(p.abs().sum() > 0 for p in (u.proj_out.weight for u in b.upsamplers))
    for key, value in a.state_dict().items():  # the same run as one without interruption
        assert torch.allclose(b.state_dict()[key], value, atol=1e-6), key


def test_generated_pivot_clips(modelscope_model, tmp_path):
    losses = []
    out = train_adapter(
        modelscope_model,
        "moving-shapes",
        steps=1,
        out=tmp_path / "g.safetensors",
        pivot="generated",
        pivot_steps=2,
        progress=lambda step, total, loss: losses.append(loss),
        **FAST,
    )
    assert load_adapter(out, modelscope_model).steps == 1 and all(np.isfinite(losses))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "shapes"], "data 'shapes' is for image models"),
        (["--data", "moving-shapes", "--model", "SD"], "data 'moving-shapes' is for video models"),
        (["--data", "shapes", "--model", "SD", "--frames", "3"], "frames applies to video models only"),
        (["--data", "moving-shapes", "--frames", "0"], "frames must be a positive integer"),
        (["--data", "EMPTY"], "no clips in the folder"),
        (["--data", "/nonexistent/clips"], "no such folder (give a folder of images or clips"),
    ],
)
def test_cli_bad_input_exits_2_and_writes_nothing(modelscope_folder, sd_folder, tmp_path, capsys, args, message):
    (tmp_path / "empty").mkdir()
    swap = {"SD": str(sd_folder), "EMPTY": str(tmp_path / "empty")}
    args = [swap.get(a, a) for a in args]
    if "--model" not in args:
        args += ["--model", str(modelscope_folder)]
    out = tmp_path / "x.safetensors"
    argv = ["train", "--steps", "2", "--batch-size", "2", "--lr", "1e-3", "--device", "cpu", "--out", str(out), *args]
    assert tuner_main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1], lines
    assert not out.exists() and not checkpoint_path(out).exists()


# ---- generate-video --upsampler -----------------------------------------------------------------------


def _run(capsys, *argv):
    code = sc_main(["generate-video", *argv])
    return code, capsys.readouterr().err


def test_cli_generate_video_with_upsampler(modelscope_folder, modelscope_model, tmp_path, capsys):
    adapter = trained_like(modelscope_model)
    adapter.k = 500
    path = save_adapter(adapter, tmp_path / "x2.safetensors")
    common = [
        "--model",
        str(modelscope_folder),
        "--prompt",
        PROMPT,
        "--frames",
        str(FRAMES),
        "--height",
        "32",
        "--width",
        "32",
        "--steps",
        "4",
        "--seed",
        "5",
        "--device",
        "cpu",
    ]
    code, err = _run(capsys, *common, "--upsampler", str(path), "--out", str(tmp_path / "tuned"))
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "tuned").iterdir()) == [
        "final.mp4",
        "preview.gif",
        "result.json",
        "stage0.mp4",
        "stage1.mp4",
    ]
    result = json.loads((tmp_path / "tuned" / "result.json").read_text())
    assert result["k"] == [500] and result["upsampler"]["scale"] == 2.0
    expected = video_self_cascade(
        modelscope_model,
        PROMPT,
        32,
        32,
        num_frames=FRAMES,
        num_inference_steps=4,
        seed=5,
        upsampler=adapter,
        decode_stages=False,
    )
    assert result["stages"][1]["start_t"] == expected.stages[1].start_t


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--method", "direct", "--upsampler", "ADAPTER"], "--upsampler apply to --method self-cascade only"),
        (["--upsampler", "missing.safetensors"], "--upsampler missing.safetensors: no such file"),
        (["--upsampler", "IMAGE"], "an image UNet (UNet2DConditionModel), not for"),
    ],
)
def test_cli_upsampler_bad_input_one_line(
    modelscope_folder, modelscope_model, sd_model, tmp_path, capsys, extra, message
):
    files = {
        "ADAPTER": save_adapter(untrained(modelscope_model), tmp_path / "ms.safetensors"),
        "IMAGE": save_adapter(untrained(sd_model), tmp_path / "image.safetensors"),
    }
    extra = [str(files.get(e, e)) for e in extra]
    code, err = _run(
        capsys,
        "--model",
        str(modelscope_folder),
        "--prompt",
        PROMPT,
        "--frames",
        str(FRAMES),
        "--height",
        "32",
        "--width",
        "32",
        "--steps",
        "2",
        "--device",
        "cpu",
        *extra,
        "--out",
        str(tmp_path / "o"),
    )
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert not (tmp_path / "o").exists()


def test_an_image_models_upsamplers_start_its_animatediff_models(sd_model, animatediff_model, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    still = dict(batch_size=2, lr=1e-2, checkpoint_every=2)
    image = train_adapter(sd_model, "shapes", steps=2, out=tmp_path / "image.safetensors", **still)
    with pytest.raises(ValueError, match="not for"):  # to sample with, an image adapter stays refused
        load_adapter(image, animatediff_model)
    video_out = train_adapter(
        animatediff_model,
        "moving-shapes",
        steps=1,
        out=tmp_path / "video.safetensors",
        init_from=image,
        **{**FAST, "lr": 1e-12},
    )
    assert "initialised from" in caplog.text and "UNet2DConditionModel" in caplog.text
    started, source = load_adapter(video_out, animatediff_model), load_adapter(image, sd_model)
    for key, value in source.state_dict().items():  # one step at lr 1e-12: still the image adapter's weights
        torch.testing.assert_close(started.state_dict()[key], value)
    wider = dict(sd_model.unet.config, block_out_channels=[2 * c for c in sd_model.unet.config.block_out_channels])
    other = save_adapter(Adapter(wider), tmp_path / "wider.safetensors")
    with pytest.raises(ValueError, match="do not match"):  # features of other shapes: refused
        train_adapter(
            animatediff_model, "moving-shapes", steps=1, out=tmp_path / "bad.safetensors", init_from=other, **FAST
        )
