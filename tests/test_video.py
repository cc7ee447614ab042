"""Video self-cascade on tiny ModelScope (UNet3DConditionModel) and AnimateDiff (UNetMotionModel) models,
mp4/gif export, the generate-video command line, the moving-shapes renderer and the video trainer."""

import json
import math
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel, UNet3DConditionModel, UNetMotionModel
from PIL import Image

from sc_app import video
from sc_app.__main__ import main
from sc_app.moving_shapes import Line, Orbit, clip_from_seed, render_clip
from sc_app.plan import plan_stages
from sc_app.sampling import make_scheduler, start_timestep
from sc_app.shapes import _MARGIN, matches
from sc_app.video import (
    export_gif,
    export_mp4,
    generate_video,
    load_video_model,
    upsample_frames,
    video_direct,
    video_self_cascade,
)

PROMPT = "a red circle"
FRAMES = 3  # odd, and unlike the 4 latent channels, so a frames/channels mix-up cannot pass
STEPS = 4


def test_loaders_pick_the_video_unet(modelscope_model, animatediff_model):
    assert isinstance(modelscope_model.unet, UNet3DConditionModel) and modelscope_model.kind == "modelscope"
    assert isinstance(animatediff_model.unet, UNetMotionModel) and animatediff_model.kind == "animatediff"
    assert modelscope_model.max_frames is None and animatediff_model.max_frames == 8
    assert modelscope_model.base_size == animatediff_model.base_size == 16


# ---- the cascade ------------------------------------------------------------------------------------


def test_every_stage_has_all_frames_at_its_size(video_model):
    result = video_self_cascade(video_model, PROMPT, 16, 32, num_frames=FRAMES, num_inference_steps=STEPS, seed=0)
    sizes = plan_stages(16, 32, video_model.base_size, video_model.size_multiple)
    assert [(s.height, s.width) for s in result.stages] == sizes == [(12, 24), (16, 32)]
    for stage in result.stages:
        assert stage.latents.shape == (1, 4, FRAMES, stage.height // 2, stage.width // 2)
        assert len(stage.clips) == 1 and stage.clips[0].shape == (FRAMES, stage.height, stage.width, 3)
        assert stage.clips[0].dtype == np.uint8 and stage.seconds > 0
    assert result.clips[0].shape == (FRAMES, 16, 32, 3)
    summary = result.summary()
    assert summary["num_frames"] == FRAMES and summary["k"] == [700] and len(summary["stages"]) == 2


def test_stage_starts_from_the_upsampled_pivot_diffused_to_k(video_model):
    seen, k = {}, 500

    def stage_denoiser(r, pivot, denoiser, cond, added):
        def first_input(x, t, i):
            if i == 0:
                seen[r] = (x.clone(), pivot.clone(), t)
            return denoiser(x, t, i)

        return first_input

    result = video_self_cascade(
        video_model,
        PROMPT,
        32,
        32,
        num_frames=FRAMES,
        num_inference_steps=10,
        k=k,
        seed=3,
        stage_denoiser=stage_denoiser,
    )
    gen = torch.Generator("cpu").manual_seed(3)  # replay the caller's generator: pivot noise, then stage 1's
    torch.randn((1, 4, FRAMES, 8, 8), generator=gen)
    noise = torch.randn((1, 4, FRAMES, 16, 16), generator=gen)
    scheduler = make_scheduler(video_model, 10)
    t = start_timestep(scheduler, k)
    x, pivot, t_seen = seen[1]
    assert torch.equal(pivot, result.stages[0].latents)
    assert int(t_seen) == int(t) == result.stages[1].start_t <= k
    a = scheduler.alphas_cumprod[int(t)]
    torch.testing.assert_close(x, a.sqrt() * upsample_frames(pivot, (16, 16)) + (1 - a).sqrt() * noise)


def test_upsampling_is_spatial_only():
    latents = torch.randn(2, 4, FRAMES, 5, 6)
    up = upsample_frames(latents, (10, 12))
    assert up.shape == (2, 4, FRAMES, 10, 12)
    for f in range(FRAMES):  # each frame resized on its own, none mixed with its neighbours
        torch.testing.assert_close(up[:, :, f], F.interpolate(latents[:, :, f], size=(10, 12), mode="bilinear"))


def test_same_seed_same_clip_other_seed_other_clip(modelscope_model):
    def run(seed):
        return video_self_cascade(
            modelscope_model,
            PROMPT,
            32,
            32,
            num_frames=FRAMES,
            num_inference_steps=STEPS,
            seed=seed,
            decode_stages=False,
        )

    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a.stages[-1].latents, b.stages[-1].latents)
    assert np.array_equal(a.clips[0], b.clips[0])
    assert not torch.allclose(a.stages[-1].latents, c.stages[-1].latents)


def test_a_prompt_in_a_batch_gets_its_own_clip(video_model):
    # Text embeddings reach each prompt's frames (AnimateDiff needs them repeated per frame, in order).
    alone = video_self_cascade(
        video_model, PROMPT, 32, 32, num_frames=FRAMES, num_inference_steps=STEPS, seed=0, decode_stages=False
    )
    batch = video_self_cascade(
        video_model,
        [PROMPT, "a blue square"],
        32,
        32,
        num_frames=FRAMES,
        num_inference_steps=STEPS,
        seed=0,
        decode_stages=False,
    )
    assert len(batch.clips) == 2
    torch.testing.assert_close(batch.stages[-1].latents[:1], alone.stages[-1].latents, atol=1e-4, rtol=1e-4)


def test_direct_samples_once_at_the_target_size(video_model):
    result = video_direct(video_model, PROMPT, 32, 32, num_frames=FRAMES, num_inference_steps=STEPS, seed=0)
    (stage,) = result.stages
    assert (stage.height, stage.width, stage.steps) == (32, 32, STEPS)
    assert result.method == "direct" and result.clips[0].shape == (FRAMES, 32, 32, 3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_frames": 0}, "num_frames must be a positive integer"),
        ({"height": 30}, "height must be a multiple of 4"),
        ({"k": 1000}, "k must be an integer in 1..999"),
        ({"method": "scalecrafter"}, "method must be one of self-cascade, direct"),
        ({"method": "direct", "k": 500}, "k and stages apply to the self-cascade only"),
    ],
)
def test_bad_input_is_named(modelscope_model, kwargs, message):
    args = {"height": 32, "width": 32, "num_frames": FRAMES, "num_inference_steps": STEPS, **kwargs}
    with pytest.raises(ValueError, match=message):
        generate_video(modelscope_model, PROMPT, args.pop("height"), args.pop("width"), **args)


def test_motion_models_refuse_more_frames_than_their_position_table(animatediff_model):
    with pytest.raises(ValueError, match="num_frames must be at most 8"):
        video_self_cascade(animatediff_model, PROMPT, 32, 32, num_frames=9, num_inference_steps=STEPS)


def test_image_models_are_not_video_models(sd_model, sd_folder, modelscope_folder, motion_folder):
    with pytest.raises(ValueError, match="must be a VideoModel"):
        video_self_cascade(sd_model, PROMPT, 32, 32, num_inference_steps=STEPS)
    with pytest.raises(ValueError, match="is an image model: give a motion adapter"):
        load_video_model(str(sd_folder), device="cpu")
    with pytest.raises(ValueError, match="takes no motion adapter"):
        load_video_model(str(modelscope_folder), motion_adapter=str(motion_folder), device="cpu")


# ---- export ------------------------------------------------------------------------------------------


def _read_mp4(path: Path) -> tuple[dict, np.ndarray]:
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    width, height = meta["size"]
    return meta, np.stack([np.frombuffer(f, np.uint8).reshape(height, width, 3) for f in reader])


def test_mp4_and_gif_read_back(tmp_path):
    frames = render_clip(clip_from_seed(0), 6, 32, 48)
    export_mp4(frames, tmp_path / "clip.mp4", fps=6)
    export_gif(frames, tmp_path / "clip.gif", fps=6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.gif", "clip.mp4"]  # no temporary left behind
    meta, decoded = _read_mp4(tmp_path / "clip.mp4")
    assert meta["codec"] == "h264" and meta["pix_fmt"].startswith("yuv420p") and meta["fps"] == 6
    assert decoded.shape == (6, 32, 48, 3)
    assert np.abs(decoded.astype(float) - frames).mean() < 8  # lossy, but the same pictures
    gif = Image.open(tmp_path / "clip.gif")
    assert gif.n_frames == 6 and gif.size == (48, 32) and gif.info["duration"] == 170  # hundredths of a second


def test_export_refuses_what_h264_cannot_hold(tmp_path):
    with pytest.raises(ValueError, match="even height and width"):
        export_mp4(np.zeros((2, 15, 16, 3), np.uint8), tmp_path / "odd.mp4")
    with pytest.raises(ValueError, match="frames must be a non-empty"):
        export_gif(np.zeros((2, 16, 16), np.uint8), tmp_path / "grey.gif")
    assert list(tmp_path.iterdir()) == []


# ---- command line -------------------------------------------------------------------------------------


def _run(capsys, *argv):
    code = main(["generate-video", *argv])
    return code, capsys.readouterr().err


def test_cli_writes_a_clip_per_stage(modelscope_folder, tmp_path, capsys):
    out = tmp_path / "run"
    code, err = _run(
        capsys,
        "--model",
        str(modelscope_folder),
        "--prompt",
        PROMPT,
        "--frames",
        str(FRAMES),
        "--fps",
        "6",
        "--height",
        "32",
        "--width",
        "32",
        "--k",
        "600",
        "--steps",
        str(STEPS),
        "--seed",
        "5",
        "--device",
        "cpu",
        "--out",
        str(out),
    )
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == [
        "final.mp4",
        "preview.gif",
        "result.json",
        "stage0.mp4",
        "stage1.mp4",
    ]
    result = json.loads((out / "result.json").read_text())
    assert result["method"] == "self-cascade" and result["seed"] == 5 and result["k"] == [600]
    assert result["fps"] == 6 and result["num_frames"] == FRAMES
    assert [(s["height"], s["width"]) for s in result["stages"]] == [(16, 16), (32, 32)]
    assert _read_mp4(out / "stage0.mp4")[1].shape == (FRAMES, 16, 16, 3)
    assert _read_mp4(out / "final.mp4")[1].shape == (FRAMES, 32, 32, 3)
    assert Image.open(out / "preview.gif").n_frames == FRAMES


def test_cli_direct_on_sd_plus_motion_adapter(sd_folder, motion_folder, tmp_path, capsys):
    out = tmp_path / "run"
    code, err = _run(
        capsys,
        "--model",
        str(sd_folder),
        "--motion-adapter",
        str(motion_folder),
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
        "--method",
        "direct",
        "--device",
        "cpu",
        "--out",
        str(out),
    )
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["final.mp4", "preview.gif", "result.json"]
    assert json.loads((out / "result.json").read_text())["fps"] == video.DEFAULT_FPS


def test_cli_prompts_file_writes_one_folder_per_prompt(modelscope_folder, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue square\n")
    code, err = _run(
        capsys,
        "--model",
        str(modelscope_folder),
        "--prompts-file",
        str(prompts),
        "--frames",
        "2",
        "--height",
        "32",
        "--width",
        "32",
        "--steps",
        "1",
        "--seed",
        "10",
        "--method",
        "direct",
        "--out",
        str(tmp_path / "o"),
    )
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["0000", "0001"]
    second = json.loads((tmp_path / "o" / "0001" / "result.json").read_text())
    assert second["prompt"] == "a blue square" and second["seed"] == 11 and second["num_frames"] == 2


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"--frames": "0"}, "--frames must be >= 1, got 0"),
        ({"--k": "5000"}, "k must be an integer in 1..999"),
        ({"--height": "30"}, "multiple of 4"),
        ({"--method": "attn-sf"}, "invalid choice: 'attn-sf'"),
        ({"--method": "direct", "--stages": "1"}, "--stages apply to --method self-cascade only"),
        ({"--fps": "0"}, "--fps must be in (0, 60], got 0"),
        ({"--motion-adapter": "ADAPTER"}, "takes no motion adapter"),
        ({"--model": "/nonexistent/video-model"}, "no such folder"),
        ({"--model": "SD"}, "is an image model"),
    ],
)
def test_cli_bad_input_one_line_exit_2_nothing_written(
    modelscope_folder, sd_folder, motion_folder, tmp_path, capsys, overrides, message
):
    flags = {
        "--model": str(modelscope_folder),
        "--prompt": PROMPT,
        "--height": "32",
        "--width": "32",
        "--frames": str(FRAMES),
        "--steps": "2",
    }
    for flag, value in overrides.items():
        flags[flag] = {"ADAPTER": str(motion_folder), "SD": str(sd_folder)}.get(value, value)
    argv = [item for pair in flags.items() for item in pair]
    code, err = _run(capsys, *argv, "--out", str(tmp_path / "o"))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert list(tmp_path.iterdir()) == []


def test_cli_embedded_missing_is_one_clear_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(video, "VIDEO_EMBEDDED", tmp_path / "shapes-video")
    code, err = _run(capsys, "--prompt", PROMPT, "--height", "128", "--width", "128", "--out", str(tmp_path / "o"))
    assert code == 2 and err.strip().splitlines() == [
        f"error: the embedded video model is missing: {tmp_path / 'shapes-video'} (train it: python -m tuner.train_video)"  # noqa: E501
    ]


# ---- moving shapes ----------------------------------------------------------------------------------


def test_same_seed_same_clip_at_any_size_and_frame_count():
    clip = clip_from_seed(5)
    assert clip == clip_from_seed(5) and clip != clip_from_seed(6)
    small = render_clip(clip, 7, 32, 48).astype(float)
    large = render_clip(clip, 7, 64, 96).astype(float)
    pooled = large.reshape(7, 32, 2, 48, 2, 3).mean(axis=(2, 4))
    assert np.abs(pooled - small).mean() < 1.5  # the same picture; only anti-aliased edges differ
    assert np.array_equal(render_clip(clip, 4, 32, 48), small[::2].astype(np.uint8))  # time is relative too
    assert all(np.abs(np.diff(small, axis=0)).sum(axis=(1, 2, 3)) > 0)  # something moves every frame


def test_paths_stay_inside_and_objects_stay_apart():
    kinds = set()
    for seed in range(60):
        clip = clip_from_seed(seed)
        assert clip.prompt == clip.scene_at(0.7).prompt
        for s in np.linspace(0, 1, 23):
            objects = clip.scene_at(float(s)).objects
            for o in objects:
                assert o.r + _MARGIN - 1e-9 <= o.cx <= 1 - o.r - _MARGIN + 1e-9
                assert o.r + _MARGIN - 1e-9 <= o.cy <= 1 - o.r - _MARGIN + 1e-9
            for i, a in enumerate(objects):
                for b in objects[i + 1 :]:  # sampled more finely than the generator checks: paths are smooth
                    assert max(abs(a.cx - b.cx), abs(a.cy - b.cy)) >= a.r + b.r + _MARGIN - 0.01
        kinds |= {type(o.path) for o in clip.objects}
        speeds = [math.dist(o.path.at(0), o.path.at(1)) for o in clip.objects if isinstance(o.path, Line)]
        assert all(0.15 - 1e-9 <= d <= 0.4 + 1e-9 for d in speeds)
    assert kinds == {Line, Orbit}


def test_every_frame_is_a_still_scene_of_the_prompt():
    # What per-frame composition accuracy in the benchmark rests on: the detector reads every frame right.
    for seed in range(10):
        clip = clip_from_seed(seed)
        assert all(matches(frame, clip.prompt) for frame in render_clip(clip, 8, 64, 64))


# ---- training ----------------------------------------------------------------------------------------


def test_zero_initialised_motion_layers_keep_the_image_unet(sd_folder):
    from tuner.train_video import Config, motion_adapter, motion_modules, zero_init

    unet = UNet2DConditionModel.from_pretrained(sd_folder, subfolder="unet")
    motion = UNetMotionModel.from_unet2d(unet, motion_adapter(Config(motion_heads=2), unet))
    zero_init(motion_modules(motion))
    gen = torch.Generator().manual_seed(0)
    x, text = torch.randn(1, 4, FRAMES, 8, 8, generator=gen), torch.randn(1, 16, 16, generator=gen)
    with torch.no_grad():
        out = motion(x, 500, encoder_hidden_states=text.repeat_interleave(FRAMES, dim=0)).sample
        per_frame = unet(x[0].permute(1, 0, 2, 3), 500, encoder_hidden_states=text.expand(FRAMES, -1, -1)).sample
    torch.testing.assert_close(out[0].permute(1, 0, 2, 3), per_frame, atol=1e-5, rtol=1e-4)


def test_train_video_resumes_exactly_and_exports_a_loadable_model(sd_folder, tmp_path):
    from tuner.train_video import main as train

    def run(work: str, steps: int) -> dict:
        train(
            [
                "--base",
                str(sd_folder),
                "--out",
                str(tmp_path / "video"),
                "--work",
                str(tmp_path / work),
                "--frames",
                str(FRAMES),
                "--motion-heads",
                "2",
                "--motion-max-frames",
                "8",
                "--cache-clips",
                "4",
                "--batch",
                "2",
                "--checkpoint-every",
                "1",
                "--steps",
                str(steps),
            ]
        )
        return torch.load(tmp_path / work / "motion.ckpt", weights_only=True)

    run("resumed", 1)
    (tmp_path / "video" / "upsamplers").mkdir()
    (tmp_path / "video" / "upsamplers" / "x2.safetensors").write_bytes(b"kept")
    resumed, straight = run("resumed", 2), run("straight", 2)
    assert (tmp_path / "video" / "upsamplers" / "x2.safetensors").read_bytes() == b"kept"  # across re-exports
    assert resumed["step"] == straight["step"] == 2
    for name in ("motion", "ema"):  # data, noise and timesteps come from (seed, step): a resume changes nothing
        for key, value in straight[name].items():
            torch.testing.assert_close(resumed[name][key], value)
    model = load_video_model(str(tmp_path / "video"), device="cpu")
    assert model.kind == "animatediff" and model.default_frames == FRAMES and model.max_frames == 8
    assert not (tmp_path / "video" / "motion_adapter").exists()  # the motion layers are stored once, in unet/
    from diffusers import AnimateDiffPipeline

    assert isinstance(AnimateDiffPipeline.from_pretrained(tmp_path / "video").unet, UNetMotionModel)
    result = video_self_cascade(model, PROMPT, 32, 32, num_inference_steps=2, seed=0)
    assert result.clips[0].shape == (FRAMES, 32, 32, 3)
