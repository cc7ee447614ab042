"""`python -m sc_app.bench ablation`: settings side by side on development prompts, resumable, split over
processes, with a figure of the samples."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from sc_app import api, metrics
from sc_app.baselines import upscale
from sc_app.baselines.scalecrafter import plan_for, plan_with
from sc_app.bench import main
from sc_app.bench.ablation import HEADER, OTHER_SEEDS, parse_setting
from sc_app.bench.figure import LABEL_H, PAD
from sc_app.bench.samples import eval_scenes
from sc_app.cli import BadInput
from sc_app.shapes import render


def run(sd_folder, work, out, *settings, n=2, size="64x64", direct_n=1, fid=False, extra=()):
    args = [
        "ablation",
        "--model",
        str(sd_folder),
        "--size",
        size,
        "--n",
        str(n),
        "--direct-n",
        str(direct_n),
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--device",
        "cpu",
        "--work",
        str(work),
        "--out",
        str(out),
        *([] if fid else ["--no-fid"]),
        *extra,
    ]
    for setting in settings:
        args += ["--setting", setting]
    return main(args)


def table_rows(text: str) -> dict[str, list[str]]:
    """label -> cells of each table row in a section."""
    lines = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| setting")]
    return {cells[0]: cells for cells in ([c.strip() for c in line.strip("|").split(" | ")] for line in lines)}


def folder(work, size: str, slug: str):
    """The one row folder under work/size named `slug`-<its key's hash>."""
    (found,) = [p for p in (work / size).iterdir() if p.name.rsplit("-", 1)[0] == slug]
    return found


def pixels(work, size: str, slug: str) -> list[np.ndarray]:
    return [np.asarray(Image.open(png)) for png in sorted(folder(work, size, slug).glob("*.png"))]


def same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def records(work, size: str, slug: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder(work, size, slug).glob("*.json"))]


def test_ablation_table_with_intervals_and_resume(sd_folder, tmp_path):
    work, out = tmp_path / "work", tmp_path / "bench.md"
    assert (
        run(
            sd_folder, work, out, "tuning-free: k=600", "lower last stage: k=600,300", "pixels: k=600; upsample=lanczos"
        )
        == 0
    )
    text = out.read_text()
    assert "<!-- bench:ablation-64x64 -->" in text and "Development prompts" in text
    rows = table_rows(text)
    assert list(rows) == ["base (16x16, other seeds)", "tuning-free", "lower last stage", "pixels"]
    assert all("% [" in r[HEADER.index("composition [95%]")] for r in rows.values())  # each with its interval
    folders = {p.name: p for p in (work / "64x64").iterdir()}
    assert len(folders) == 4  # direct (the time reference) and the three settings, each in its own folder
    direct = next(p for name, p in folders.items() if name.startswith("direct"))
    assert len(list(direct.glob("*.json"))) == 1  # --direct-n 1
    record = json.loads(next(p for n, p in folders.items() if n.startswith("pixels")).joinpath("0001.json").read_text())
    assert {"match", "fidelity", "seconds", "prompt", "seed"} <= set(record)
    stamps = {p: p.stat().st_mtime_ns for p in work.rglob("*.png")}
    out.write_text(text + "\nhand-written notes\n")
    assert (
        run(
            sd_folder, work, out, "tuning-free: k=600", "lower last stage: k=600,300", "pixels: k=600; upsample=lanczos"
        )
        == 0
    )
    assert {p: p.stat().st_mtime_ns for p in work.rglob("*.png")} == stamps  # resumed: nothing sampled again
    again = out.read_text()
    assert again.count("<!-- bench:ablation-64x64 -->") == 1 and table_rows(again) == rows  # replaced, same table
    assert again.index("<!-- /bench:ablation-64x64 -->") < again.index("hand-written notes")  # where it was


def test_a_row_whose_samples_ran_with_different_settings_is_refused(sd_folder, tmp_path, capsys):
    """A resumed bench whose default changed between its runs (here `auto` attention's rule, as a record of the
    older rule reads) would average two settings into one row: refused, naming the setting, the table untouched."""
    work, out = tmp_path / "work", tmp_path / "bench.md"
    assert run(sd_folder, work, out, "auto: k=600; attention=auto") == 0
    before = out.read_text()
    older = folder(work, "64x64", "auto") / "0001.json"
    record = json.loads(older.read_text())
    assert record["resolved"]["stage_attention"][1] == "downsample-kv x2"
    record["resolved"]["stage_attention"][1] = "window 8x8"
    older.write_text(json.dumps(record))
    assert run(sd_folder, work, out, "auto: k=600; attention=auto") == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the run's log lines: one line says why
    assert "row 'auto': its samples in" in last and "stage_attention" in last and "fresh --work" in last
    assert out.read_text() == before


def test_bad_settings_are_one_line(sd_folder, tmp_path, capsys):
    assert run(sd_folder, tmp_path / "w", tmp_path / "o.md", ": k=300") == 2
    assert "LABEL: key=value" in capsys.readouterr().err
    assert run(sd_folder, tmp_path / "w", tmp_path / "o.md", "x: steps=3") == 2
    assert "not one of k=..." in capsys.readouterr().err
    assert run(sd_folder, tmp_path / "w", tmp_path / "o.md", "x: upsampler=missing.safetensors") == 2
    assert "no such file" in capsys.readouterr().err
    assert run(sd_folder, tmp_path / "w", tmp_path / "o.md", "x: k=600,300,100") == 2
    assert parse_setting("a: k=300, 150 ;upsample=bicubic").generate_options() == {
        "k": [300, 150],
        "upsample": "bicubic",
    }


def test_other_methods_loras_and_fine_tuned_models_are_rows(sd_folder, tmp_path):
    from safetensors import safe_open

    from sc_app.models import load_model
    from tuner.finetune import train_finetune

    lora, full = tmp_path / "r2.safetensors", tmp_path / "full"
    options = dict(size=64, steps=2, batch_size=2)
    train_finetune(load_model(str(sd_folder), device="cpu"), "shapes", method="lora", rank=2, out=lora, **options)
    train_finetune(load_model(str(sd_folder), device="cpu"), "shapes", method="full", out=full, **options)
    out = tmp_path / "bench.md"
    settings = ["resized: method=lanczos", f"lora: method=direct; lora={lora}", f"tuned: method=direct; model={full}"]
    assert run(sd_folder, tmp_path / "work", out, *settings) == 0
    rows = {
        r.split(" | ")[0].strip("| "): r.split(" | ")
        for r in out.read_text().splitlines()
        if r.startswith("| ") and "setting" not in r
    }
    with safe_open(str(lora), framework="pt") as f:
        lora_params = sum(f.get_tensor(k).numel() for k in f.keys())
    assert rows["lora"][2] == f"{lora_params:,}" and rows["lora"][3] == "2"
    assert rows["tuned"][3] == "2" and int(rows["tuned"][2].replace(",", "")) > lora_params
    assert rows["resized"][2] == "-"  # nothing trained
    assert run(sd_folder, tmp_path / "w2", out, "x: method=nope") == 2


def test_bad_values_and_keys_of_another_method_are_one_line():
    for spec, words in [
        ("method=direct; guidance=abc", "guidance must be a number in 0..100"),
        ("guidance=nan", "guidance must be a number"),
        ("method=sr; noise_level=2.5", "noise_level must be an integer >= 0"),
        ("method=scalecrafter; dilation=0.5", "dilation must be a number >= 1"),
        ("method=scalecrafter; tau=51", "tau must be an integer in 0..50"),
        ("method=direct; dilation=2", "dilation= applies to method=scalecrafter only"),
        ("noise_level=20", "noise_level= applies to method=sr only"),
        ("ndcfg=2", "ndcfg= applies to method=scalecrafter only"),
        ("method=scalecrafter; ndcfg=0.5", "ndcfg must be a number >= 1"),
        ("method=sr; k=300", "k= applies to method=self-cascade only"),
        ("upsampler_min_t=100", "upsampler_min_t= needs upsampler="),
        ("upsampler=README.md; upsampler_min_t=-1", "upsampler_min_t must be an integer in 0..1000"),
        ("positions=rope", "positions must be one of extend, interpolate, got 'rope'"),
    ]:
        with pytest.raises(BadInput) as error:
            parse_setting(f"x: {spec}")
        assert words in str(error.value) and "\n" not in str(error.value)
    setting = parse_setting("x: method=sr; noise_level=50; guidance=3")
    assert setting.generate_options() == {"noise_level": 50, "guidance_scale": 3.0}
    assert parse_setting(setting.text) == setting  # the text form is what search writes and ablation reads
    assert parse_setting("x: method=direct; positions=interpolate").generate_options() == {"positions": "interpolate"}
    assert parse_setting("x: method=direct").key == parse_setting("x: method=direct").key
    assert parse_setting("x: method=direct; guidance=3").key != parse_setting("x: method=direct").key


def test_plan_with_replaces_the_dilation_and_tau_on_the_plans_blocks(sd_model):
    unet, base = sd_model.unet, sd_model.base_size
    rule = plan_for(unet, base, 32, 32)  # the general rule at 4x pixels: d = 2 below the top level
    assert plan_with(unet, base, 32, 32) == rule
    wider = plan_with(unet, base, 32, 32, dilation=3)
    assert wider.dilations == dict.fromkeys(rule.dilations, 3) and wider.tau == rule.tau and rule.dilations
    assert plan_with(unet, base, 32, 32, tau=5).dilations == rule.dilations
    assert plan_with(unet, base, 32, 32, tau=5).tau == 5
    assert plan_with(unet, base, 16, 16, dilation=2).dilations == dict.fromkeys(rule.dilations, 2)  # rule: none here
    with pytest.raises(ValueError, match="tau"):
        plan_with(unet, base, 32, 32, tau=51)
    damped = plan_with(unet, base, 32, 32, dilation=3, ndcfg=2)  # noise-damped guidance on the same blocks
    assert damped.ndcfg == dict.fromkeys(rule.dilations, 2) and rule.ndcfg is None
    assert plan_with(unet, base, 32, 32, ndcfg=1.5).dilations == rule.dilations
    with pytest.raises(ValueError, match="at most the plan's dilation 2"):
        plan_with(unet, base, 32, 32, ndcfg=3)
    with pytest.raises(ValueError, match="re-dilates nothing"):
        plan_with(unet, base, 16, 16, ndcfg=1.5)
    # A released preset: its own blocks, one factor, no progressive schedule, the noise-damped branch capped.
    sd21 = SimpleNamespace(
        config=SimpleNamespace(
            block_out_channels=(320, 640, 1280, 1280),
            addition_embed_type=None,
            cross_attention_dim=1024,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        )
    )
    preset = plan_for(sd21, 512, 2048, 2048)
    changed = plan_with(sd21, 512, 2048, 2048, dilation=3, tau=30)
    assert preset.progressive and max(preset.ndcfg.values()) == 4
    assert changed.dilations == dict.fromkeys(preset.dilations, 3) and changed.tau == 30 and not changed.progressive
    assert changed.ndcfg == {block: min(d, 3) for block, d in preset.ndcfg.items()}
    assert changed.preset == "sd2.1 2048x2048, dilation 3, tau 30"


def test_guidance_and_scalecrafter_overrides_reach_generate(sd_model, sd_folder, tmp_path):
    work, out = tmp_path / "work", tmp_path / "bench.md"
    own = f"{sd_model.default_guidance:g}"
    settings = [
        "g3: method=direct; guidance=3",
        f"g own: method=direct; guidance={own}",
        "sc: method=scalecrafter",
        "sc d3: method=scalecrafter; dilation=3",
        "sc tau0: method=scalecrafter; tau=0",
        "sc ndcfg: method=scalecrafter; dilation=3; ndcfg=2",
    ]
    assert run(sd_folder, work, out, *settings, size="32x32", direct_n=2) == 0
    direct = pixels(work, "32x32", "direct")
    assert len(direct) == 2 and same(pixels(work, "32x32", "g-own"), direct)  # the model's guidance, said aloud
    assert not same(pixels(work, "32x32", "g3"), direct)
    assert not same(pixels(work, "32x32", "sc"), direct)  # the general rule re-dilates the first step
    assert not same(pixels(work, "32x32", "sc-d3"), pixels(work, "32x32", "sc"))
    assert not same(pixels(work, "32x32", "sc-ndcfg"), pixels(work, "32x32", "sc-d3"))  # the milder uncond branch
    assert same(pixels(work, "32x32", "sc-tau0"), direct)  # tau 0: no step re-dilated, direct sampling exactly


def test_noise_level_reaches_sr_and_is_checked_against_the_sr_model(sd_folder, tmp_path, monkeypatch, capsys):
    from tiny_models import make_upscaler

    monkeypatch.setattr(upscale, "SR_EMBEDDED", make_upscaler(tmp_path / "sr", sd_folder))
    monkeypatch.setattr(upscale, "_is_embedded", lambda model: True)  # the tiny model gets the tiny SR model
    work, out = tmp_path / "work", tmp_path / "bench.md"
    assert (
        run(sd_folder, work, out, "sr0: method=sr; noise_level=0", "sr300: method=sr; noise_level=300", size="32x32")
        == 0
    )
    assert not same(pixels(work, "32x32", "sr0"), pixels(work, "32x32", "sr300"))
    assert table_rows(out.read_text())["sr0"][2] != "-"  # the SR model's parameters
    assert run(sd_folder, work, out, "too much: method=sr; noise_level=351", size="32x32") == 2
    assert "noise_level must be in 0..350" in capsys.readouterr().err


def test_table_columns_and_an_unpaired_fid_b(sd_folder, tmp_path, monkeypatch):
    def thumbnails(images, device="cpu", batch_size=16):  # a cheap stand-in for Inception
        return np.stack(
            [np.asarray(Image.fromarray(np.asarray(im)).resize((4, 4)), np.float64).ravel() / 255 for im in images]
        )

    monkeypatch.setattr(metrics, "inception_features", thumbnails)
    work, out = tmp_path / "work", tmp_path / "bench.md"
    assert run(sd_folder, work, out, "sc: k=600", "resized: method=lanczos", n=3, size="32x32", fid=True) == 0
    text = out.read_text()
    header = next(line for line in text.splitlines() if line.startswith("| setting"))
    assert [c.strip() for c in header.strip("|").split(" | ")] == HEADER
    rows = table_rows(text)
    assert list(rows) == ["base (16x16, other seeds)", "sc", "resized"]
    for label, cells in rows.items():
        fid_r, kid_r, fid_b, kid_b = (
            cells[HEADER.index(name)] for name in ("FID_r [95%]", "KID_r", "FID_b [95%]", "KID_b")
        )
        assert " [" in fid_r and float(kid_r) == float(kid_r)
        assert (fid_b == kid_b == "-") == label.startswith("base")  # the base is FID_b's reference
        assert label.startswith("base") or " [" in fid_b
    assert "unpaired" in text and "bit-identical" in text

    # FID_b's reference: the base model's samples at the pivot size for the same prompts, other seeds.
    base = records(work, "16x16", "base-16x16-other-seeds")
    evaluated = {json.loads(p.read_text())["seed"] for p in (work / "32x32").rglob("*.json")}
    assert [r["seed"] for r in base] == [1000 + OTHER_SEEDS + i for i in range(3)]
    assert evaluated == {1000, 1001, 1002} and not evaluated & {r["seed"] for r in base}
    assert [r["prompt"] for r in base] == [r["prompt"] for r in records(work, "32x32", "sc")]

    # Resumed: every sample and every feature (FID_r's and FID_b's) is read back, nothing computed again.
    def fail(*args, **kwargs):
        raise AssertionError("a resumed run should not redo finished work")

    monkeypatch.setattr(metrics, "inception_features", fail)
    assert run(sd_folder, work, out, "sc: k=600", "resized: method=lanczos", n=3, size="32x32", fid=True) == 0
    assert table_rows(out.read_text()) == rows


def test_a_work_folder_keeps_its_seeds(sd_folder, tmp_path, capsys):
    work, out = tmp_path / "work", tmp_path / "bench.md"
    assert run(sd_folder, work, out, "resized: method=lanczos", size="32x32") == 0
    assert run(sd_folder, work, out, "resized: method=lanczos", size="32x32", extra=["--seed", "0"]) == 2
    assert "seed: 1000 there, 0 now" in capsys.readouterr().err  # test samples never mix with development ones


def test_a_work_folder_keeps_its_models_defaults(sd_folder, tmp_path, capsys):
    import shutil

    folder = shutil.copytree(sd_folder, tmp_path / "model")
    work, out = tmp_path / "work", tmp_path / "bench.md"
    assert run(folder, work, out, "sc: k=600", size="32x32") == 0
    (folder / "self_cascade.json").write_text('{"default_guidance": 3}')  # rows without guidance= now differ
    assert run(folder, work, out, "sc: k=600", size="32x32") == 2
    assert "model_settings: {} there, {'default_guidance': 3} now" in capsys.readouterr().err


def test_figure_puts_each_rows_samples_beside_the_real_render_and_the_base(sd_folder, tmp_path, monkeypatch):
    work, out, grid = tmp_path / "work", tmp_path / "docs" / "bench.md", tmp_path / "docs" / "figures" / "grid.png"
    settings = ("sc: k=600", "resized: method=lanczos")
    assert (
        run(sd_folder, work, out, *settings, n=3, size="32x32", extra=["--figure", str(grid), "--figure-rows", "2"])
        == 0
    )
    assert "![samples](figures/grid.png)" in out.read_text()  # relative to the section's file
    h = w = 32
    columns = 2 + len(settings)  # the real render, the base sample, then each setting's

    def size(rows: int) -> tuple[int, int]:
        return columns * (w + PAD) + PAD, 2 * LABEL_H + rows * (h + LABEL_H + PAD)

    with Image.open(grid) as im:
        assert im.size == size(2)  # --figure-rows 2 of the 3 prompts
        figure = np.asarray(im.convert("RGB"))

    def tile(row: int, column: int) -> np.ndarray:
        top, left = 2 * LABEL_H + row * (h + LABEL_H + PAD) + LABEL_H, PAD + column * (w + PAD)
        return figure[top : top + h, left : left + w]

    base = Image.open(folder(work, "16x16", "base-16x16-other-seeds") / "0001.png").convert("RGB")
    assert np.array_equal(tile(1, 0), render(eval_scenes(3, 1000)[1], h, w))
    assert np.array_equal(tile(1, 1), np.asarray(base.resize((w, h), Image.NEAREST)))  # enlarged: 16x16 pixels show
    assert np.array_equal(tile(1, 2), pixels(work, "32x32", "sc")[1])
    assert np.array_equal(tile(1, 3), pixels(work, "32x32", "resized")[1])

    # A rerun draws the figure from the samples in --work (by default 4 rows: here all 3 prompts), sampling nothing.
    def fail(*args, **kwargs):
        raise AssertionError("a resumed run should not sample again")

    monkeypatch.setattr(api, "generate", fail)
    assert run(sd_folder, work, out, *settings, n=3, size="32x32", extra=["--figure", str(grid)]) == 0
    with Image.open(grid) as im:
        assert im.size == size(3)
    assert not list(grid.parent.glob(".*"))  # written through a temporary file, none left


def test_accelerate_launch_splits_the_prompts_across_cpu_processes(sd_folder, tmp_path):
    work, out = tmp_path / "work", tmp_path / "bench.md"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    flags = ["--size", "32x32", "--n", "4", "--direct-n", "2", "--steps", "2", "--batch-size", "1", "--no-fid"]
    done = subprocess.run(
        [*launch, "-m", "sc_app.bench", "ablation", "--model", str(sd_folder), "--device", "cpu", *flags]
        + ["--work", str(work), "--out", str(out), "--setting", "resized: method=lanczos"],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    made_by = {  # prompt -> the process (its run's session) that sampled it, per row
        slug: {r["index"]: r["session"] for r in records(work, size, slug)}
        for slug, size in [("resized", "32x32"), ("direct", "32x32"), ("base-16x16-other-seeds", "16x16")]
    }
    first, second = made_by["resized"][0], made_by["resized"][1]
    # dealt in turn: a run stopped early has its finished prompts near a prefix, not two half-done halves
    assert first != second and made_by["resized"] == {0: first, 1: second, 2: first, 3: second}
    assert made_by["base-16x16-other-seeds"] == made_by["resized"]  # a prompt's samples all in one process
    assert made_by["direct"] == {0: first, 1: second}  # --direct-n 2
    text = out.read_text()
    assert text.count("<!-- bench:ablation-32x32 -->") == 1 and table_rows(text)["resized"][-1] == "4"
    assert "accelerate launch --multi_gpu --num_processes 2" in text


def test_direct_n_0_samples_no_time_reference(sd_folder, tmp_path):
    work, out = tmp_path / "work", tmp_path / "bench.md"
    assert run(sd_folder, work, out, "resized: method=lanczos", size="32x32", direct_n=0) == 0
    assert [p.name.rsplit("-", 1)[0] for p in (work / "32x32").iterdir()] == ["resized"]  # no direct samples
    assert table_rows(out.read_text())["resized"][10] == "-"  # so no time ratio


def test_training_time_comes_from_the_trained_files(sd_folder, sd_model, tmp_path):
    from sc_app.upsampler import Adapter, save_adapter

    recorded, older = tmp_path / "recorded.safetensors", tmp_path / "older.safetensors"
    save_adapter(Adapter(sd_model.unet.config, base_model=sd_model.name, train_seconds=90.0), recorded)
    save_adapter(Adapter(sd_model.unet.config, base_model=sd_model.name), older)  # as files before the record
    settings = ("free: k=600", f"recorded: k=600; upsampler={recorded}", f"older: k=600; upsampler={older}")
    out = tmp_path / "bench.md"
    assert run(sd_folder, tmp_path / "work", out, *settings, size="32x32") == 0
    column = HEADER.index("training time")
    times = {label: cells[column] for label, cells in table_rows(out.read_text()).items()}
    assert times == {"base (16x16, other seeds)": "-", "free": "-", "recorded": "1.5 min", "older": "not recorded"}


def test_restart_fraction_and_cosine_scales_reach_generate_and_every_row_names_its_settings(sd_folder, tmp_path):
    work, out = tmp_path / "work", tmp_path / "bench.md"
    settings = [
        "fs3: method=freescale; restart_fraction=0.3",
        "fs7: method=freescale; restart_fraction=0.7",
        "df0: method=demofusion; cosine_scale_1=0",
        "df3: method=demofusion; cosine_scale_1=3; cosine_scale_2=1",
        "sc: k=600",
    ]
    assert run(sd_folder, work, out, *settings, size="32x32", direct_n=2) == 0
    assert not same(pixels(work, "32x32", "fs3"), pixels(work, "32x32", "fs7"))
    assert not same(pixels(work, "32x32", "df0"), pixels(work, "32x32", "df3"))
    resolved = {slug: records(work, "32x32", slug)[0]["resolved"] for slug in ("fs3", "df3", "sc", "direct")}
    assert resolved["fs3"]["restart_fraction"] == 0.3 and resolved["df3"]["cosine_scale_2"] == 1.0
    assert resolved["sc"]["k"] == [600] and resolved["direct"]["guidance_scale"] == 7.5  # the model's, resolved
    text = out.read_text()
    assert "Settings each row ran with (resolved at run time" in text
    (fs7,) = [line for line in text.splitlines() if line.startswith("- fs7: ")]
    assert all(f in fs7 for f in ("steps=2", "guidance_scale=7.5", "restart_fraction=0.7"))  # never "model's default"
    for spec, words in [
        ("method=freescale; restart_fraction=1", "restart_fraction must be a number in 0..0.99"),
        ("method=demofusion; cosine_scale_1=-1", "cosine_scale_1 must be a number >= 0"),
        ("method=direct; restart_fraction=0.5", "restart_fraction= applies to method=freescale only"),
        ("method=freescale; cosine_scale_2=1", "cosine_scale_2= applies to method=demofusion only"),
    ]:
        with pytest.raises(BadInput, match=words):
            parse_setting(f"x: {spec}")


def test_no_method_decodes_its_intermediate_stages_in_a_bench_row(sd_folder, tmp_path, monkeypatch):
    """The time of every row holds the same decodes: the final image's (and the pixels a method works on)."""
    from sc_app.bench.ablation import SKIPS_STAGE_DECODES

    asked = {}
    real = api.generate

    def spy(model, prompts, height, width, method, **options):
        asked[method] = options.get("decode_stages", "not taken")
        return real(model, prompts, height, width, method, **options)

    monkeypatch.setattr(api, "generate", spy)
    rows = [f"{m}: method={m}" for m in ("self-cascade", "demofusion", "freescale", "scalecrafter", "lanczos")]
    assert run(sd_folder, tmp_path / "work", tmp_path / "bench.md", *rows, size="32x32", direct_n=1) == 0
    assert {m: v for m, v in asked.items() if m in SKIPS_STAGE_DECODES} == dict.fromkeys(SKIPS_STAGE_DECODES, False)
    assert asked["direct"] == asked["scalecrafter"] == asked["lanczos"] == "not taken"  # no intermediate stage


def test_scheduler_and_attention_are_row_settings_of_every_method(sd_folder, tmp_path):
    work, out = tmp_path / "work", tmp_path / "bench.md"
    settings = ["ddim: k=600", "euler-a: k=600; scheduler=euler-a", "window: k=600; attention=window"]
    settings += ["direct euler: method=direct; scheduler=euler"]
    settings += ["kv4: k=600; attention=downsample-kv; attention_factor=4"]
    assert run(sd_folder, work, out, *settings, size="32x32", direct_n=2) == 0
    assert not same(pixels(work, "32x32", "ddim"), pixels(work, "32x32", "euler-a"))
    resolved = {slug: records(work, "32x32", slug)[0]["resolved"] for slug in ("ddim", "euler-a", "window", "kv4")}
    assert resolved["ddim"]["scheduler"] == "ddim" and resolved["euler-a"]["scheduler"] == "euler-a"
    assert resolved["window"]["stage_attention"][1].startswith("window")
    assert resolved["kv4"]["attention_factor"] == 4 and resolved["kv4"]["stage_attention"][1] == "downsample-kv x4"
    assert records(work, "32x32", "direct-euler")[0]["resolved"]["scheduler"] == "euler"
    for spec, words in [
        ("scheduler=heun", "scheduler must be one of ddim, euler"),
        ("attention=flash", "attention must be one of full, window, downsample-kv, auto"),
        ("attention_factor=4", "attention_factor= needs attention=downsample-kv or attention=auto"),
        ("attention=downsample-kv; attention_factor=1.5", "attention_factor must be an integer in 1..64"),
    ]:
        with pytest.raises(BadInput, match=words):
            parse_setting(f"x: {spec}")


def test_a_flow_model_runs_its_rows_with_its_own_sampler_and_positions(tmp_path):
    """A tiny SD3 folder through the ablation: the section names the flow-matching Euler (not DDIM) and each
    row's positions and per-stage spacing, and the two position rows differ where the stages grow."""
    from tiny_flow_models import make_sd3

    model = make_sd3(tmp_path / "sd3")
    out, work = tmp_path / "flow.md", tmp_path / "work"
    rows = ["extend: positions=extend", "interpolate: positions=interpolate"]
    assert run(model, work, out, *rows, direct_n=0) == 0
    text = out.read_text()
    assert "flow-matching Euler 2 steps" in text and "DDIM" not in text
    assert "positions=extend" in text and "stage_position_scale=[1.0, 0.5]" in text
    assert set(table_rows(text)) >= {"extend", "interpolate"}
    assert not same(pixels(work, "64x64", "extend"), pixels(work, "64x64", "interpolate"))


def test_scores_writes_every_samples_own_scores_and_the_section_links_them(sd_folder, tmp_path):
    """--scores: a CSV line per sample of every row (the base's too), read from the samples' records, and the
    section names the file; a bad path is refused before anything loads."""
    import csv

    work, out, scores = tmp_path / "work", tmp_path / "docs" / "bench.md", tmp_path / "docs" / "fair" / "s.csv"
    out.parent.mkdir()
    assert (
        run(
            sd_folder,
            work,
            out,
            "tuning-free: k=600",
            "pixels: k=600; upsample=lanczos",
            n=3,
            extra=["--scores", str(scores), "--section", "mine"],
        )
        == 0
    )
    with scores.open(newline="") as f:
        lines = list(csv.DictReader(f))
    assert [(r["row"], r["index"]) for r in lines] == [
        (row, str(i)) for row in ("base (16x16, other seeds)", "tuning-free", "pixels") for i in range(3)
    ]
    for line in lines:
        size = "16x16" if line["row"].startswith("base") else "64x64"
        slug = "base-16x16-other-seeds" if line["row"].startswith("base") else line["row"]
        record = records(work, size, slug)[int(line["index"])]
        assert line["section"] == "mine" and line["size"] == size and line["prompt"] == record["prompt"]
        assert int(line["seed"]) == record["seed"] and int(line["composition"]) == int(record["match"])
        expected = f"{np.mean(record['fidelity']):.6f}" if record["fidelity"] else ""
        assert line["shape_fidelity"] == expected and line["detected"] == "; ".join(record["detected"])
    assert (
        "Per-sample scores (composition, shape fidelity, detections, time; 9 samples): [fair/s.csv](fair/s.csv)."
        in (out.read_text())
    )


def test_scores_to_a_path_that_cannot_be_written_is_one_line_before_sampling(sd_folder, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    bad = ["--scores", str(blocker / "s.csv")]
    assert run(sd_folder, tmp_path / "work", tmp_path / "b.md", "x: k=600", extra=bad) == 2
    err = capsys.readouterr().err
    assert "--scores" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "work").exists()
