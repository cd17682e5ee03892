"""Strict configuration, and params.yaml, dvc.yaml and the gin files kept from drifting apart."""

from __future__ import annotations

import re
import typing

import pytest
import yaml

from sslkd import config
from sslkd.errors import SslkdError

from conftest import REPO

GIN = REPO / "gin"
SETTINGS = sorted(p.stem for p in (GIN / "settings").glob("*.gin"))
ROOTS = [stage for stage in config.STAGES]


def test_the_required_settings_exist():
    assert {
        "digits",
        "cifar10_cpu",
        "cifar10_2pct",
        "cifar10_5pct",
        "cifar100_2pct",
        "cifar100_5pct",
        "tinyimagenet_2pct",
        "tinyimagenet_5pct",
        "tinyimagenet_cpu",
    } <= set(SETTINGS)


@pytest.mark.parametrize("setting", SETTINGS)
def test_every_setting_binds_every_stage_root(setting):
    params = config.read_params(REPO / "params.yaml")
    config.parse(GIN, setting, [], params.bindings())
    for root in ROOTS:
        config.build(root)


CPU_SETTINGS = [setting for setting in SETTINGS if setting == "digits" or setting.endswith("_cpu")]


@pytest.mark.parametrize("setting", CPU_SETTINGS)
def test_a_cpu_setting_lowers_the_papers_krr_st_budget(setting):
    """gin/stages/baselines.gin binds the paper's 160k KRR-ST steps (days on a CPU); every CPU setting must
    lower them (tinyimagenet_cpu once inherited them and would not have finished)."""
    config.parse(GIN, setting, [], config.read_params(REPO / "params.yaml").bindings())
    assert config.build("krr_st").iterations <= 1000


def test_a_misspelled_binding_is_an_error():
    with pytest.raises(SslkdError, match="config error"):
        config.parse(GIN, "digits", [], ["sslkd.distill.lr_imgs = 3.0"])


def test_an_unknown_configurable_is_an_error():
    with pytest.raises(SslkdError, match="config error"):
        config.parse(GIN, "digits", [], ["sslkd.distil.iterations = 3"])


def test_an_unbound_parameter_is_named():
    config.parse(GIN, "digits", [], [])  # no params.yaml: the seeds are unbound
    with pytest.raises(SslkdError, match=r"sslkd.distill needs a binding for 'seeds'"):
        config.build("distill")


def test_an_unknown_setting_lists_the_available_ones():
    with pytest.raises(SslkdError, match="unknown setting 'digitz'.*available: .*digits"):
        config.parse(GIN, "digitz", [], [])


def gin_bound_keys() -> set[str]:
    """Every `sslkd.<name>.<param>` bound anywhere under gin/ (also in a scope: `teacher/sslkd.slurm.cpus`)."""
    keys = set()
    for path in GIN.rglob("*.gin"):
        for line in path.read_text().splitlines():
            match = re.match(r"\s*(?:\w+/)?(sslkd\.\w+\.\w+)\s*=", line)
            if match:
                keys.add(match.group(1))
    return keys


def test_params_yaml_values_have_one_source_of_truth():
    params = config.read_params(REPO / "params.yaml")
    assert (GIN / "settings" / f"{params.setting}.gin").is_file()
    bound = gin_bound_keys()
    for section, values in params.sections.items():
        names = config.parameter_names(section)
        for key in values:
            assert key in names, f"params.yaml {section}.{key} is not a parameter of sslkd.{section}"
            assert f"sslkd.{section}.{key}" not in bound, f"sslkd.{section}.{key} is bound in gin and params.yaml"


def test_every_gin_binding_names_a_real_parameter():
    for key in gin_bound_keys():
        _, name, parameter = key.split(".")
        assert parameter in config.parameter_names(name), f"{key} is not a parameter"


STUDIES = {"variance"}  # stages outside the default `dvc repro` (root dvc.yaml): studies/<stage>/dvc.yaml


def dvc_stages() -> tuple[dict, dict]:
    """(stages of the root dvc.yaml, stages of every studies/*/dvc.yaml)."""
    root = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    studies = {}
    for path in sorted((REPO / "studies").glob("*/dvc.yaml")):
        for stage, spec in yaml.safe_load(path.read_text())["stages"].items():
            assert (path.parent / spec.get("wdir", ".")).resolve() == REPO, f"{path}: {stage} must run in the repo root"
            studies[stage] = spec
    return root, studies


def test_dvc_stages_match_the_cli_and_track_their_params():
    root, studies = dvc_stages()
    dvc = {**root, **studies}
    params = config.read_params(REPO / "params.yaml")
    assert set(root) == set(config.STAGES) - STUDIES | {"check"}, "a study stage would slow down the default dvc repro"
    assert set(studies) == STUDIES
    check = dvc.pop("check")  # params.yaml's validation (sslkd/stages/check.py): every value, before data
    assert check["cmd"] == "sslkd check" and check["params"] == [{"params.yaml": None}]
    assert "artifacts/check" in root["data"]["deps"]
    for stage, spec in dvc.items():
        body = spec.get("do", spec)
        assert body["cmd"].split() == ["sslkd", stage] + (
            ["--method", "${key}"] if stage in ("evaluate", "transfer") else []
        )
        assert "setting" in body["params"]
        # the stage's own code and its setting (the full lists: tests/test_stage_deps.py)
        assert {f"sslkd/stages/{stage}.py", "gin/settings/${setting}.gin"} <= set(body["deps"])
        if stage in params.sections:
            assert stage in body["params"], f"dvc stage {stage} does not track params.yaml section {stage}"
        if stage in config.STUDENT_STAGES:
            assert "student_input" in body["params"], f"dvc stage {stage} does not track what its students see"
        else:
            assert "student_input" not in body["params"], f"dvc stage {stage} does not read student_input"
    from sslkd.stage_configs import METHODS

    assert set(dvc["evaluate"]["foreach"]) == set(dvc["transfer"]["foreach"]) == set(METHODS)


def test_a_stage_tracks_the_params_of_every_stage_config_it_embeds():
    """`variance` reads the experts, distill and init configs: their params.yaml values must rerun it."""
    root, studies = dvc_stages()
    params = config.read_params(REPO / "params.yaml")
    classes = config.configurables()
    for stage, spec in {**root, **studies}.items():
        if stage == "check":  # tracks every value of params.yaml
            continue
        field_types = set(typing.get_type_hints(classes[stage]).values())
        embedded = {name for name in config.STAGES if classes[name] in field_types}
        for section in embedded & set(params.sections):
            assert section in spec.get("do", spec)["params"], f"dvc stage {stage} must track params {section}"


def test_params_sections_must_be_stage_names(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("setting: digits\ndistil:\n  seeds: [0]\n")
    with pytest.raises(SslkdError, match="unknown section 'distil'"):
        config.read_params(path)
