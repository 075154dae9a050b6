"""`scale=paper` is the papers' recipe: every experiment, composed at paper scale, against each
paper's fidelity table (experiments/<paper>/fidelity.yaml, embedkit/recipes/fidelity.py)."""

from __future__ import annotations

import textwrap

import pytest

from helpers import REPO

TABLES = sorted(p.parent.name for p in (REPO / "experiments").glob("*/fidelity.yaml"))


def test_every_paper_has_a_fidelity_table():
    from embedkit.reporting import experiments

    papers = {e.paper for e in experiments.load() if e.paper}
    assert papers and papers <= set(TABLES), f"papers without experiments/<paper>/fidelity.yaml: {papers - set(TABLES)}"


@pytest.mark.parametrize("paper", TABLES)
def test_paper_scale_matches_the_fidelity_table(paper):
    from embedkit.recipes import fidelity

    problems = fidelity.check(REPO / "experiments" / paper / "fidelity.yaml")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("paper", TABLES)
def test_every_deciding_setting_of_every_paper_stage_has_an_entry(paper):
    # So `scale=paper` cannot silently keep a mini value: each stage's lr, batch, negatives, τ,
    # lengths, sources, precision, steps and instructions are checked by some entry.
    from embedkit.recipes import fidelity

    names = fidelity.paper_experiments(paper)
    assert names
    missing = fidelity.uncovered(REPO / "experiments" / paper / "fidelity.yaml", names)
    assert not missing, "\n".join(missing)


def _table(tmp_path, body: str):
    path = tmp_path / "fidelity.yaml"
    path.write_text(textwrap.dedent(body), encoding="utf-8")
    return path


def test_a_wrong_value_fails_naming_the_setting_both_values_and_the_source(tmp_path):
    from embedkit.recipes import fidelity

    path = _table(tmp_path, """\
        settings:
          - setting: "general: temperature"
            where: {experiments: [bge_ablation_recipe], stages: [general], rows: [BGE w.o. pre-train]}
            key: objective.temperature
            paper: 0.02
            source: "a made-up source"
        """)
    [problem] = fidelity.check(path)
    assert "general: temperature" in problem and "row 'BGE w.o. pre-train' / stage general" in problem
    assert "is 0.01" in problem and "paper 0.02" in problem and "a made-up source" in problem


def test_a_deviation_is_checked_against_our_value(tmp_path):
    from embedkit.recipes import fidelity

    path = _table(tmp_path, """\
        settings:
          - setting: "general: steps"
            where: {experiments: [bge_ablation_recipe], stages: [general]}
            key: steps
            paper: "not published"
            ours: 1 epochs
            deviation: "no value given"
            source: "C-Pack"
          - setting: "general: steps (wrong ours)"
            where: {experiments: [bge_ablation_recipe], stages: [general], rows: [BGE-pretrain]}
            key: steps
            paper: "not published"
            ours: 3 epochs
            deviation: "no value given"
            source: "C-Pack"
        """)
    [problem] = fidelity.check(path)
    assert "wrong ours" in problem and "ours (a stated deviation) '3 epochs'" in problem


@pytest.mark.parametrize("entry, message", [
    ("{setting: x, where: {experiments: [bge_ablation_recipe]}, key: a, paper: 1, source: s, ours: 2}",
     "both `ours`"),
    ("{setting: x, where: {experiments: []}, key: a, paper: 1, source: s}", "lists no experiment"),
    ("{setting: x, where: {experiments: [bge_ablation_recipe]}, key: a, paper: 1}", "missing `source`"),
    ("{setting: x, where: {experiments: [bge_ablation_recipe]}, key: a, paper: 1, source: s, typo: 1}",
     "unknown field"),
])
def test_a_malformed_entry_is_an_error_naming_file_and_entry(tmp_path, entry, message):
    from embedkit.recipes import fidelity

    path = _table(tmp_path, f"settings:\n  - {entry}\n")
    with pytest.raises(fidelity.FidelityTableError, match=message) as err:
        fidelity.load(path)
    assert "fidelity.yaml entry 1" in str(err.value)


def test_an_entry_matching_nothing_or_a_missing_key_is_reported(tmp_path):
    from embedkit.recipes import fidelity

    path = _table(tmp_path, """\
        settings:
          - {setting: a, where: {experiments: [bge_ablation_recipe], stages: [nosuchstage]}, key: objective.lr,
             paper: 1, source: s}
          - {setting: b, where: {experiments: [bge_ablation_recipe], stages: [pretrain]}, key: objective.temperature,
             paper: 1, source: s}
          - {setting: c, where: {experiments: [no_such_experiment]}, key: objective.lr, paper: 1, source: s}
        """)
    problems = fidelity.check(path)
    assert any("matches no row or stage" in p for p in problems)
    assert any("stage pretrain has no `objective.temperature`" in p for p in problems)
    assert any("no experiment 'no_such_experiment'" in p for p in problems)


def test_a_paper_stage_without_an_entry_is_uncovered(tmp_path):
    from embedkit.recipes import fidelity

    path = _table(tmp_path, """\
        settings:
          - {setting: lr, where: {experiments: [bge_ablation_recipe]}, key: objective.lr, paper: 1, source: s}
        """)
    missing = fidelity.uncovered(path, ["bge_ablation_recipe"])
    assert any("stage general: `objective.temperature` has no entry" in m for m in missing)
    assert not any("`objective.lr`" in m for m in missing)


@pytest.mark.parametrize("paper", TABLES)
def test_results_md_shows_the_current_fidelity_table(paper):
    from embedkit.reporting.fidelity import section as fidelity_section

    section = fidelity_section(REPO / "experiments" / paper)
    text = (REPO / "experiments" / paper / "RESULTS.md").read_text(encoding="utf-8")
    assert section in text, (f"experiments/{paper}/RESULTS.md has an old fidelity table: "
                             f"python -m embedkit.reporting.report --fidelity-only")


def test_by_scale_picks_the_runs_scale_and_names_a_missing_one():
    from omegaconf import OmegaConf

    import embedkit.config  # noqa: F401  registers by_scale

    cfg = OmegaConf.create({"scale": {"name": "paper"}, "lr": "${by_scale:{mini: 3e-4, paper: 1e-5}}",
                            "odd": "${by_scale:{mini: 1}}"})
    assert cfg.lr == 1e-5
    cfg.scale.name = "mini"
    assert cfg.lr == 3e-4 and cfg.odd == 1
    cfg.scale.name = "paper"
    with pytest.raises(Exception, match="no value for scale 'paper'"):
        _ = cfg.odd


def test_a_command_line_override_beats_the_per_scale_value(compose_run):
    from embedkit.recipes.rows import ablation_rows, row_config, stage_config

    cfg = compose_run(["+experiment=bge_ablation_recipe", "scale=paper", "stages.general.objective.lr=7e-6"])
    row = ablation_rows(cfg)[0]
    stage = stage_config(row_config(cfg, row["overrides"]), "general", None)
    assert stage.objective.lr == 7e-6 and stage.objective.temperature == 0.01
