"""`python -m sc_app.bench fair search|table` (issue 36): grids of equal breadth that extend past their edges, a rule
fixed before the search, paired statistics, per-image CSVs, resumable and sharded runs, on tiny models."""

import csv
import json
import math
from collections import Counter
from itertools import combinations

import numpy as np
import pytest
import scipy.stats
from PIL import Image

from sc_app import api, metrics
from sc_app.api import METHODS
from sc_app.bench import fair, main
from sc_app.bench.ablation import SKIPS_STAGE_DECODES
from sc_app.stats import GramFid, GramKid, mcnemar_exact, paired_bootstrap, resamples

# The embedded model's scales at 256x256: guidance 3, two re-noised stages with K 300 then 150, 4x per side.
EMBEDDED_16X = fair.Context(guidance=3.0, stages=2, later_ratio=0.5, side=4.0, adapters=("x.safetensors",), has_sr=True)


def grids_by_group(ctx=EMBEDDED_16X):
    return {g["group"]: g for g in fair.resolve_grids(ctx)}


def run(command, sd_folder, tmp_path, *extra, n=3, size="32x32"):
    args = ["fair", command, "--model", str(sd_folder), "--size", size, "--n", str(n), "--steps", "2"]
    args += ["--device", "cpu", "--settings", str(tmp_path / "chosen.json"), "--poll", "0.01", *extra]
    return main(args)


def thumbnails(images, device="cpu", batch_size=16):
    """A cheap stand-in for Inception features."""
    return np.stack(
        [np.asarray(Image.fromarray(np.asarray(im)).resize((4, 4)), np.float64).ravel() / 255 for im in images]
    )


def records(folder):
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


# ---- the grids -----------------------------------------------------------------------------------------------


def test_every_method_is_searched_on_a_grid_of_equal_breadth():
    grids = grids_by_group()
    assert {g["method"] for g in grids.values()} == set(METHODS)  # every method has its grid
    breadth = {group: g["breadth"] for group, g in grids.items()}
    one_knob = {"direct", "attn-sf", "lanczos"}  # guidance is all they have
    assert {group: b for group, b in breadth.items() if group in one_knob} == dict.fromkeys(one_knob, 3)
    assert {group: b for group, b in breadth.items() if group not in one_knob} == dict.fromkeys(
        set(grids) - one_knob, 9
    )
    for grid in grids.values():
        points = fair.grid_points(grid)
        assert len(points) == grid["breadth"] and len({json.dumps(p, sort_keys=True) for p in points}) == len(points)
        assert [k["key"] for k in grid["knobs"]][-1] == "guidance"  # each searches guidance with its own knobs
    # ScaleCrafter's three knobs in a Latin square: each value 3 times, each pair of two knobs' values once.
    sc = grids["scalecrafter"]
    points = fair.grid_points(sc)
    assert {"dilation": 4.0, "tau": 30, "guidance": 3.0} in points  # its centre: the centre of the grid
    for a, b in combinations([k["key"] for k in sc["knobs"]], 2):
        assert Counter((p[a], p[b]) for p in points) == Counter({pair: 1 for pair in {(p[a], p[b]) for p in points}})
        assert len({(p[a], p[b]) for p in points}) == 9
    # Scaled to the model and size: guidance about the model's own, dilation about the side ratio, K per stage.
    assert grids["direct"]["knobs"][0]["values"] == [2.0, 3.0, 5.0]
    assert sc["knobs"][0]["values"] == [3.0, 4.0, 5.0] and sc["knobs"][1]["values"] == [20, 30, 40]
    assert grids["freescale"]["knobs"][0]["values"] == [0.3, 0.5, 0.7]
    assert grids["demofusion"]["knobs"][0]["key"] == "cosine_scale_1"
    assert grids["sr"]["knobs"][0]["key"] == "noise_level"
    assert fair.option_value(grids["self-cascade"], "k", 300) == "300,150"
    assert grids["self-cascade-tuned"]["fixed"] == {"upsampler": "x.safetensors"}
    # Without an SR model or shipped adapters those methods are left out, not searched on less.
    bare = fair.Context(guidance=7.5, stages=1, later_ratio=1.0, side=2.0)
    assert set(grids_by_group(bare)) == set(grids) - {"sr", "self-cascade-tuned"}


def test_a_flow_models_k_grid_is_the_same_noise_levels_on_its_flow_line():
    """K 150 / 300 / 500 and the bounds 50..950 of Stable Diffusion's schedule, at equal signal-to-noise ratio on
    the flow line (families.flow_k); the guidance bounds stay absolute."""
    flow = grids_by_group(fair.Context(guidance=3.0, stages=2, later_ratio=0.69, side=4.0, flow=True))
    k, guidance = flow["self-cascade"]["knobs"]
    assert (k["values"], k["low"], k["high"]) == ([314, 455, 619], 185, 917)
    assert (guidance["low"], guidance["high"]) == (1.0, 30.0)
    unet = grids_by_group()["self-cascade"]["knobs"][0]
    assert (unet["values"], unet["low"], unet["high"]) == ([150, 300, 500], 50, 950)


def test_grid_candidates_are_settings_the_ablation_engine_takes():
    grids = [g for g in fair.resolve_grids(EMBEDDED_16X) if g["group"] != "self-cascade-tuned"]
    candidates = fair.grid_candidates(grids)
    assert len(candidates) == sum(g["breadth"] for g in grids) and len({c.label for c in candidates}) == len(candidates)
    by_label = {c.label: c for c in candidates}
    sc = by_label["self-cascade K=300,150 g=3"].setting
    assert sc.method == "self-cascade" and sc.generate_options() == {"k": [300, 150], "guidance_scale": 3.0}
    assert by_label["freescale restart=0.5 g=2"].setting.generate_options() == {
        "restart_fraction": 0.5,
        "guidance_scale": 2.0,
    }
    assert by_label["demofusion cs1=3 g=5"].setting.generate_options() == {"cosine_scale_1": 3.0, "guidance_scale": 5.0}
    assert by_label["sr noise=20 g=3"].setting.generate_options() == {"noise_level": 20, "guidance_scale": 3.0}
    assert dict(by_label["scalecrafter d=4 tau=30 g=3"].setting.options) == {
        "dilation": "4",
        "tau": "30",
        "guidance": "3",
    }
    assert [c.order for c in candidates] == list(range(len(candidates)))


def test_the_edges_extend_one_step_and_say_where_they_cannot():
    grids = grids_by_group()
    sc = grids["self-cascade"]
    tried = [fair.make_candidate(sc, p, i) for i, p in enumerate(fair.grid_points(sc))]

    def chosen(values):
        return next(c for c in tried if c.values == values)

    assert fair.extend(sc, tried, chosen({"k": 300, "guidance": 3.0}), 0) == ([], [])  # interior: nothing
    new, notes = fair.extend(sc, tried, chosen({"k": 500, "guidance": 5.0}), 0)  # a corner: both knobs
    assert new == [{"k": 700, "guidance": 5.0}, {"k": 500, "guidance": 7.0}]  # one step, the edge's own step
    assert [(n["knob"], n["edge"], n["from"], n["to"]) for n in notes] == [
        ("k", "high", 500, 700),
        ("guidance", "high", 5.0, 7.0),
    ]
    new, notes = fair.extend(sc, tried, chosen({"k": 150, "guidance": 2.0}), 0)
    assert new == [{"k": 50, "guidance": 2.0}, {"k": 150, "guidance": 1.0}]  # 150 - 150 clipped to K's bound 50
    # Extended once to 50, and chosen there again: 50 is K's bound, so the search says so and stops.
    tried.append(fair.make_candidate(sc, {"k": 50, "guidance": 2.0}, len(tried), 1))
    new, notes = fair.extend(sc, tried, tried[-1], 1)
    assert [n for n in notes if n["knob"] == "k"] == [
        {"group": "self-cascade", "knob": "k", "edge": "low", "from": 50, "to": None, "why": "at its bound (50)"}
    ]
    assert new == [{"k": 50, "guidance": 1.0}]
    # SR's noise level starts at its bound 0; after MAX_ROUNDS extensions a method stops where it is.
    sr = grids["sr"]
    tried = [fair.make_candidate(sr, p, i) for i, p in enumerate(fair.grid_points(sr))]
    new, notes = fair.extend(sr, tried, tried[1], 0)  # noise 0, guidance 3: interior in guidance
    assert new == [] and notes[0]["why"] == "at its bound (0)"
    grid = [fair.make_candidate(sc, p, i) for i, p in enumerate(fair.grid_points(sc))]
    new, notes = fair.extend(sc, grid, fair.make_candidate(sc, {"k": 500, "guidance": 3.0}, 0), fair.MAX_ROUNDS)
    assert new == [] and notes[0]["why"] == f"still at the edge after {fair.MAX_ROUNDS} extension rounds"


def scores(label, hits, fid=None, fidelity=(0.5,), order=0, n=10):
    match = np.array([True] * hits + [False] * (n - hits))
    values = np.full(n, float(np.mean(fidelity)))
    s = fair.Scores(label, list(range(n)), match, values, np.ones(n), np.ones(n), [""] * n, [""] * n, [0] * n)
    s.fid_r, s.order = fid, order
    return s


def test_the_rule_picks_the_expected_candidate_from_fixed_scores():
    rows = [
        scores("a", 8, fid=50.0, order=0),
        scores("b", 7, fid=40.0, order=1),  # within 1 prompt of the best, and the lowest FID_r: chosen
        scores("c", 6, fid=10.0, order=2),  # 2 prompts behind: out, however low its FID_r
    ]
    assert fair.choose(rows).label == "b"
    assert fair.choose(rows, use_fid=False).label == "a"  # without FID: the shape fidelity ties, then order
    tied = [scores("x", 5, fid=30.0, fidelity=(0.6,), order=0), scores("y", 5, fid=30.0, fidelity=(0.9,), order=1)]
    assert fair.choose(tied).label == "y"  # equal FID_r: the higher shape fidelity
    same = [scores("p", 5, fid=30.0, order=0), scores("q", 5, fid=30.0, order=1)]
    assert fair.choose(same).label == "p"  # a full tie: the earlier candidate
    assert fair.TIE_PROMPTS == 1 and "within 1 prompt" in fair.RULE and "FID_r" not in fair.RULE_NO_FID


# ---- the statistics ------------------------------------------------------------------------------------------


def test_mcnemar_exact_against_hand_computed_values():
    def pairs(b, c, both=3, neither=2):
        first = [True] * b + [False] * c + [True] * both + [False] * neither
        second = [False] * b + [True] * c + [True] * both + [False] * neither
        return first, second

    # 1 vs 6 discordant pairs: p = 2 P(X <= 1), X ~ Bin(7, 1/2) = 2 (1 + 7) / 128
    assert mcnemar_exact(*pairs(1, 6)) == (1, 6, pytest.approx(16 / 128))
    assert mcnemar_exact(*pairs(0, 5)) == (0, 5, pytest.approx(2 / 32))
    assert mcnemar_exact(*pairs(5, 5)) == (5, 5, 1.0)  # capped at 1
    assert mcnemar_exact(*pairs(0, 0)) == (0, 0, 1.0)  # no discordant pair: no evidence
    assert mcnemar_exact(*pairs(3, 12))[2] == pytest.approx(scipy.stats.binomtest(3, 15, 0.5).pvalue)
    with pytest.raises(ValueError):
        mcnemar_exact([True], [True, False])


def test_the_paired_bootstrap_against_hand_computed_values():
    a, b = np.array([1.0, 2.0, 3.0, 4.0]), np.array([0.5, 1.5, 2.0, 5.0])
    draws = resamples(4, 50, seed=3)
    by_hand = sorted(a[s].mean() - b[s].mean() for s in draws)
    diff, low, high = paired_bootstrap(a, b, draws=50, seed=3)
    assert diff == pytest.approx(0.25)  # 2.5 - 2.25
    assert (low, high) == pytest.approx(tuple(np.percentile(by_hand, [2.5, 97.5])))
    # A constant difference survives every resample: the interval is that difference, exactly.
    assert paired_bootstrap(a + 2.0, a, draws=200) == pytest.approx((2.0, 2.0, 2.0))
    assert draws.shape == (50, 4) and np.array_equal(draws, resamples(4, 50, seed=3))  # seeded: reproducible


def test_gram_fid_and_kid_equal_the_metrics_on_every_resample():
    rng = np.random.default_rng(0)
    own, real = rng.normal(size=(12, 20)), rng.normal(size=(12, 20)) * 1.3 + 0.2
    fid, kid = GramFid(own, real), GramKid(own, real)
    assert fid() == pytest.approx(metrics.fid(own, real), rel=1e-9)
    assert kid() == pytest.approx(metrics.kid(own, real), rel=1e-9)  # all rows: the whole-set unbiased MMD^2
    for s in resamples(12, 5, seed=1):
        assert fid(s) == pytest.approx(metrics.fid(own[s], real[s]), rel=1e-9)
    # A resample's KID leaves out pairs of one original row with itself: with no repeats, the plain estimate.
    distinct = np.array([0, 2, 4, 5, 7, 9])
    assert kid(distinct) == pytest.approx(metrics.kid(own[distinct], real[distinct]), rel=1e-9)


# ---- the search, end to end ----------------------------------------------------------------------------------


def test_search_plans_first_extends_past_an_edge_and_records_it(sd_folder, tmp_path, monkeypatch):
    work, out, settings = tmp_path / "dev", tmp_path / "docs" / "benchmarks.md", tmp_path / "chosen.json"
    flags = ["--methods", "direct,self-cascade", "--work", str(work), "--no-fid"]
    assert run("search", sd_folder, tmp_path, *flags, "--plan-only") == 0
    planned = json.loads(settings.read_text())
    assert planned["state"] == "planned" and planned["plan"]["rule"]["text"] == fair.RULE_NO_FID
    assert [g["group"] for g in planned["plan"]["grids"]] == ["direct", "self-cascade"] and not work.exists()
    assert planned["plan"]["development"]["provisional"] and planned["plan"]["development"]["seeds"] == [1000, 1002]
    assert "texts" in planned["plan"]["development"]

    # The rule as planned can be swapped here only to steer the choice to a corner of the grid: the first candidate.
    monkeypatch.setattr(fair, "choose", lambda rows, use_fid=True: min(rows, key=lambda s: s.order))
    assert run("search", sd_folder, tmp_path, *flags, "--out", str(out)) == 0
    data = json.loads(settings.read_text())
    assert data["state"] == "chosen" and data["planned_at"] == planned["planned_at"] and data["plan"] == planned["plan"]
    # Round 1: direct at g=5 (its lowest guidance) and the self-cascade at K=150, g=5 were each extended one step.
    first = data["rounds"][0]
    assert [(e["group"], e["values"]) for e in first["extensions"]] == [
        ("direct", {"guidance": 2.5}),
        ("self-cascade", {"k": 50, "guidance": 5.0}),
        ("self-cascade", {"k": 150, "guidance": 2.5}),
    ]
    assert data["rounds"][-1]["extensions"] == []
    extended = [c for c in data["candidates"] if c["round"] == 1]
    assert {c["label"] for c in extended} == {"direct g=2.5", "self-cascade K=50 g=5", "self-cascade K=150 g=2.5"}
    assert all(c["n"] == 3 for c in data["candidates"]) and len(data["candidates"]) == 3 + 9 + 3
    assert data["chosen"]["self-cascade"]["setting"] == "self-cascade K=150 g=5: guidance=5; k=150"
    assert data["chosen"]["self-cascade"]["resolved"]["k"] == [150]  # resolved at run time, written down
    text = out.read_text()
    assert "<!-- bench:fair-search-32x32 -->" in text and "k low 150 -> 50" in text and "sha256" in text
    assert (tmp_path / "docs" / "fair" / "fair-search-32x32.csv").is_file()
    # Another rule or grid for the same settings file is refused: the plan was fixed before the search.
    assert run("search", sd_folder, tmp_path, "--methods", "direct", "--work", str(work), "--no-fid") == 2


# ---- the test table, end to end ------------------------------------------------------------------------------


def chosen_file(tmp_path, sd_folder, **changes):
    """A settings file as the search writes it: direct and the self-cascade chosen on seeds 1000..1099."""
    from sc_app.bench.common import model_fingerprint
    from sc_app.models import load_model

    data = {
        "state": "chosen",
        "planned_at": "2026-12-07 00:00 UTC",
        "chosen_at": "2026-12-07 01:00 UTC",
        "plan": {
            "fingerprint": model_fingerprint(load_model(str(sd_folder), device="cpu")),
            "size": "32x32",
            "steps": 2,
            "development": {"prompts": "shapes.random_prompts(100, 1000)", "n": 100, "seeds": [1000, 1099]}
            | {"provisional": False, "texts": {"note": "texts overlap."}},
            "rule": {"text": fair.RULE},
        },
        "chosen": {
            "direct": {"setting": "direct g=5: method=direct; guidance=5"},
            "self-cascade": {"setting": "self-cascade K=600 g=7.5: k=600; guidance=7.5"},
            "lanczos": {"setting": "lanczos g=7.5: method=lanczos; guidance=7.5"},
        },
        "paper": {"self-cascade": {"setting": "self-cascade K=700 g=7.5 (paper's K): k=700; guidance=7.5"}},
    } | changes
    path = tmp_path / "chosen.json"
    path.write_text(json.dumps(data))
    return path


def test_table_with_paired_statistics_the_floor_and_the_csv(sd_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(metrics, "inception_features", thumbnails)
    settings = chosen_file(tmp_path, sd_folder)
    work, out = tmp_path / "test", tmp_path / "docs" / "benchmarks.md"
    assert run("table", sd_folder, tmp_path, "--seed", "0", "--n", "4", "--work", str(work), "--out", str(out)) == 0
    text = out.read_text()
    section = text.split("<!-- bench:fair-32x32 -->")[1]
    lines = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| row")]
    rows = {cells[0]: cells for cells in ([c.strip() for c in line.strip("|").split(" | ")] for line in lines)}
    assert list(rows) == [
        "real renders of other scenes (32x32): the FID floor",
        "base (16x16, other seeds), g=7.5",
        "direct g=5 (chosen)",
        "self-cascade K=600 g=7.5 (chosen)",
        "lanczos g=7.5 (chosen)",
        "self-cascade K=700 g=7.5 (paper's K)",
    ]
    column = {name: i for i, name in enumerate(fair.TABLE_HEADER)}
    reference = rows["self-cascade K=600 g=7.5 (chosen)"]
    assert reference[column["FID_r - reference [95%]"]] == "reference"
    paired = rows["lanczos g=7.5 (chosen)"]
    assert " / " in paired[column["vs reference: only row / only ref, McNemar p"]] and "p = " in paired[2]
    assert paired[column["FID_r - reference [95%]"]].count("[") == 1 and paired[column["KID_r [95%]"]].count("[") == 1
    assert rows["direct g=5 (chosen)"][column["time vs direct"]] == "1.00x"  # every row timed beside direct
    floor = rows["real renders of other scenes (32x32): the FID floor"]
    assert floor[column["composition [95%]"]].startswith("100.0%") and " [" in floor[column["FID_r [95%]"]]
    assert f"sha256 `{fair.sha256(settings)}`" in section  # which frozen choice made this table
    # The per-image CSV beside the table: every row's every prompt, with the records' own numbers.
    with open(tmp_path / "docs" / "fair" / "fair-32x32.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == fair.CSV_HEADER and len(table) == 6 * 4
    assert Counter(r["row"] for r in table) == Counter({label.replace(" (chosen)", ""): 4 for label in rows})
    folder = next(p for p in (work / "32x32").iterdir() if p.name.startswith("lanczos"))
    mine = [r for r in table if r["row"] == "lanczos g=7.5"]
    for record, line in zip(records(folder), mine):
        assert (int(line["prompt_index"]), line["prompt"], int(line["seed"])) == (
            record["index"],
            record["prompt"],
            record["seed"],
        )
        assert int(line["composition"]) == record["match"] and float(line["seconds"]) == pytest.approx(
            record["seconds"], abs=1e-3
        )
        assert float(line["shape_fidelity"]) == pytest.approx(np.mean(record["fidelity"]), abs=1e-4)
    # No intermediate decodes for any method, and every row names its resolved settings.
    assert "no intermediate decodes for any method" in section
    (line,) = [x for x in section.splitlines() if x.startswith("- self-cascade K=600 g=7.5: ")]
    assert all(f in line.split("resolved: ")[1] for f in ("steps=2", "guidance_scale=7.5", "k=[600]", "upsample="))


def test_table_refusals(sd_folder, tmp_path, capsys):
    args = ("--seed", "0", "--n", "2", "--work", str(tmp_path / "w"), "--no-fid")
    chosen_file(tmp_path, sd_folder, state="planned")
    assert run("table", sd_folder, tmp_path, *args) == 2
    assert "planned, not chosen yet" in capsys.readouterr().err
    path = chosen_file(tmp_path, sd_folder)
    data = json.loads(path.read_text())
    data["plan"]["development"]["provisional"] = True
    path.write_text(json.dumps(data))
    assert run("table", sd_folder, tmp_path, *args) == 2
    assert "--allow-provisional" in capsys.readouterr().err
    chosen_file(tmp_path, sd_folder)
    assert run("table", sd_folder, tmp_path, "--seed", "1050", "--n", "2", "--no-fid") == 2
    assert "development and test seeds must be disjoint" in capsys.readouterr().err
    # The work folder holds the samples of one frozen choice: another settings file is refused there.
    assert run("table", sd_folder, tmp_path, *args) == 0
    path.write_text(path.read_text().replace("guidance=5", "guidance=6"))
    assert run("table", sd_folder, tmp_path, *args) == 2
    assert "settings_sha256" in capsys.readouterr().err
    # A row whose samples resolve to other settings than the choice was made with (the model's defaults moved).
    data = json.loads(chosen_file(tmp_path, sd_folder).read_text())
    data["chosen"]["lanczos"]["resolved"] = {"steps": 2, "guidance_scale": 5.0}
    (tmp_path / "chosen.json").write_text(json.dumps(data))
    assert run("table", sd_folder, tmp_path, "--seed", "0", "--n", "2", "--work", str(tmp_path / "w2"), "--no-fid") == 2
    assert "the model's defaults changed since the search" in capsys.readouterr().err


def test_a_killed_run_resumes_without_redoing_samples(sd_folder, tmp_path, monkeypatch):
    chosen_file(tmp_path, sd_folder)
    work = tmp_path / "test"
    args = ("--seed", "0", "--n", "3", "--work", str(work), "--no-fid")
    real, calls = api.generate, []

    def dies_on_the_fifth(*a, **k):
        calls.append(a[4])
        if len(calls) == 5:
            raise KeyboardInterrupt  # the machine went away mid-run
        return real(*a, **k)

    monkeypatch.setattr(api, "generate", dies_on_the_fifth)
    with pytest.raises(KeyboardInterrupt):
        run("table", sd_folder, tmp_path, *args)
    made = {p: p.stat().st_mtime_ns for p in work.rglob("0*.png")}
    assert len(made) == 4  # four samples finished before it died
    calls.clear()
    monkeypatch.setattr(api, "generate", lambda *a, **k: (calls.append(a[4]), real(*a, **k))[1])
    assert run("table", sd_folder, tmp_path, *args) == 0
    assert len(calls) == 5 * 3 - 4  # 5 cells (base, 3 chosen, the paper's) x 3 prompts, less what was there
    assert all(p.stat().st_mtime_ns == t for p, t in made.items())  # nothing redone
    assert not list(work.rglob("*.tmp"))


def test_shards_cover_every_prompt_exactly_once(sd_folder, tmp_path, capsys):
    for count in (1, 2, 3):
        dealt = [i for k in range(count) for i in fair.Shard(k, count).prompts(7)]
        assert sorted(dealt) == list(range(7))  # each prompt once
    assert fair.parse_shard("2/2") == fair.Shard(1, 2)
    for bad in ("0/2", "3/2", "x"):
        with pytest.raises(fair.BadInput):
            fair.parse_shard(bad)

    chosen_file(tmp_path, sd_folder)
    work = tmp_path / "test"
    args = ("--seed", "0", "--n", "5", "--work", str(work), "--no-fid")
    assert run("table", sd_folder, tmp_path, *args, "--shard", "1/2") == 0
    assert run("table", sd_folder, tmp_path, *args, "--merge") == 2  # shard 2 has not run
    assert "samples are missing" in capsys.readouterr().err
    assert run("table", sd_folder, tmp_path, *args, "--shard", "2/2") == 0
    folders = [p for p in work.rglob("*") if p.is_dir() and list(p.glob("0*.json"))]
    assert len(folders) == 5
    for folder in folders:
        by = {r["index"]: r["shard"] for r in records(folder)}
        assert by == {0: "1/2", 1: "2/2", 2: "1/2", 3: "2/2", 4: "1/2"}  # all prompts, each by one shard
        assert all(r["resolved"] for r in records(folder))
    assert run("table", sd_folder, tmp_path, *args, "--merge", "--out", str(tmp_path / "b.md")) == 0
    runs = [json.loads(line) for line in (work / "runs.jsonl").read_text().splitlines()]
    assert [r["shard"] for r in runs if not r["merge"]] == ["1/2", "2/2"]
    text = (tmp_path / "b.md").read_text()
    assert "--shard 1/2" in text and "--shard 2/2" in text  # the commands that made the samples


def test_a_search_shard_waits_for_the_others_or_exits(sd_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fair, "choose", lambda rows, use_fid=True: next(s for s in rows if s.order == 1))  # interior
    work = tmp_path / "dev"
    flags = ("--methods", "lanczos", "--work", str(work), "--no-fid", "--no-wait")
    assert run("search", sd_folder, tmp_path, *flags, "--shard", "1/2") == 0
    assert "rerun to go on" in capsys.readouterr().err and not (work / "round-1.json").exists()
    assert run("search", sd_folder, tmp_path, *flags, "--merge") == 2  # shard 2's prompts are missing
    assert run("search", sd_folder, tmp_path, *flags, "--shard", "2/2") == 0
    assert "waiting for shard 1 to decide round 1" in capsys.readouterr().err  # shard 1 decides, once
    assert not (work / "round-1.json").exists()
    assert run("search", sd_folder, tmp_path, *flags, "--shard", "1/2") == 0  # resumed: samples nothing, decides
    assert json.loads((work / "round-1.json").read_text())["extensions"] == []
    assert "the search is complete" in capsys.readouterr().err
    assert run("search", sd_folder, tmp_path, *flags, "--shard", "2/2") == 0
    assert "the search is complete" in capsys.readouterr().err
    assert json.loads((tmp_path / "chosen.json").read_text())["state"] == "planned"  # shards write no outputs
    assert run("search", sd_folder, tmp_path, *flags, "--merge") == 0
    data = json.loads((tmp_path / "chosen.json").read_text())
    assert data["state"] == "chosen" and data["chosen"]["lanczos"]["label"] == "lanczos g=7.5"
    shards = {r["shard"] for folder in (work / "32x32").iterdir() for r in records(folder)}
    assert shards == {"1/2", "2/2"}
    # A rerun of the merge on the same samples keeps the file as it was: a test table's sha256 stays valid.
    digest = fair.sha256(tmp_path / "chosen.json")
    assert (
        run("search", sd_folder, tmp_path, *flags, "--merge") == 0 and fair.sha256(tmp_path / "chosen.json") == digest
    )


def test_intermediate_stages_are_left_undecoded_alike(sd_model):
    import torch

    assert set(SKIPS_STAGE_DECODES) == {"self-cascade", "demofusion", "freescale"}
    for method in SKIPS_STAGE_DECODES:
        result = api.generate(
            sd_model,
            ["p"],
            64,
            64,
            method,
            generator=[torch.Generator().manual_seed(0)],
            num_inference_steps=2,
            decode_stages=False,
        )
        assert len(result.stages) > 1 and all(not s.images for s in result.stages[:-1]), method
        assert result.images and not math.isnan(np.asarray(result.images[0], float).mean())
