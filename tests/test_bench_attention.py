"""`python -m sc_app.bench attention`: each attention mode at each stage size, time per step and quality in one
table, on the tiny SD model (base 16 px)."""

import json

import pytest

from sc_app.bench import main
from sc_app.bench.attention import Mode, parse_modes, step_settings
from sc_app.cli import BadInput


def run(sd_folder, work, out, *extra, sizes="32x32,128x128", modes="full,downsample-kv:4,auto"):
    return main(
        [
            "attention",
            "--model",
            str(sd_folder),
            "--sizes",
            sizes,
            "--n",
            "2",
            "--modes",
            modes,
            "--steps",
            "2",
            "--repeats",
            "1",
            "--batch-size",
            "2",
            "--device",
            "cpu",
            "--no-fid",
            "--work",
            str(work),
            "--out",
            str(out),
            *extra,
        ]
    )


def rows(text: str) -> list[list[str]]:
    lines = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| stage size")]
    return [[c.strip() for c in line.strip("|").split(" | ")] for line in lines]


def sample_records(work) -> list:
    return sorted(p for p in work.rglob("*.json") if p.name[0].isdigit())


def test_one_row_per_stage_size_and_mode_with_what_auto_ran_there(sd_folder, tmp_path):
    out = tmp_path / "bench.md"
    assert run(sd_folder, tmp_path / "work", out) == 0
    text = out.read_text()
    table = rows(text)
    assert [(r[0], r[1]) for r in table] == [
        ("32x32 (4x)", "full"),
        ("32x32 (4x)", "downsample-kv 4x4"),
        ("32x32 (4x)", "auto (downsample-kv x2)"),  # below 64x the base size's pixels: 2x2
        ("128x128 (64x)", "full"),
        ("128x128 (64x)", "downsample-kv 4x4"),
        ("128x128 (64x)", "auto (downsample-kv x4)"),  # from 64x: 4x4
    ]
    for row in table:
        assert float(row[2]) > 0  # seconds per step, measured
        assert row[3].endswith("x") and row[4].endswith("]") and row[-1] == "2"
    assert {r[3] for r in table if r[1] == "full"} == {"1.00x"}
    assert "`auto` rule" in text and "Command: `python -m sc_app.bench attention" in text
    # every row's samples name the attention they ran with, stage by stage
    assert (
        'attention=auto, k=[700, 700, 700], upsample=bilinear, stage_attention=["full", "downsample-kv x2", '
        '"downsample-kv x2", "downsample-kv x4"]' in text
    )
    assert text.count("attention=downsample-kv, attention_factor=4") == 2


def test_a_rerun_samples_nothing_again(sd_folder, tmp_path):
    work = tmp_path / "work"
    assert run(sd_folder, work, tmp_path / "a.md", sizes="32x32", modes="full,window") == 0
    records = sample_records(work)
    stamps = [p.stat().st_mtime_ns for p in records]
    assert records and all(json.loads(p.read_text())["resolved"] for p in records if "direct" not in str(p))
    assert run(sd_folder, work, tmp_path / "b.md", sizes="32x32", modes="full,window") == 0
    assert [p.stat().st_mtime_ns for p in sample_records(work)] == stamps
    assert rows((tmp_path / "a.md").read_text())[0][4:] == rows((tmp_path / "b.md").read_text())[0][4:]


def test_the_step_timing_applies_each_mode_as_a_run_applies_it(sd_model):
    modes = [Mode("full"), Mode("window"), Mode("downsample-kv", 4), Mode("auto")]
    settings, ran = step_settings(sd_model, modes, (128, 128))
    assert settings["full"] == {"mode": "full"}
    assert settings["downsample-kv 4x4"]["factor"] == 4
    assert settings["auto"]["factor"] == 4 and ran["auto"] == "downsample-kv x4"
    assert settings["window"]["mode"] == "window" and ran["window"] == "window 8x8"  # the base latent
    # only the layers larger than at the base size change: the base size's grid keeps full attention
    assert all(s["min_tokens"] > 0 for name, s in settings.items() if name != "full")
    small, ran = step_settings(sd_model, modes, (16, 16))  # the base size itself: nothing changes
    assert set(ran.values()) == {"full"}


@pytest.mark.parametrize(
    "text",
    ["", "full,full", "fast", "window:4", "downsample-kv:1", "downsample-kv:x"],
)
def test_bad_modes_are_refused(text):
    with pytest.raises(BadInput):
        parse_modes(text)


@pytest.mark.parametrize(
    "flags, says",
    [
        (["--modes", "full,fast"], "--modes"),
        (["--n", "2,2,2"], "--n"),
        (["--repeats", "0"], "--repeats"),
        (["--sizes", "30x30"], "30"),
    ],
)
def test_bad_flags_are_one_line_before_any_sample(sd_folder, tmp_path, capsys, flags, says):
    code = main(
        ["attention", "--model", str(sd_folder), "--sizes", "32x32", "--n", "2", "--work", str(tmp_path / "w")] + flags
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and says in err
    assert not (tmp_path / "w").exists() or not sample_records(tmp_path / "w")
