"""sslkd/evaluation/report.py against values computed by hand on a small hand-written input."""

from __future__ import annotations

import math

import pytest

from sslkd.evaluation.report import markdown_table, paired_differences, summarise

# Three random-subset runs (one per evaluation seed) and five MKDT runs: two distilled sets (distillation
# seeds 0 and 1) at evaluation seeds 0 and 1, plus one at evaluation seed 3, which has no random run to pair.
RUNS = {
    "random": [
        {"eval_seed": 0, "distill_seed": None, "accuracy": {"0.1": 50.0, "1.0": 80.0}},
        {"eval_seed": 1, "distill_seed": None, "accuracy": {"0.1": 54.0, "1.0": 84.0}},
        {"eval_seed": 2, "distill_seed": None, "accuracy": {"0.1": 52.0, "1.0": 82.0}},
    ],
    "mkdt": [
        {"eval_seed": 0, "distill_seed": 0, "accuracy": {"0.1": 60.0}},
        {"eval_seed": 0, "distill_seed": 1, "accuracy": {"0.1": 56.0}},
        {"eval_seed": 1, "distill_seed": 0, "accuracy": {"0.1": 58.0}},
        {"eval_seed": 1, "distill_seed": 1, "accuracy": {"0.1": 62.0}},
        {"eval_seed": 3, "distill_seed": 0, "accuracy": {"0.1": 70.0}},
    ],
}


def test_summarise_gives_each_method_s_mean_sample_std_and_count_per_label_fraction():
    summary = summarise(RUNS)
    # random, 10%: 50, 54, 52 -> mean 52, squared deviations 4 + 4 + 0 = 8, sample variance 8 / 2 = 4
    assert summary["random"]["0.1"] == {"mean": 52.0, "std": 2.0, "n": 3}
    assert summary["random"]["1.0"] == {"mean": 82.0, "std": 2.0, "n": 3}
    # mkdt, 10%: 60, 56, 58, 62, 70 -> mean 61.2; squared deviations 1.44 + 27.04 + 10.24 + 0.64 + 77.44
    # = 116.8, sample variance 116.8 / 4 = 29.2; mkdt has no 100% run, so no such row
    assert set(summary["mkdt"]) == {"0.1"}
    assert summary["mkdt"]["0.1"]["mean"] == pytest.approx(61.2)
    assert summary["mkdt"]["0.1"]["std"] == pytest.approx(math.sqrt(29.2))
    assert summary["mkdt"]["0.1"]["n"] == 5


def test_a_single_run_has_zero_std():
    assert summarise({"m": [{"eval_seed": 0, "accuracy": {"0.5": 41.0}}]}) == {
        "m": {"0.5": {"mean": 41.0, "std": 0.0, "n": 1}}
    }


def test_paired_differences_pair_every_distilled_set_with_the_baseline_run_of_its_evaluation_seed():
    paired = paired_differences(RUNS, "mkdt", "random")
    # eval seed 0: 60 - 50 = 10 (distill seed 0), 56 - 50 = 6 (distill seed 1); eval seed 1: 58 - 54 = 4,
    # 62 - 54 = 8; eval seed 3 has no random run: left out. Differences 10, 6, 4, 8: mean 7, squared
    # deviations 9 + 1 + 9 + 1 = 20, sample variance 20 / 3. No 100% pair (mkdt has no such run).
    assert set(paired) == {"0.1"}
    assert paired["0.1"]["mean"] == pytest.approx(7.0)
    assert paired["0.1"]["std"] == pytest.approx(math.sqrt(20 / 3))
    assert paired["0.1"]["n"] == 4
    # standard error over evaluation seeds: seed 0's mean (10 + 6) / 2 = 8, seed 1's (4 + 8) / 2 = 6; their
    # sample std √2, over √2 seeds: 1
    assert paired["0.1"]["sem"] == pytest.approx(1.0)


def test_paired_differences_are_antisymmetric_where_every_run_has_a_partner():
    runs = {
        "a": RUNS["random"],
        "b": [
            {**run, "accuracy": {k: v + 3 * run["eval_seed"] for k, v in run["accuracy"].items()}}
            for run in RUNS["random"]
        ],
    }
    # b - a at eval seeds 0, 1, 2: 0, 3, 6 -> mean 3, sample variance (9 + 0 + 9) / 2 = 9
    # (one pair per evaluation seed: the standard error is std / √n = 3 / √3)
    assert paired_differences(runs, "b", "a") == {
        "0.1": {"mean": 3.0, "std": 3.0, "n": 3, "sem": pytest.approx(math.sqrt(3))},
        "1.0": {"mean": 3.0, "std": 3.0, "n": 3, "sem": pytest.approx(math.sqrt(3))},
    }
    assert paired_differences(runs, "a", "b")["0.1"] == {
        "mean": -3.0,
        "std": 3.0,
        "n": 3,
        "sem": pytest.approx(math.sqrt(3)),
    }


def test_markdown_table_shows_mean_std_count_the_standard_error_of_differences_and_a_dash_for_a_missing_fraction():
    table = markdown_table(summarise(RUNS), {"mkdt - random": paired_differences(RUNS, "mkdt", "random")})
    assert "| pre-training set | 10% labels | 100% labels |" in table
    assert "| random | 52.0 ± 2.0 (3) | 82.0 ± 2.0 (3) |" in table
    assert "| mkdt | 61.2 ± 5.4 (5) | – |" in table
    assert "| mkdt - random | +7.0 ± 1.0 s.e. (sd 2.6, n 4) | – |" in table


def test_two_distilled_methods_pair_by_evaluation_and_distillation_seed():
    """mkdt − krr_st: each MKDT set against the KRR-ST set of the same distillation seed, at the same
    evaluation seed; a set without a partner (distill seed 1 has no KRR-ST set) is left out."""
    krr_st = [
        {"eval_seed": 0, "distill_seed": 0, "accuracy": {"0.1": 55.0}},
        {"eval_seed": 1, "distill_seed": 0, "accuracy": {"0.1": 61.0}},
        {"eval_seed": 0, "distill_seed": 2, "accuracy": {"0.1": 10.0}},
    ]
    paired = paired_differences({**RUNS, "krr_st": krr_st}, "mkdt", "krr_st")
    # (0, 0): 60 − 55 = 5; (1, 0): 58 − 61 = −3; mean 1, sample variance (16 + 16) / 1 = 32
    assert paired["0.1"]["n"] == 2
    assert paired["0.1"]["mean"] == pytest.approx(1.0)
    assert paired["0.1"]["std"] == pytest.approx(math.sqrt(32))


def test_the_report_says_whether_mtt_ssl_s_matching_loss_fell_below_one():
    from sslkd.stages.report import matching_section

    runs = [
        {"eval_seed": 0, "distill_seed": 0, "matching_loss_final": 1.02, "accuracy": {}},
        {"eval_seed": 1, "distill_seed": 0, "matching_loss_final": 1.02, "accuracy": {}},
        {"eval_seed": 0, "distill_seed": 1, "matching_loss_final": 0.93, "accuracy": {}},
    ]
    section = matching_section(runs)
    assert "| 0 | 1.0200 | no |" in section and "| 1 | 0.9300 | yes |" in section
    assert matching_section([{"eval_seed": 0, "distill_seed": 0, "accuracy": {}}]) == ""
