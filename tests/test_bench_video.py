"""The video benchmark: its metrics on hand-made moving-shapes clips, and the command end to end on a tiny
ModelScope-layout model."""

import math
import re
from dataclasses import replace

import numpy as np
import pytest
import torch

from sc_app import bench_video
from sc_app.bench_video import locate, main, position_jitter, real_clips, score_clip
from sc_app.moving_shapes import Clip, Line, MovingObject, Orbit, clip_from_seed, frame_times, render_clip
from sc_app.shapes import detect, random_prompts, render
from sc_app.upsampler import Adapter, save_adapter
from sc_app.video import generate_video, load_video_model

FRAMES = 8
SIDE = 64
TOP, BOTTOM = (225, 225, 225), (215, 215, 220)


def one_object_clip(path: Line, colour: str = "red", shape: str = "square", r: float = 0.14) -> Clip:
    return Clip((MovingObject(colour, shape, r, path),), TOP, BOTTOM)


# ---- metrics on hand-made clips -------------------------------------------------------------------


def smooth_floor(clip: Clip, frames: int) -> float:
    """The largest |second difference| of a clip's exact paths: 0 on a line, 2R(1 - cos(step angle)) on an orbit."""
    return max(
        2 * o.path.radius * (1 - math.cos(o.path.sweep / (frames - 1))) if isinstance(o.path, Orbit) else 0.0
        for o in clip.objects
    )


@pytest.mark.parametrize("seed", range(4))
def test_a_real_clip_scores_full_consistency(seed):
    clip = clip_from_seed(seed)
    score = score_clip(render_clip(clip, FRAMES, SIDE, SIDE), clip.prompt)
    assert score.frames_matched == score.num_frames == FRAMES and score.all_matched
    assert score.counts_stable
    # no more than the paths' own curvature, give or take a tenth of a pixel
    assert score.jitter is not None and score.jitter < smooth_floor(clip, FRAMES) + 0.1 / SIDE


def test_locate_finds_the_objects_detect_counts_at_their_centres():
    clip = clip_from_seed(1)
    for s, frame in zip(frame_times(FRAMES), render_clip(clip, FRAMES, SIDE, 2 * SIDE)):
        found = locate(frame)
        assert [c for c, _, _ in found] == [c for c, _ in detect(frame)]
        for obj in clip.scene_at(float(s)).objects:
            ((x, y),) = [(x, y) for c, x, y in found if c == obj.colour]
            # a triangle's centroid lies r/3 (shorter-side units) below its centre
            drop = obj.r / 3 if obj.shape == "triangle" else 0.0
            assert abs(x - obj.cx) < 0.5 / (2 * SIDE) and abs(y - obj.cy - drop) < 0.5 / SIDE


def test_straight_motion_has_no_jitter_and_a_jump_has_much():
    clip = one_object_clip(Line(0.25, 0.3, 0.7, 0.45))
    frames = render_clip(clip, FRAMES, SIDE, SIDE)
    smooth = score_clip(frames, clip.prompt)
    assert smooth.jitter < 0.005
    middle = FRAMES // 2
    moved = replace(clip.scene_at(frame_times(FRAMES)[middle]).objects[0], cy=0.75)
    frames[middle] = render(replace(clip.scene_at(0.0), objects=(moved,)), SIDE, SIDE)
    jumped = score_clip(frames, clip.prompt)
    # the same object, just elsewhere: composition and count stay right, only the position measure sees it
    assert jumped.all_matched and jumped.counts_stable
    assert jumped.jitter > 0.05 and jumped.jitter > 20 * smooth.jitter


def test_a_vanishing_object_breaks_count_and_composition():
    clip = clip_from_seed(next(s for s in range(100) if len(clip_from_seed(s).objects) == 2))
    frames = render_clip(clip, FRAMES, SIDE, SIDE)
    scene = clip.scene_at(frame_times(FRAMES)[3])
    frames[3] = render(replace(scene, objects=scene.objects[:1]), SIDE, SIDE)
    score = score_clip(frames, clip.prompt)
    assert score.frames_matched == FRAMES - 1 and not score.all_matched
    assert not score.counts_stable
    assert score.jitter is not None and score.jitter < 0.01  # the other object's track is still smooth


def test_objects_of_one_colour_are_paired_by_distance_not_by_order():
    # Two red squares passing each other vertically: detect's top-to-bottom order swaps halfway, so pairing
    # by list position would make both jump across the frame every time.
    clip = Clip(
        (
            MovingObject("red", "square", 0.1, Line(0.25, 0.2, 0.25, 0.8)),
            MovingObject("red", "square", 0.1, Line(0.75, 0.8, 0.75, 0.2)),
        ),
        TOP,
        BOTTOM,
    )
    objects = [locate(frame) for frame in render_clip(clip, FRAMES, SIDE, SIDE)]
    assert [x < 0.5 for _, x, _ in objects[0]] != [x < 0.5 for _, x, _ in objects[-1]]  # the order did swap
    assert position_jitter(objects) < 0.005


def test_no_triple_of_frames_means_no_jitter():
    clip = one_object_clip(Line(0.3, 0.3, 0.6, 0.6))
    assert score_clip(render_clip(clip, 2, SIDE, SIDE), clip.prompt).jitter is None
    assert position_jitter([[], [], []]) is None


def test_real_clips_are_fixed_by_the_seed():
    assert real_clips(3, 5) == real_clips(3, 5) != real_clips(3, 6)


# ---- the command end to end -----------------------------------------------------------------------


def section_rows(text: str, name: str) -> dict[str, list[str]]:
    body = re.search(rf"<!-- bench:{name} -->(.*?)<!-- /bench:{name} -->", text, re.S)[1]
    rows = [
        [c.strip() for c in line.strip().strip("|").split("|")] for line in body.splitlines() if line.startswith("| ")
    ]
    return {row[0]: row[1:] for row in rows[1:]}


def test_the_command_writes_its_section_and_resumes(modelscope_folder, tmp_path, monkeypatch, capsys):
    md, work = tmp_path / "docs" / "bench.md", tmp_path / "work"
    md.parent.mkdir()
    md.write_text("# Benchmarks\n\nkept by hand\n")
    argv = [
        "--model",
        str(modelscope_folder),
        "--device",
        "cpu",
        "--n",
        "2",
        "--frames",
        "3",
        "--steps",
        "2",
        "--k",
        "500,700",
        "--md",
        str(md),
        "--work",
        str(work),
    ]
    assert main(argv) == 0
    text = md.read_text()
    rows = section_rows(text, "video")
    # the tiny model's base is 16x16, so the default target is 32x32 (4x pixels) over a 16x16 pivot
    assert list(rows) == [
        "real clips (32x32)",
        "real clips (16x16)",
        "base (pivot 16x16, direct)",
        "direct",
        "self-cascade K=500",
        "self-cascade K=700",
    ]
    assert all(row[1] == "2" for row in rows.values())
    assert rows["direct"][-1] == "1.00x" and rows["self-cascade K=700"][-1].endswith("x")
    assert rows["real clips (32x32)"][-2:] == ["-", "-"]
    assert "kept by hand" in text and "python -m sc_app.bench_video --model" in text and "FVD" in text
    assert (md.parent / "video_grid.png").is_file() and "video_grid.png" in text

    prompts = random_prompts(2, 0)
    cells = {
        c.variant.label: c
        for c in (
            bench_video.ClipCell(v, (32, 32), 3, work)
            for v in bench_video.make_variants(["self-cascade"], [500, 700], False)
        )
    }
    records = [cells["direct"].record(i) for i in range(2)]
    assert [(r["prompt"], r["seed"]) for r in records] == [(prompts[0], 0), (prompts[1], 1)]
    # the table is the metrics of the stored clips, and a stored clip is what generate_video makes
    scores = [score_clip(cells["self-cascade K=500"].clip(i), prompts[i]) for i in range(2)]
    frames = sum(s.frames_matched for s in scores) / 6
    assert rows["self-cascade K=500"][2] == f"{100 * frames:.1f}%"
    model = load_video_model(str(modelscope_folder), device="cpu")
    again = generate_video(
        model, prompts[1], 32, 32, "self-cascade", k=700, num_frames=3, num_inference_steps=2, seed=1
    )
    np.testing.assert_array_equal(again.clips[0], cells["self-cascade K=700"].clip(1))

    def no_sampling(*args, **kwargs):
        raise AssertionError("a finished clip was generated again")

    monkeypatch.setattr(bench_video, "generate_video", no_sampling)
    capsys.readouterr()
    assert main(argv) == 0
    assert section_rows(md.read_text(), "video") == rows
    assert md.read_text().count("<!-- bench:video -->") == 1


@pytest.mark.parametrize(
    "flags",
    [
        ["--n", "0"],
        ["--k", "7x"],
        ["--size", "32"],
        ["--frames", "0"],
        ["--upsampler", "no-such-file.safetensors"],
        ["--bogus"],
        ["--model", "./no-such-folder"],
        ["--size", "30x30"],  # the tiny UNet takes multiples of 4
        ["--k", "0"],
    ],
)
def test_bad_flags_are_one_line_and_exit_2(flags, modelscope_folder, tmp_path, capsys):
    md = tmp_path / "bench.md"
    model = [] if "--model" in flags else ["--model", str(modelscope_folder)]
    code = main(model + ["--device", "cpu", "--md", str(md), "--work", str(tmp_path / "w")] + flags)
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error:") and len(err.splitlines()) == 1
    assert not md.exists() and not (tmp_path / "w").exists()


def test_the_tuned_rows_run_the_upsampler_at_its_own_k(modelscope_folder, tmp_path):
    model = load_video_model(str(modelscope_folder), device="cpu")
    adapter = Adapter(model.unet.config, scale=2.0, k=500, base_model=model.name, unet_class=type(model.unet).__name__)
    torch.manual_seed(0)
    for parameter in adapter.parameters():  # trained-looking weights: its residuals must change the clips
        parameter.data.normal_(0.0, 0.3)
    path = save_adapter(adapter, tmp_path / "adapter.safetensors")
    md, work = tmp_path / "bench.md", tmp_path / "work"
    common = [
        "--model",
        str(modelscope_folder),
        "--device",
        "cpu",
        "--n",
        "2",
        "--frames",
        "3",
        "--steps",
        "2",
        "--upsampler",
        str(path),
        "--md",
        str(md),
        "--work",
        str(work),
        "--grid-prompts",
        "0",
    ]
    assert main(common + ["--k", "500"]) == 0
    rows = section_rows(md.read_text(), "video")
    assert list(rows)[-2:] == ["self-cascade K=500", "self-cascade tuned K=500"]
    folder = work / "32x32-3f"
    tuned = [p for p in folder.iterdir() if p.name.startswith("self-cascade-tuned-k-500-")]
    free = folder / "self-cascade-k-500"
    assert len(tuned) == 1  # the folder carries the adapter file's hash: a retrained adapter never reuses clips
    prompts = random_prompts(2, 0)
    for i in range(2):
        clip = np.load(tuned[0] / f"{i:04d}.npz")["clip"]
        assert not np.array_equal(clip, np.load(free / f"{i:04d}.npz")["clip"])
        again = generate_video(
            model,
            prompts[i],
            32,
            32,
            "self-cascade",
            k=500,
            num_frames=3,
            num_inference_steps=2,
            seed=i,
            upsampler=path,
        )
        np.testing.assert_array_equal(clip, again.clips[0])

    # without --k: the tuning-free row at the model's K, the tuned one at the adapter's
    assert main(common) == 0
    rows = section_rows(md.read_text(), "video")
    assert list(rows)[-3:] == ["direct", f"self-cascade K={model.default_k}", "self-cascade tuned K=500"]
    assert "trained at K=500" in md.read_text() and not (md.parent / "video_grid.png").exists()


def test_prompts_are_split_across_cpu_processes(modelscope_folder, tmp_path):
    import os
    import subprocess
    import sys

    md, work = tmp_path / "bench.md", tmp_path / "work"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]
    run = subprocess.run(
        [
            *launch,
            "-m",
            "sc_app.bench_video",
            "--model",
            str(modelscope_folder),
            "--n",
            "4",
            "--frames",
            "3",
            "--steps",
            "2",
            "--grid-prompts",
            "0",
            "--md",
            str(md),
            "--work",
            str(work),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    made_by = {
        int(line.split("clip ")[1].split("/")[0]): line.split("]")[0].split()[-1]
        for line in run.stderr.splitlines()
        if line.startswith("  [process")
    }
    assert made_by == {1: "0", 2: "0", 3: "1", 4: "1"}  # each process its half, none twice
    assert sorted(p.name for p in (work / "32x32-3f" / "direct").glob("*.json")) == [f"{i:04d}.json" for i in range(4)]
    rows = section_rows(md.read_text(), "video")
    assert rows["direct"][1] == "4" and md.read_text().count("<!-- bench:video -->") == 1
    launched = "Command: `accelerate launch --multi_gpu --num_processes 2 --num_machines 1 -m sc_app.bench_video"
    assert launched in md.read_text()  # the section says how the run was split
