"""`seeds=N` (embedkit/reporting/seeds.py): every row runs N times, the tables show mean ± std, and a
finding is "within noise" when |Δ| < 2·sqrt(s_a²/n_a + s_b²/n_b).

The worked cases below are computed by hand in the comments; the end-to-end run trains the smoke
batch-size ablation with 2 seeds and resumes it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from embedkit import runs
from embedkit.recipes.recovery import SettingsChanged, check_seed_layout
from embedkit.reporting import findings, report, seeds, tables
from helpers import fake_recipe_rows, run_py

REPO = Path(__file__).resolve().parents[1]


def _results(label: str, avg: float, **categories) -> dict:
    return {"label": label, "variant": "", "paper_row": None, "Avg": avg,
            "categories": {c: categories.get(c, avg) for c in tables.COLUMNS[:-1]},
            "tasks": {"T1": avg - 1, "T2": avg + 1}, "steps": 3, "train_seconds": 1.5, "seed": 0}


def _row(label: str, avgs: list[float], first_seed: int = 42) -> dict:
    """A table row as the recipe writes one for a row run with len(avgs) seeds."""
    per_seed = {first_seed + k: _results(label, a) for k, a in enumerate(avgs)}
    agg = seeds.aggregate(per_seed) if len(avgs) > 1 else per_seed[first_seed]
    return tables.row_from_results(label, agg)


def _run(rows: list[dict]) -> report.Run:
    by_label = {r["label"]: {**{c: r.get(c) for c in tables.COLUMNS},
                             **{k: r[k] for k in report.SPREAD_KEYS if k in r}} for r in rows}
    return report.Run("x", Path("."), by_label, {}, None, {}, [], 0.0)


SPEC = {"claim": "A beats B", "source": "Table 1", "rows": ["A", "B"], "column": "Avg", "direction": "up"}


# ---------------------------------------------------------------- the numbers

def test_aggregate_keeps_every_seed_and_adds_mean_sample_std_and_n():
    agg = seeds.aggregate({43: _results("A", 42.0), 42: _results("A", 40.0), 44: _results("A", 44.0)})
    assert agg["seeds"] == [42, 43, 44]
    # mean 42; deviations -2, 0, 2: sample variance (4 + 0 + 4) / (3 - 1) = 4, std 2
    assert agg["Avg"] == 42.0 and agg["spread"]["Avg"] == {"mean": 42.0, "std": 2.0, "n": 3}
    assert agg["categories"]["STS"] == 42.0 and agg["spread"]["categories"]["STS"]["std"] == 2.0
    assert agg["tasks"] == {"T1": 41.0, "T2": 43.0}
    assert [agg["per_seed"][s]["Avg"] for s in ("42", "43", "44")] == [40.0, 42.0, 44.0]
    assert agg["train_seconds"] == 4.5 and "seed" not in agg   # the row's cost, all seeds together
    # a seed without a score (a category no task of the run has) is not counted
    assert seeds.spread([1.0, None, float("nan"), 3.0]) == {"mean": 2.0, "std": math.sqrt(2), "n": 2}
    assert seeds.spread([5.0]) == {"mean": 5.0, "std": None, "n": 1}


def test_standard_error_of_a_difference_worked_by_hand():
    # s_a = 2, n_a = 3; s_b = 1, n_b = 3: sqrt(4/3 + 1/3) = sqrt(5/3)
    assert seeds.standard_error(2.0, 3, 1.0, 3) == pytest.approx(math.sqrt(5 / 3))
    # unequal counts: sqrt(9/4 + 4/2) = sqrt(4.25)
    assert seeds.standard_error(3.0, 4, 2.0, 2) == pytest.approx(math.sqrt(4.25))
    assert seeds.standard_error(2.0, 3, None, 1) is None   # one seed: no std, no error


def test_verdicts_within_noise_agrees_disagrees():
    b = _row("B", [39.0, 40.0, 41.0])   # mean 40, std 1
    # A: mean 42, std 2. Δ = 2; 2·SE = 2·sqrt(4/3 + 1/3) = 2.582: 2 < 2.582, within noise
    (f,) = findings.evaluate([SPEC], _run([_row("A", [40.0, 42.0, 44.0]), b]), [])
    assert f.ours == pytest.approx(2.0) and f.noise == pytest.approx(2 * math.sqrt(5 / 3))
    assert f.seeds == 3 and f.verdict == "yes" and f.outcome == "within noise"
    # A: mean 43.5 (42.5, 43.5, 44.5), std 1. Δ = 3.5; 2·SE = 2·sqrt(1/3 + 1/3) = 1.633: agrees
    (f,) = findings.evaluate([SPEC], _run([_row("A", [42.5, 43.5, 44.5]), b]), [])
    assert f.noise == pytest.approx(2 * math.sqrt(2 / 3)) and f.outcome == "agrees"
    (f,) = findings.evaluate([{**SPEC, "direction": "down"}], _run([_row("A", [42.5, 43.5, 44.5]), b]), [])
    assert f.outcome == "disagrees" and f.verdict == "no"


def test_one_seed_keeps_the_sign_call_and_says_so():
    (f,) = findings.evaluate([SPEC], _run([_row("A", [41.0]), _row("B", [40.0])]), [])
    assert f.se is None and f.noise is None and f.seeds == 1
    assert f.verdict == "yes" and f.outcome == "agrees (1 seed)"
    (f,) = findings.evaluate([SPEC], _run([_row("A", [40.0]), _row("B", [40.0])]), [])
    assert f.verdict == "no (no change)" and f.outcome == "disagrees (no change, 1 seed)"
    (f,) = findings.evaluate([{**SPEC, "rows": ["A", "C"]}], _run([_row("A", [40.0, 41.0])]), [])
    assert f.outcome == "n/a (row missing)"


def test_margin_and_neighbours_carry_their_errors():
    rows = [_row("A", [44.0, 46.0]), _row("B", [40.0, 40.0]),    # Δ 5, std_a √2, std_b 0
            _row("C", [41.0, 43.0]), _row("D", [40.0, 40.0])]    # Δ 2, std_c √2
    specs = [{**SPEC, "id": "ab"}, {**SPEC, "id": "cd", "rows": ["C", "D"]},
             {"claim": "m", "source": "s", "margin": {"of": "ab", "over": ["cd"]}, "direction": "up"}]
    ab, cd, margin = findings.evaluate(specs, _run(rows), [])
    assert ab.se == pytest.approx(1.0) and cd.se == pytest.approx(1.0)   # sqrt(2/2 + 0/2)
    # margin Δ = 5 - 2 = 3; SE = sqrt(1² + 1²) = 1.414; 2·SE = 2.83 < 3: agrees
    assert margin.ours == pytest.approx(3.0) and margin.se == pytest.approx(math.sqrt(2))
    assert margin.outcome == "agrees"
    series = [_row("dim=8", [30.0, 32.0]), _row("dim=16", [36.0, 36.0]), _row("dim=32", [36.2, 37.4])]
    spec = {"claim": "c", "source": "s", "series": r"dim=(\d+)", "rows": "neighbours", "reduce": "min",
            "direction": "up"}
    (f,) = findings.evaluate([spec], _run(series), [])
    # steps 36 - 31 = 5 and 36.8 - 36 = 0.8: the smallest is 16 → 32; its std_32 = 1.2/√2, so
    # SE = sqrt(0.72/2 + 0/2) = 0.6 and 2·SE = 1.2 > 0.8: within noise
    assert f.ours == pytest.approx(0.8) and f.se == pytest.approx(0.6) and f.outcome == "within noise"


# ---------------------------------------------------------------- tables and the report

def test_tables_show_mean_and_std_and_keep_the_floor_and_one_seed_rows_plain(tmp_path):
    floor = tables.floor_row({"categories": {c: 10.0 for c in tables.COLUMNS[:-1]}, "Avg": 10.0,
                              "lexical_floor": {"label": "lexical floor"}})
    rows = [_row("A", [40.0, 42.0, 44.0]), floor]
    md = tables.write_table(rows, tmp_path, first="row")
    assert "| A | 42.00 ± 2.00 | 42.00 ± 2.00 |" in md and "| lexical floor | 10.00 | 10.00 |" in md
    saved = json.loads(runs.table_file(tmp_path).read_text())
    assert saved[0]["seeds"] == [42, 43, 44] and saved[0]["std"]["Avg"] == 2.0 and saved[0]["n"]["Avg"] == 3
    assert saved[0]["per_seed"]["43"]["Avg"] == 42.0 and "seeds" not in saved[1]
    header, first = runs.table_file(tmp_path, "csv").read_text().splitlines()[:2]
    assert header.endswith("Avg,Retrieval std,STS std,PairCLF std,CLF std,Rerank std,Cluster std,Avg std,seeds")
    assert first.endswith(",42.0000,2.0000,2.0000,2.0000,2.0000,2.0000,2.0000,2.0000,3")
    assert tables.seed_count(rows) == 3
    # one seed: no spread anywhere, the columns as they always were
    plain = [_row("A", [41.0])]
    assert "| A | 41.00 |" in tables.to_markdown(plain, "row") and "±" not in tables.to_markdown(plain, "row")
    assert tables.to_csv(plain, "row").splitlines()[0] == "row," + ",".join(tables.COLUMNS)


def test_results_md_shows_the_verdict_its_delta_and_2se():
    run = _run([_row("A", [40.0, 42.0, 44.0]), _row("B", [39.0, 40.0, 41.0])])
    caption = report.seeds_caption(run)
    assert caption[0].startswith("Mean ± sample standard deviation over 3 seeds (42, 43, 44)")
    text = report.findings_table(findings.evaluate([SPEC], run, []))
    assert "| mini Δ | same direction | 2·SE | verdict |" in text
    assert "| +2.00 | yes | 2.58 | within noise |" in text and "0 agree, 0 disagree and 1 are within noise" in text
    one = report.findings_table(findings.evaluate([SPEC], _run([_row("A", [41.0]), _row("B", [40.0])]), []))
    assert "| yes | – (1 seed) | agrees (1 seed) |" in one and "one seed per row" in one
    assert report.seeds_caption(_run([_row("A", [41.0])])) == []


# ---------------------------------------------------------------- folders and configs

def test_seed_folders_and_layout_checks(tmp_path):
    row = tmp_path / "rows" / "A"
    assert runs.seed_dirs(row) == [row]   # a one-seed row trains in the row folder itself
    for s in (10, 9, 42):
        runs.seed_dir(row, s).mkdir(parents=True)
    (row / "seed-x").mkdir()
    assert [p.name for p in runs.seed_dirs(row)] == ["seed-9", "seed-10", "seed-42"]   # by number
    check_seed_layout(row, 3, "row 'A'")
    with pytest.raises(SettingsChanged, match="several seeds .*seeds=1"):
        check_seed_layout(row, 1, "row 'A'")
    one = tmp_path / "rows" / "B"
    one.mkdir()
    runs.settings_file(one).write_text("{}")
    check_seed_layout(one, 1, "row 'B'")
    with pytest.raises(SettingsChanged, match=r"row 'B' in .* holds a one-seed run .*seeds=3"):
        check_seed_layout(one, 3, "row 'B'")


def test_make_reproduce_keeps_a_run_only_with_the_seeds_asked_for(tmp_path):
    floor = tables.floor_row({"categories": {}, "Avg": 1.0, "lexical_floor": {}})
    tables.write_table([_row("A", [1.0, 2.0, 3.0]), _row("B", [1.0, 2.0, 3.0]), floor], tmp_path, "row")
    assert runs.finished_cleanly(tmp_path) and runs.finished_cleanly(tmp_path, 3)
    assert not runs.finished_cleanly(tmp_path, 1) and not runs.finished_cleanly(tmp_path, 2)
    tables.write_table([_row("A", [1.0])], tmp_path, "row")
    assert runs.finished_cleanly(tmp_path, 1) and not runs.finished_cleanly(tmp_path, 3)


def test_seeds_are_counted_from_the_seed_and_bad_counts_are_refused():
    from omegaconf import OmegaConf

    assert seeds.seeds_of(OmegaConf.create({"seed": 42, "seeds": 3})) == [42, 43, 44]
    assert seeds.seeds_of(OmegaConf.create({"seed": 7})) == [7]
    for bad in (0, -1, "3", True, 1.5):
        with pytest.raises(ValueError, match="seeds: expected a whole number >= 1"):
            seeds.seeds_of(OmegaConf.create({"seed": 42, "seeds": bad}))


def test_make_reproduce_passes_three_seeds():
    from embedkit.reporting import experiments

    makefile = (REPO / "Makefile").read_text()
    line = next(l for l in makefile.splitlines() if l.startswith("REPRODUCE_ARGS"))
    args = line.split("?=", 1)[1].split()
    assert experiments.requested_seeds("mrl_dims", args) >= 3
    assert experiments.requested_seeds("mrl_dims") == 1   # conf/train.yaml's default


def test_plan_names_the_seeds_and_their_folders(compose_run, capsys):
    from embedkit.recipes.rows import ablation_rows
    from embedkit.recipes.train_eval import run

    cfg = compose_run(["+experiment=bge_ablation_recipe", "seeds=3", "plan=true"])
    assert run(cfg) is None
    out = capsys.readouterr().out
    assert out.startswith("Plan: bge_ablation_recipe at scale=mini, 4 rows x 3 seeds (mean ± std per row)")
    assert "   seeds: 42, 43, 44; each in its own folder (rows/BGE-pretrain/seed-42, rows/BGE-pretrain/seed-43, " \
           "rows/BGE-pretrain/seed-44); stages below: seed 42's" in out
    # one seed's chain per row, as with one seed
    assert out.count("-- stage ") == sum(len(r["stages"] or [None]) for r in ablation_rows(cfg))


def test_each_seed_trains_its_own_stages_scored_on_the_runs_eval_seed(compose_run, tmp_path):
    from embedkit.recipes.rows import ablation_rows
    from embedkit.recipes.train_eval import planned

    cfg = compose_run(["+experiment=bge_ablation_recipe", "seeds=2"])
    rows = planned(cfg, ablation_rows(cfg), tmp_path / "run")
    first, second = rows[0]["by_seed"]
    assert (first["seed"], second["seed"]) == (42, 43) and rows[0]["plan"] is first["plan"]
    (pre_a, final_a), (pre_b, final_b) = first["plan"], second["plan"]
    assert pre_a["dir"] != pre_b["dir"] and final_b["dir"] == tmp_path / "run" / "rows" / "BGE-pretrain" / "seed-43"
    assert final_b["cfg"].seed == 43 and final_b["cfg"].data.seed == 43
    assert final_a["cfg"].eval.seed == final_b["cfg"].eval.seed == 42
    assert final_b["name"].endswith("/BGE-pretrain/general/seed-43")
    # one seed: the row folder and the stages a one-seed run always had
    one = planned(compose_run(["+experiment=bge_ablation_recipe"]), ablation_rows(cfg), tmp_path / "run")
    assert one[0]["by_seed"][0]["dir"] == one[0]["dir"] and one[0]["plan"][0]["dir"] == pre_a["dir"]


def test_a_resume_keeps_finished_row_seed_pairs_and_runs_the_rest(tmp_path, monkeypatch):
    import embedkit.recipes.train_eval as recipe
    from omegaconf import OmegaConf

    rows = [{"label": lab, "paper_row": None, "overrides": {}, "stages": None} for lab in ("32", "128")]
    ran = []

    def run_row(cfg, row, *args):
        ran.append((row["label"], row["seed"]))
        return {"": {"label": row["label"], "variant": "", "categories": {"STS": 10.0 + row["seed"]},
                     "Avg": 10.0 + row["seed"], "seed": row["seed"]}}

    fake_recipe_rows(monkeypatch, recipe, rows, run_row)
    out = tmp_path / "run"
    for label, seed, results in (("32", 0, {"label": "32", "variant": "", "categories": {"STS": 7.0}, "Avg": 7.0}),
                                 ("128", 1, {"label": "128", "error": "killed"})):
        runs.seed_dir(out / "rows" / label, seed).mkdir(parents=True)
        runs.results_file(runs.seed_dir(out / "rows" / label, seed)).write_text(json.dumps(results))
    cfg = OmegaConf.create({"paths": {"output_dir": str(out)}, "model": {"tokenizer": {}}, "data": {},
                            "eval": {}, "experiment_name": "x", "scale": {"name": "mini"}, "ablation": None,
                            "seed": 0, "seeds": 2})
    recipe.run(cfg)
    assert ran == [("32", 1), ("128", 0), ("128", 1)]   # 32's seed 0 was finished: kept
    table = {r["label"]: r for r in json.loads(runs.table_file(out).read_text())}
    # 32: seeds 0 (kept, 7) and 1 (11): mean 9, std |7 - 11| / √2; 128: 10 and 11
    assert table["32"]["Avg"] == 9.0 and table["32"]["std"]["Avg"] == pytest.approx(4 / math.sqrt(2))
    assert table["128"]["per_seed"] == {"0": {"Avg": 10.0, **{c: None for c in tables.COLUMNS[:-1]}, "STS": 10.0},
                                        "1": {"Avg": 11.0, **{c: None for c in tables.COLUMNS[:-1]}, "STS": 11.0}}
    assert json.loads(runs.results_file(out / "rows" / "32").read_text())["seeds"] == [0, 1]
    assert all(runs.settings_file(runs.seed_dir(out / "rows" / lab, s)).is_file() for lab in ("32", "128") for s in (0, 1))
    # the same folder resumed with one seed is refused: its rows hold seed-<s>/ folders
    with pytest.raises(SettingsChanged, match="several seeds"):
        recipe.run(OmegaConf.merge(cfg, {"seeds": 1}))


# ---------------------------------------------------------------- end to end

@pytest.mark.slow
def test_two_seeds_end_to_end_then_resume_retrains_nothing(tmp_path):
    args = ["+experiment=bge_ablation_batchsize", "debug=smoke", "seeds=2", "logger=csv"]
    proc = run_py(args, tmp_path)
    assert "(mini scale, mini_cmteb; mean ± std over 2 seeds)" in proc.stdout
    (run_dir,) = (tmp_path / "logs" / "bge_ablation_batchsize" / "runs").iterdir()
    table = {r["label"]: r for r in json.loads(runs.table_file(run_dir).read_text())}
    assert list(table) == ["32", "128", "512", "32, same steps", "512, same steps"]
    done = {}
    for label, row in table.items():
        row_dir = runs.row_dir(run_dir, label)
        assert [p.name for p in runs.seed_dirs(row_dir)] == ["seed-42", "seed-43"]
        per_seed = [json.loads(runs.results_file(d).read_text()) for d in runs.seed_dirs(row_dir)]
        assert [r["seed"] for r in per_seed] == [42, 43] and all(r["label"] == label for r in per_seed)
        assert per_seed[0]["Avg"] != per_seed[1]["Avg"]   # the seeds trained different models
        avgs = [r["Avg"] for r in per_seed]
        assert row["seeds"] == [42, 43] and row["n"]["Avg"] == 2
        assert row["Avg"] == pytest.approx(sum(avgs) / 2) and row["std"]["Avg"] == pytest.approx(abs(avgs[0] - avgs[1]) / math.sqrt(2))
        assert [row["per_seed"][s]["Avg"] for s in ("42", "43")] == avgs
        agg = json.loads(runs.results_file(row_dir).read_text())
        assert agg["Avg"] == row["Avg"] and agg["spread"]["Avg"]["n"] == 2 and agg["label"] == label
        for d in runs.seed_dirs(row_dir):
            assert (d / "model" / "model.safetensors").is_file() and runs.settings_file(d).is_file()
            done[d] = runs.done_file(d).stat().st_mtime_ns
    assert "±" in runs.table_file(run_dir, "md").read_text()
    # the findings of RESULTS.md are tested against the seed noise
    exp = next(e for e in report.declared.load() if e.name == "bge_ablation_batchsize")
    found = findings.evaluate(exp.findings, report.load_run(run_dir, exp.name),
                              tables.read_paper_table(REPO / "experiments" / "bge" / "cpack_table4.csv")[1])
    assert found and all(f.se is not None and f.seeds == 2 for f in found)
    assert {f.outcome for f in found} <= {"agrees", "disagrees", "within noise"}

    # resume: every (row, seed) is kept, nothing is trained again, the table is the same
    before = runs.table_file(run_dir).read_text()
    trained = (run_dir / "run.log").read_text().count(": training tiny_zh")
    run_py([*args, "resume=true"], tmp_path)
    log = (run_dir / "run.log").read_text()
    assert trained == 10 and log.count(": training tiny_zh") == 10 and log.count("done in an earlier run") == 10
    assert {d: runs.done_file(d).stat().st_mtime_ns for d in done} == done
    assert runs.table_file(run_dir).read_text() == before

    # the first seed of a two-seed run is the one-seed run: same vocabulary, same numbers
    run_py(["+experiment=bge_ablation_batchsize", "debug=smoke", "logger=csv", "experiment_name=one"], tmp_path)
    (one_dir,) = (tmp_path / "logs" / "one" / "runs").iterdir()
    one = {r["label"]: r["Avg"] for r in json.loads(runs.table_file(one_dir).read_text())}
    assert one == {label: row["per_seed"]["42"]["Avg"] for label, row in table.items()}
