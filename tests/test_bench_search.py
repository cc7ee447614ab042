"""`python -m sc_app.bench search`: every method searched alike on development prompts, the choice in a JSON
that `bench ablation --chosen` turns into test-table rows, never on the same seeds."""

import json
from types import SimpleNamespace

import numpy as np
import pytest

from sc_app.baselines import upscale
from sc_app.bench import main, search
from sc_app.bench.ablation import Measured, Setting, parse_setting
from sc_app.cli import BadInput


def engine_args(command, sd_folder, work, *, seed, extra=()):
    return [
        command,
        "--model",
        str(sd_folder),
        "--size",
        "32x32",
        "--n",
        "2",
        "--direct-n",
        "1",
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--no-fid",
        "--device",
        "cpu",
        "--seed",
        str(seed),
        "--work",
        str(work),
        *extra,
    ]


def table_labels(text: str) -> list[str]:
    lines = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| setting")]
    return [line.strip("|").split(" | ")[0].strip() for line in lines]


def test_every_grid_row_parses_and_belongs_to_its_method():
    for method, count in [
        ("self-cascade", 15),
        ("scalecrafter", 3 + 9 + 6),
        ("sr", 4),
        ("direct", 3),
        ("attn-sf", 3),
        ("lanczos", 1),
    ]:
        rows = [parse_setting(text) for text in search.grid(method, 5.0)]
        assert len(rows) == count and len({r.key for r in rows}) == count
        assert {r.method for r in rows} == {method} and {search.group(r) for r in rows} == {method}
    grid = [dict(parse_setting(t).options) for t in search.grid("scalecrafter", 5.0)]
    assert [o["guidance"] for o in grid if "dilation" not in o] == ["3", "5", "7.5"]  # the plan as it is
    assert {(o["dilation"], o["tau"], o["guidance"]) for o in grid if "dilation" in o and "ndcfg" not in o} == {
        (d, t, "5") for d in ("1.5", "2", "3") for t in ("10", "20", "30")
    }
    assert {(o["dilation"], o["ndcfg"], o["tau"]) for o in grid if "ndcfg" in o} == {
        (d, m, t) for d, m in (("2", "1.5"), ("3", "2")) for t in ("10", "20", "30")
    }
    assert len(search.grid("direct", 4.0)) == 4  # the model's own guidance is always tried


def row(label, hits, fidelity=(0.5,), fid=None, n=10):
    return Measured(Setting(label, ()), hits, n, list(fidelity), fid_r=None if fid is None else (fid, fid - 1, fid + 1))


def test_choose_takes_the_best_composition_then_the_lower_fid_r():
    rows = [
        row("self-cascade K=300", 6, fid=40.0),
        row("self-cascade K=700", 7, fid=90.0),  # best composition wins, however worse its FID_r
        row("direct g=3", 2, fid=50.0),
        row("direct g=5", 2, fid=30.0),  # a tie on composition: the lower FID_r
        row("direct g=7.5", 2, fid=30.0),  # a full tie keeps the earlier row
    ]
    chosen = search.choose(rows)
    assert {name: r.setting.label for name, r in chosen.items()} == {
        "self-cascade": "self-cascade K=700",
        "direct": "direct g=5",
    }
    without_fid = [row("sr noise=0", 3, (0.4, 0.5)), row("sr noise=20", 3, (0.9,)), row("sr noise=50", 1, (1.0,))]
    assert search.choose(without_fid)["sr"].setting.label == "sr noise=20"  # tie: the higher shape fidelity
    assert search.choose([row("lanczos", 0, ()), row("lanczos x", 0, (0.1,))])["lanczos"].setting.label == "lanczos x"


def test_default_methods_search_sr_only_with_an_sr_model(sd_model, monkeypatch):
    expected = ["direct", "self-cascade", "scalecrafter", "attn-sf", "demofusion", "freescale", "lanczos"]
    assert search.default_methods(sd_model) == expected
    monkeypatch.setattr(upscale, "load_upscaler", lambda source, model: object())
    assert "sr" in search.default_methods(sd_model)


def test_search_writes_the_choice_that_ablation_makes_its_test_table_from(sd_folder, tmp_path, capsys):
    work, out, chosen = tmp_path / "dev", tmp_path / "bench.md", tmp_path / "chosen.json"
    extra = ["--methods", "direct,lanczos", "--setting", "self-cascade K=600: k=600", "--chosen", str(chosen)]
    scores = tmp_path / "search.csv"
    more = [*extra, "--out", str(out), "--scores", str(scores)]
    assert main(engine_args("search", sd_folder, work, seed=1000, extra=more)) == 0
    data = json.loads(chosen.read_text())
    lines = scores.read_text().splitlines()  # a line per sample of every row: the base, 3 direct, lanczos, the K=600
    assert lines[0].startswith("section,size,row,index") and len(lines) == 1 + 2 * (1 + 3 + 1 + 1)
    assert all(line.startswith("search-32x32,") for line in lines[1:])
    assert data["seeds"] == [1000, 1001] and data["size"] == "32x32" and data["steps"] == 2
    assert set(data["chosen"]) == {"direct", "lanczos", "self-cascade"}
    # The choice follows the rule on what was sampled: the highest composition, then the higher shape fidelity.
    sampled = {}
    for folder in (work / "32x32").iterdir():
        records = [json.loads(p.read_text()) for p in folder.glob("*.json")]
        scores = [s for r in records for s in r["fidelity"]]
        sampled[folder.name.rsplit("-", 1)[0]] = (sum(r["match"] for r in records), np.mean(scores) if scores else -1)
    direct_rows = [parse_setting(t) for t in search.grid("direct", 7.5)]
    best = max(direct_rows, key=lambda s: sampled[s.key.rsplit("-", 1)[0]])  # max keeps the first of equals
    assert data["chosen"]["direct"]["setting"] == best.text
    text = out.read_text()
    assert "<!-- bench:search-32x32 -->" in text and f"{best.label} (chosen)" in table_labels(text)
    assert table_labels(text)[0] == "base (16x16, other seeds)" and len(table_labels(text)) == 1 + 3 + 1 + 1

    # The test table: one row per chosen setting and the paper's K=700, on other seeds.
    test_out = tmp_path / "test.md"
    args = engine_args("ablation", sd_folder, tmp_path / "test", seed=0, extra=["--chosen", str(chosen)])
    assert main([*args, "--out", str(test_out)]) == 0
    labels = table_labels(test_out.read_text())
    assert labels[0] == "base (16x16, other seeds)" and "self-cascade K=700 (paper's)" in labels
    assert {parse_setting(e["setting"]).label + " (chosen)" for e in data["chosen"].values()} <= set(labels)
    assert "seeds 1000..1001, disjoint from this table's" in test_out.read_text()

    # Made on the development seeds (or overlapping them), or at another size: refused in one line.
    assert main(engine_args("ablation", sd_folder, tmp_path / "t2", seed=1001, extra=["--chosen", str(chosen)])) == 2
    assert "overlap: development and test seeds must be disjoint" in capsys.readouterr().err
    other = engine_args("ablation", sd_folder, tmp_path / "t3", seed=0, extra=["--chosen", str(chosen)])
    assert main([*other[:4], "64x64", *other[5:]]) == 2
    assert "chosen with size 32x32, this table has 64x64" in capsys.readouterr().err


def test_the_papers_row_is_one_row_when_it_is_the_chosen_one(tmp_path):
    data = {
        "fingerprint": "f",
        "size": "32x32",
        "steps": 2,
        "seeds": [1000, 1099],
        "rule": "highest composition",
        "chosen": {"self-cascade": {"setting": "self-cascade K=700 g=5: k=700; guidance=5"}},
        "paper": {"self-cascade": {"setting": "self-cascade K=700 (paper's): k=700; guidance=5"}},
    }
    path = tmp_path / "chosen.json"
    path.write_text(json.dumps(data))
    bench, args = SimpleNamespace(fingerprint="f", size=(32, 32)), SimpleNamespace(seed=0, n=200, steps=2)
    rows, _ = search.read_chosen(path, args, bench)
    assert [r.label for r in rows] == ["self-cascade K=700 g=5 (chosen) = the paper's"]
    path.write_text(json.dumps(data | {"chosen": {"direct": {"setting": "direct g=3: method=direct; guidance=3"}}}))
    rows, _ = search.read_chosen(path, args, bench)
    assert [r.label for r in rows] == ["direct g=3 (chosen)", "self-cascade K=700 (paper's)"]
    with pytest.raises(BadInput, match="overlap"):
        search.read_chosen(path, SimpleNamespace(seed=1050, n=200, steps=2), bench)
    path.write_text("{}")
    with pytest.raises(BadInput, match="not a choice written by `bench search`"):
        search.read_chosen(path, args, bench)


def test_a_flow_model_searches_k_on_its_flow_line_and_names_the_papers_k_there():
    from sc_app.families import FLOW_K, flow_k

    assert flow_k(700) == FLOW_K == 770 and flow_k(300) == 455 and flow_k(0) < flow_k(100) < flow_k(999) < 1000
    rows = [parse_setting(text) for text in search.grid("self-cascade", 3.0, flow=True)]
    assert sorted({dict(r.options)["k"] for r in rows}, key=int) == ["256", "364", "455", "619", "770"]
    assert "on the flow line" in search.grid_text(["self-cascade"], 3.0, flow=True)
    flow_model = SimpleNamespace(is_flow=True, default_guidance=3.0)
    assert search.paper_setting(flow_model) == "self-cascade K=770 (paper's): k=770; guidance=3"
    assert search.paper_setting(SimpleNamespace(default_guidance=5.0)).startswith("self-cascade K=700 (paper's)")
