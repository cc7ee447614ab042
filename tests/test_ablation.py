"""`python -m sc_app.bench ablation`: settings side by side on development prompts, resumable."""

import json

from sc_app.bench import main
from sc_app.bench.ablation import parse_setting


def run(sd_folder, work, out, *settings, n=2):
    args = [
        "ablation",
        "--model",
        str(sd_folder),
        "--size",
        "64x64",
        "--n",
        str(n),
        "--direct-n",
        "1",
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--no-fid",
        "--device",
        "cpu",
        "--work",
        str(work),
        "--out",
        str(out),
    ]
    for setting in settings:
        args += ["--setting", setting]
    return main(args)


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
    rows = [line for line in text.splitlines() if line.startswith("| ") and "setting" not in line]
    assert [r.split(" | ")[0].strip("| ") for r in rows] == ["tuning-free", "lower last stage", "pixels"]
    assert all("% [" in r for r in rows)  # every composition with its interval
    folders = {p.name: p for p in (work / "64x64").iterdir()}
    assert len(folders) == 4  # direct (the time reference) and the three settings, each in its own folder
    direct = next(p for name, p in folders.items() if name.startswith("direct"))
    assert len(list(direct.glob("*.json"))) == 1  # --direct-n 1
    record = json.loads(next(p for n, p in folders.items() if n.startswith("pixels")).joinpath("0001.json").read_text())
    assert {"match", "fidelity", "seconds", "prompt", "seed"} <= set(record)
    stamps = {p: p.stat().st_mtime_ns for p in work.rglob("*.png")}
    assert (
        run(
            sd_folder, work, out, "tuning-free: k=600", "lower last stage: k=600,300", "pixels: k=600; upsample=lanczos"
        )
        == 0
    )
    assert {p: p.stat().st_mtime_ns for p in work.rglob("*.png")} == stamps  # resumed: nothing sampled again


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
