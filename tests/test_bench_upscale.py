"""`python -m sc_app.bench upscale`: every method that takes an image upscales real renders, scored against the
true render; settings chosen on development scenes by a fixed rule, the test run at them; resumable, sharded."""

from __future__ import annotations

import argparse
import csv
import json
import math

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from sc_app.bench import upscale
from sc_app.cli import BadInput
from sc_app.shapes import render, scene_from_seed
from tiny_models import make_upscaler

SIZE = (256, 256)
SMALL = (64, 64)


# ---- the scores on constructed cases -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def scene():
    return scene_from_seed(3)


@pytest.fixture(scope="module")
def truth(scene):
    return Image.fromarray(render(scene, *SIZE))


@pytest.fixture(scope="module")
def small(scene):
    return Image.fromarray(render(scene, *SMALL))


def scores(output, truth, small, scene):
    return upscale.score_image(output, truth, small, scene.prompt, upscale.band_radius(SIZE, SMALL))


def blurred(image: Image.Image, sigma: float) -> Image.Image:
    array = np.asarray(image).astype(float)
    return Image.fromarray(np.round(ndimage.gaussian_filter(array, (sigma, sigma, 0))).astype(np.uint8))


def test_the_truth_scores_perfect(truth, small, scene):
    s = scores(truth, truth, small, scene)
    assert s["edge_sharpness"] == 1.0 and s["edge_error"] == 0.0 and s["psnr"] == math.inf
    assert s["composition"] is True and s["shape_fidelity"] > 0.95
    assert s["layout_error"] < 2.0  # the floor: the 64x64 render is not exactly the 256x256 one averaged down


def test_a_blurred_truth_has_softer_edges_and_a_larger_edge_error(truth, small, scene):
    sharp, soft, softer = (scores(blurred(truth, s), truth, small, scene) for s in (0.0, 1.5, 3.0))
    assert 1.0 == sharp["edge_sharpness"] > soft["edge_sharpness"] > softer["edge_sharpness"]
    assert soft["edge_sharpness"] < 0.8
    assert 0.0 == sharp["edge_error"] < soft["edge_error"] < softer["edge_error"]
    assert soft["psnr"] < math.inf and soft["layout_error"] < 3.0  # the layout is kept


def test_a_resize_blurs_edges(truth, small, scene):
    """Lanczos from 64 to 256 spreads every edge over about four pixels: the reference a good upscaler beats."""
    resized = scores(small.resize(SIZE[::-1], Image.LANCZOS), truth, small, scene)
    assert resized["edge_sharpness"] < 0.6 and resized["edge_error"] > 5.0 and resized["layout_error"] < 3.0


def test_a_shifted_image_has_a_larger_layout_error(truth, small, scene):
    base = scores(truth, truth, small, scene)["layout_error"]
    shifted = [
        scores(Image.fromarray(np.roll(np.asarray(truth), d, axis=1)), truth, small, scene)["layout_error"]
        for d in (4, 8, 16)
    ]
    assert base < shifted[0] < shifted[1] < shifted[2]
    assert shifted[0] > 2 * base


def test_edge_sharpness_forgives_a_one_pixel_shift_only(truth):
    one = np.roll(np.asarray(truth), 1, axis=1)
    assert upscale.edge_sharpness(Image.fromarray(one), truth) > 0.95


def test_an_empty_canvas_has_no_objects(truth, small, scene):
    grey = Image.new("RGB", truth.size, (222, 222, 222))
    s = scores(grey, truth, small, scene)
    assert s["composition"] is False and math.isnan(s["shape_fidelity"]) and s["edge_sharpness"] < 0.05


# ---- the rule and the statistics --------------------------------------------------------------------------


def test_the_rule_takes_the_lowest_edge_error_then_the_lower_layout_error():
    candidates = [(50, 3.0, 1.0), (100, 2.5, 2.0), (200, 2.5, 1.5), (300, 4.0, 0.1)]
    assert upscale.choose(candidates) == 200  # a tie on edge error: the lower layout error
    assert upscale.choose([(50, 3.0, 9.0), (100, 1.0, 50.0)]) == 100  # edge error first, whatever the layout
    assert upscale.choose([(50, 2.0, 1.0), (100, 2.0 + 1e-9, 1.0)]) == 50  # a full tie: the earlier grid value
    with pytest.raises(ValueError):
        upscale.choose([])


def test_wilcoxon_p():
    rng = np.random.default_rng(0)
    a = rng.normal(size=30)
    assert upscale.wilcoxon_p(a, a) == 1.0
    assert upscale.wilcoxon_p(a + 1.0, a) < 0.001
    assert upscale.wilcoxon_p(a, np.where(np.arange(30) < 3, np.nan, a + 1.0)) < 0.001  # NaN pairs left out


def test_every_grid_is_six_values_around_the_defaults():
    for row in upscale.ROWS:
        assert (row.knob is None) == (row.name in ("lanczos", "vae-truth", "vae-lanczos"))
        if row.knob:
            assert len(row.grid) == 6 and len(set(row.grid)) == 6
    assert {300, 100} < set(upscale.KS) and {0.7, 0.3} < set(upscale.RESTART_FRACTIONS)
    assert {0.5, 3.0} < set(upscale.COSINE_SCALES) and 20 in upscale.NOISE_LEVELS
    # the same re-noise depths for FreeScale as for K
    assert sorted(round(1000 * (1 - f)) for f in upscale.RESTART_FRACTIONS) == sorted(upscale.KS)


def test_grids_do_not_stop_at_their_edges():
    k = next(r for r in upscale.ROWS if r.name == "self-cascade")
    assert upscale.extension(k, (), 300) == (None, None)  # inside: nothing to extend
    assert upscale.extension(k, (), 50) == (25, None)
    assert upscale.extension(k, (25,), 25) == (10, None)
    assert upscale.extension(k, (25,), 50) == (None, None)  # no longer at the end
    value, note = upscale.extension(k, (25, 10), 10)
    assert value is None and "k=10 at the low end" in note and "every value past the grid tried (25, 10)" in note
    assert upscale.extension(k, (), 700) == (850, None)
    assert upscale.tried_values(k, (850, 25, 10)) == [10, 25, 50, 100, 200, 300, 500, 700, 850]
    sr = next(r for r in upscale.ROWS if r.name == "sr")
    value, note = upscale.extension(sr, (), 0)
    assert value is None and "noise_level=0 at the low end" in note and "the knob's bound" in note
    assert upscale.extension(sr, (), 200, top=350) == (300, None)
    value, note = upscale.extension(sr, (), 200, top=250)
    assert value is None and "exceed this model's top 250" in note  # past the SR model's own top
    assert upscale.extension(next(r for r in upscale.ROWS if r.name == "lanczos"), (), None) == (None, None)


@pytest.mark.parametrize("text, expected", [(None, (0, 1)), ("1/2", (0, 2)), ("2/2", (1, 2)), (" 3 / 3 ", (2, 3))])
def test_parse_shard(text, expected):
    assert upscale.parse_shard(text) == expected  # 0-based inside, 1-based on the command line as `bench fair`'s


@pytest.mark.parametrize("text", ["0/2", "3/2", "1", "a/b", "0/0", "-1/2"])
def test_parse_shard_refuses(text):
    with pytest.raises(BadInput, match="--shard"):
        upscale.parse_shard(text)


# ---- the bench on a tiny model ----------------------------------------------------------------------------


def run(argv: list[str]) -> None:
    """As `python -m sc_app.bench upscale ...` runs it (the subcommand on its own parser)."""
    parser = argparse.ArgumentParser()
    upscale.add_parser(parser.add_subparsers(dest="command"))
    upscale.run_upscale(parser.parse_args(argv), argv)


@pytest.fixture(scope="module")
def files(sd_folder, tmp_path_factory):
    from sc_app.models import load_model
    from sc_app.upsampler import Adapter, save_adapter

    root = tmp_path_factory.mktemp("upscale")
    model = load_model(str(sd_folder), device="cpu")
    adapter = save_adapter(Adapter(model.unet.config, base_model=model.name), root / "x2.safetensors")
    return {"root": root, "sr": make_upscaler(root / "sr", sd_folder), "adapter": adapter}


def argv(sd_folder, files, work, *extra) -> list[str]:
    root = files["root"]
    return [
        "upscale",
        "--model",
        str(sd_folder),
        "--size",
        "64x64",
        "--n",
        "2",
        "--steps",
        "2",
        "--device",
        "cpu",
        "--work",
        str(work),
        "--fair",
        str(root / "fair"),
        "--out",
        str(root / "benchmarks.md"),
        "--upsampler",
        str(files["adapter"]),
        "--sr-model",
        str(files["sr"]),
        *extra,
    ]


def section(path, name: str) -> str:
    text = path.read_text()
    begin, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    assert text.count(begin) == 1 and text.count(end) == 1
    return text.split(begin)[1].split(end)[0]


def table_rows(text: str, first: str) -> list[list[str]]:
    """The body rows of the markdown table whose header starts with `first`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first}"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split(" | ")])
    return rows


@pytest.fixture(scope="module")
def dev(sd_folder, files):
    """The development search, once for the module."""
    run(argv(sd_folder, files, files["root"] / "work", "--dev"))
    return files["root"]


LABELS = [row.label for row in upscale.ROWS]


def test_the_search_tries_every_grid_value_and_writes_the_dated_choice(dev):
    text = section(dev / "benchmarks.md", "upscale-search-64x64")
    rows = table_rows(text, "method")
    assert upscale.RULE in text
    data = json.loads((dev / "fair" / "upscale-64x64-chosen.json").read_text())
    assert data["date"] and data["seeds"] == [1000, 1001] and data["steps"] == 2 and data["rule"] == upscale.RULE
    assert set(data["chosen"]) == set(data["grids"]) == {row.name for row in upscale.ROWS if row.knob}
    tried = {name: grid["tried"] for name, grid in data["grids"].items()}
    fixed = [row for row in upscale.ROWS if row.knob is None]  # Lanczos and the VAE references
    assert len(rows) == 1 + len(fixed) + sum(map(len, tried.values()))  # the truth, those, every value tried
    assert all(set(row.grid) <= set(tried[row.name]) for row in upscale.ROWS if row.knob)
    for e in data["extensions"]:
        assert e["to"] in tried[e["row"]] and e["to"] not in next(r for r in upscale.ROWS if r.name == e["row"]).grid
    for name, entry in data["chosen"].items():
        row = next(r for r in upscale.ROWS if r.name == name)
        assert entry["value"] in tried[name] and entry["knob"] == row.knob
        mine = {c["value"]: c for c in data["candidates"] if c["row"] == name}
        assert list(mine) == tried[name]  # every value tried, in grid order
        expected = upscale.choose([(v, c["edge_error"], c["layout_error"]) for v, c in mine.items()])
        assert entry["value"] == expected  # the rule, applied to the recorded development means
        if entry["value"] in (tried[name][0], tried[name][-1]):  # at an end only where nothing is past it
            assert any(note.startswith(row.label) for note in data["notes"])
        marked = [r for r in rows if r[0] == row.label and "(chosen)" in r[1]]
        assert len(marked) == 1 and marked[0][1].startswith(f"{row.knob}={entry['value']:g}")
    with open(dev / "fair" / "upscale-64x64-dev.csv") as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == 2 * len(rows) and {line["split"] for line in lines} == {"dev"}
    assert {line["seed"] for line in lines} == {"1000", "1001"}


def test_the_test_table_has_every_method_and_every_score(dev, sd_folder, files, monkeypatch):
    work = files["root"] / "work"
    run(argv(sd_folder, files, work))
    text = section(dev / "benchmarks.md", "upscale-64x64")
    chosen = dev / "fair" / "upscale-64x64-chosen.json"
    assert upscale._sha256(chosen) in text and str(chosen) in text
    assert "the scene's own prompt" in text
    main = table_rows(text, "method (how")
    fixed = [row.label + upscale.COLOR_FIX_SUFFIX for row in upscale.ROWS if row.name not in upscale.NO_COLOR_FIX]
    assert "SD+SR (x4 upscaler), colours kept" in fixed and len(fixed) == len(LABELS) - 3
    assert [r[0] for r in main] == ["ground truth (the real render)"] + LABELS + fixed
    layout = {r[0]: float(r[2].split()[0]) for r in main}
    for label in fixed:  # the input's colours kept: closer to it at its own size than the method alone
        assert layout[label] < layout[label.removesuffix(upscale.COLOR_FIX_SUFFIX)]
    header = next(line for line in text.splitlines() if line.startswith("| method (how"))
    for name in ("layout error", "edge sharpness", "edge error", "PSNR", "shape fidelity", "composition", "s / image"):
        assert name in header
    data = json.loads(chosen.read_text())
    for r in main[1:]:
        assert len(r) == len(upscale.HEADER) and r[-1] == "2"
        assert all(cell not in ("", "nan") for cell in r)
        row = next(x for x in upscale.ROWS if x.label == r[0].removesuffix(upscale.COLOR_FIX_SUFFIX))
        assert r[1] == ("-" if row.knob is None else f"{row.knob}={data['chosen'][row.name]['value']:g}")
    paired = table_rows(text, "method |")
    assert [r[0] for r in paired] == [label for label in LABELS if label != "Lanczos (just resizing)"] + fixed
    assert all("p=" in cell for r in paired for cell in r[1:])
    with open(dev / "fair" / "upscale-64x64.csv") as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == 2 * (1 + len(upscale.ROWS) + len(fixed)) and {line["seed"] for line in lines} == {"0", "1"}
    assert sum(line["row"].endswith("+color-fix") for line in lines) == 2 * len(fixed)
    assert set(upscale.CSV_COLUMNS) <= set(lines[0])
    truth = [line for line in lines if line["row"] == "truth"]
    assert all(line["psnr"] == "inf" and line["edge_error"] == "0" for line in truth)

    # resumed: nothing is sampled again, and the section comes out the same
    def refuse(*args, **kwargs):
        raise AssertionError("resampled")

    before = table_rows(text, "method (how")
    monkeypatch.setattr(upscale, "generate", refuse)
    run(argv(sd_folder, files, work))
    again = table_rows(section(dev / "benchmarks.md", "upscale-64x64"), "method (how")
    assert again == before  # the scores, their seeded intervals and the recorded times
    run(argv(sd_folder, files, work, "--dev"))  # the search resumes as well


def seeds_generated(monkeypatch) -> list[int]:
    """The seed of every `generate` call the bench makes from now on (the list fills as it runs)."""
    made = []
    real = upscale.generate

    def counting(*args, **kwargs):
        made.append(kwargs["generator"].initial_seed())
        return real(*args, **kwargs)

    monkeypatch.setattr(upscale, "generate", counting)
    return made


def test_shards_split_the_scenes_and_the_last_one_writes_the_section(dev, sd_folder, files, monkeypatch):
    work, out = files["root"] / "work-sharded", files["root"] / "sharded.md"
    made = seeds_generated(monkeypatch)
    run(argv(sd_folder, files, work, "--shard", "2/2", "--out", str(out)))
    sampled = len([row for row in upscale.ROWS if not row.reference])  # the references call no generate
    assert set(made) == {1} and len(made) == sampled and not out.exists()  # scene 1 only; scene 0 is shard 1's
    run(argv(sd_folder, files, work, "--shard", "1/2", "--out", str(out)))
    assert sorted(set(made)) == [0, 1] and len(made) == 2 * sampled
    labels = [r[0] for r in table_rows(section(out, "upscale-64x64"), "method (how")][1:]
    assert labels[: len(LABELS)] == LABELS and all(x.endswith(upscale.COLOR_FIX_SUFFIX) for x in labels[len(LABELS) :])
    assert len(list((work / "64x64").glob("*/0000.png"))) == len(upscale.ROWS)


def test_search_shards_wait_for_each_other_and_decide_alike(dev, sd_folder, files, monkeypatch):
    """Shard 1 waits where shard 2's samples are missing (here: while waiting, shard 2 runs with --no-wait); both
    replay the same extensions from the same samples, and the choice is the unsharded search's."""
    work, fair, out = files["root"] / "work-dev-sharded", files["root"] / "fair-sharded", files["root"] / "s.md"
    waits = []

    where = ("--fair", str(fair), "--out", str(out))

    def other_shard(seconds):
        waits.append(seconds)
        run(argv(sd_folder, files, work, "--dev", "--shard", "2/2", "--no-wait", *where))

    monkeypatch.setattr(upscale, "_wait", other_shard)
    run(argv(sd_folder, files, work, "--dev", "--shard", "1/2", "--poll", "0.5", *where))
    assert waits and set(waits) == {0.5}
    mine, theirs = (json.loads((f / "upscale-64x64-chosen.json").read_text()) for f in (fair, dev / "fair"))
    assert mine["chosen"] == theirs["chosen"] and mine["extensions"] == theirs["extensions"]
    untimed = [[{k: v for k, v in c.items() if k != "seconds"} for c in d["candidates"]] for d in (mine, theirs)]
    assert untimed[0] == untimed[1]  # the same samples (seeded), scored alike
    assert "upscale-search-64x64" in out.read_text()


def test_the_test_run_needs_the_choice_made_for_it(dev, sd_folder, files, tmp_path):
    fair = tmp_path / "fair"
    with pytest.raises(BadInput, match="run the development search first"):
        run(argv(sd_folder, files, tmp_path / "w", "--fair", str(fair)))
    fair.mkdir()
    data = json.loads((dev / "fair" / "upscale-64x64-chosen.json").read_text())
    for change, message in [({"steps": 25}, "chosen with steps 25"), ({"seeds": [0, 47]}, "overlap")]:
        (fair / "upscale-64x64-chosen.json").write_text(json.dumps(data | change))
        with pytest.raises(BadInput, match=message):
            run(argv(sd_folder, files, tmp_path / "w", "--fair", str(fair)))
    (fair / "upscale-64x64-chosen.json").write_text("{}")
    with pytest.raises(BadInput, match="not a choice"):
        run(argv(sd_folder, files, tmp_path / "w", "--fair", str(fair)))


def test_a_work_folder_of_other_settings_is_refused(dev, sd_folder, files):
    with pytest.raises(BadInput, match="other settings"):
        run(argv(sd_folder, files, files["root"] / "work", "--dev", "--guidance", "3"))


def test_a_row_whose_samples_ran_with_different_settings_is_refused(dev, sd_folder, files, tmp_path):
    """A resumed search whose defaults changed between its runs would score two settings as one row."""
    import shutil

    work = tmp_path / "work"
    shutil.copytree(files["root"] / "work", work)
    (row,) = [p for p in (work / "64x64").iterdir() if p.name.startswith("freescale-restart-fraction-0.7-")]
    older = row / "1001.json"
    record = json.loads(older.read_text())
    record["resolved"]["scheduler"] = "euler"  # as if the default sampler had changed between the two scenes
    older.write_text(json.dumps(record))
    with pytest.raises(BadInput, match="^row 'FreeScale.*different settings \\(scheduler: 'ddim' and 'euler'\\)"):
        run(argv(sd_folder, files, work, "--dev", "--fair", str(tmp_path / "fair"), "--out", str(tmp_path / "b.md")))
    assert not (tmp_path / "fair").exists() and not (tmp_path / "b.md").exists()


def test_registered_with_the_bench_command():
    from sc_app.bench import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert "upscale" in commands
    args = parser.parse_args(["upscale", "--size", "256x256", "--dev", "--shard", "1/2"])
    assert args.command == "upscale" and args.dev and args.shard == "1/2"


# ---- carried between sessions: the records without the images ---------------------------------------------


def test_a_carried_run_goes_on_in_a_fresh_work_folder_without_sampling_again(dev, sd_folder, files, monkeypatch):
    carry = files["root"] / "carry.jsonl"
    first = files["root"] / "work-carried-1"
    run(argv(sd_folder, files, first, "--carry", str(carry)))
    before = table_rows(section(dev / "benchmarks.md", "upscale-64x64"), "method (how")
    first_settings = section(dev / "benchmarks.md", "upscale-64x64").split("Settings each row ran with")[1]
    assert "steps=" in first_settings
    lines = carry.read_text().splitlines()
    records = [json.loads(line)["path"] for line in lines]
    assert "settings.json" in records and not any(path.endswith(".png") for path in records)
    samples = [p for p in records if p.endswith(("0000.json", "0001.json"))]
    assert len(samples) == 2 * len(upscale.ROWS)  # every row's two scenes
    fixed = [p for p in records if p.endswith(".color-fix.scores.json")]
    assert len(fixed) == 2 * len([r for r in upscale.ROWS if r.name not in upscale.NO_COLOR_FIX])

    made = seeds_generated(monkeypatch)
    second = files["root"] / "work-carried-2"  # a fresh checkout: no images, no records
    run(argv(sd_folder, files, second, "--carry", str(carry)))
    assert made == [] and not list(second.rglob("*.png"))
    assert table_rows(section(dev / "benchmarks.md", "upscale-64x64"), "method (how") == before
    settings = section(dev / "benchmarks.md", "upscale-64x64").split("Settings each row ran with")[1]
    assert settings == first_settings  # every row's resolved settings too, though the carry sorted their keys

    # a record whose scores are of another definition comes back as missing: that sample alone is made again
    stale = [json.loads(line) for line in lines]
    victim = next(e for e in stale if e["path"].endswith("0001.scores.json") and "tuned" in e["path"])
    victim["data"]["version"] = upscale.SCORE_VERSION - 1
    carry.write_text("".join(json.dumps(e) + "\n" for e in stale))
    third = files["root"] / "work-carried-3"
    run(argv(sd_folder, files, third, "--carry", str(carry)))
    assert made == [1]
    again = table_rows(section(dev / "benchmarks.md", "upscale-64x64"), "method (how")
    assert [r[:-2] for r in again] == [r[:-2] for r in before]  # the same image again; its time is its own


def test_a_carry_file_that_is_not_one_is_refused_in_one_line(dev, sd_folder, files, tmp_path, capsys):
    from sc_app.bench import main

    bad = tmp_path / "bad.jsonl"
    for text, says in [("not json\n", "line 1"), ('{"path": "../../x.json", "data": {}}\n', "inside the folder")]:
        bad.write_text(text)
        code = main(argv(sd_folder, files, tmp_path / "w", "--carry", str(bad)))
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and says in err
        assert not (tmp_path / "w").exists() and not (tmp_path.parent / "x.json").exists()


def test_pack_and_unpack_keep_every_json_file_and_never_replace_one(tmp_path):
    from sc_app.bench.carry import pack, unpack

    work, carry = tmp_path / "work", tmp_path / "c.jsonl"
    (work / "64x64" / "row").mkdir(parents=True)
    (work / "settings.json").write_text('{"steps": 2}')
    (work / "64x64" / "row" / "0000.json").write_text('{"seconds": 1.5, "psnr": Infinity}')
    (work / "64x64" / "row" / "0000.png").write_bytes(b"not carried")
    assert pack(work, carry) == 2
    other = tmp_path / "other"
    (other / "64x64" / "row").mkdir(parents=True)
    (other / "settings.json").write_text('{"steps": 3}')  # there already: kept as it is
    assert unpack(carry, other) == 1
    assert json.loads((other / "settings.json").read_text()) == {"steps": 3}
    assert json.loads((other / "64x64" / "row" / "0000.json").read_text()) == {"seconds": 1.5, "psnr": math.inf}
    assert not (other / "64x64" / "row" / "0000.png").exists()
    assert unpack(tmp_path / "missing.jsonl", other) == 0


def test_a_setting_that_is_a_path_in_the_working_folder_is_printed_relative_to_it(tmp_path, monkeypatch):
    from sc_app.bench.ablation import setting_value_text

    monkeypatch.chdir(tmp_path)
    assert setting_value_text(str(tmp_path / "assets" / "shapes-sr")) == "assets/shapes-sr"
    assert setting_value_text("/elsewhere/sr") == "/elsewhere/sr"
    assert setting_value_text([1, 2]) == "[1, 2]" and setting_value_text(0.5) == "0.5"
