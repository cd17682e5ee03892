"""KRR-ST (sslkd/methods/krr_st.py) and MTT-SSL (sslkd/methods/mtt_ssl.py): the closed form, its gradients, the model
pool's counters, and both stages through the real entry point on the toy setting."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from sslkd.cli import main
from sslkd.methods.experts import build_student
from sslkd.methods.krr_st import ModelPool, krr_loss, krr_predict, with_bias
from sslkd.models import ConvNetConfig
from sslkd.store.artifacts import load_artifact

from conftest import clone_study


@settings(max_examples=25)
@given(st.integers(1, 12), st.integers(1, 20), st.integers(1, 9), st.integers(1, 7), st.integers(0, 10_000))
def test_krr_prediction_is_the_ridge_regression_closed_form(m, b, f, d, seed):
    generator = torch.Generator().manual_seed(seed)
    features_syn = torch.randn(m, f, generator=generator, dtype=torch.float64)
    features_real = torch.randn(b, f, generator=generator, dtype=torch.float64)
    targets = torch.randn(m, d, generator=generator, dtype=torch.float64)
    ridge = 1e-3
    predicted = krr_predict(features_real, features_syn, targets, ridge)
    # the primal form of the same ridge regression: weights W [F + 1, D] = (ΦᵀΦ + λI)⁻¹ ΦᵀY, Ŷ = Φ_r W
    phi, phi_real = with_bias(features_syn), with_bias(features_real)
    lam = ridge * float((phi * phi).sum())
    weights = torch.linalg.inv(phi.T @ phi + lam * torch.eye(f + 1, dtype=torch.float64)) @ phi.T @ targets
    torch.testing.assert_close(predicted, phi_real @ weights, rtol=1e-7, atol=1e-8)


def test_krr_interpolates_the_synthetic_points_as_the_ridge_vanishes():
    generator = torch.Generator().manual_seed(0)
    features_syn = torch.randn(5, 12, generator=generator, dtype=torch.float64)  # K_ss [5, 5] invertible
    targets = torch.randn(5, 3, generator=generator, dtype=torch.float64)
    for ridge, tolerance in ((1e-6, 1e-4), (1e-10, 1e-8)):
        predicted = krr_predict(features_syn, features_syn, targets, ridge)
        assert torch.allclose(predicted, targets, atol=tolerance)
    assert not torch.allclose(krr_predict(features_syn, features_syn, targets, 1.0), targets, atol=1e-2)


def test_krr_loss_reaches_the_images_and_targets_not_the_model():
    model = build_student(ConvNetConfig(width=4, depth=2), (1, 8, 8), 3, seed=0)
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(6, 1, 8, 8, generator=generator, requires_grad=True)
    targets = torch.randn(6, 3, generator=generator, requires_grad=True)
    real, real_targets = torch.randn(10, 1, 8, 8, generator=generator), torch.randn(10, 3, generator=generator)
    loss = krr_loss(model, images, targets, real, real_targets, 1e-6)
    loss.backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert targets.grad is not None and targets.grad.abs().sum() > 0
    # the gradient is that of the loss (finite differences on one target entry)
    step = 1e-3
    with torch.no_grad():
        shifted = targets.clone()
        shifted[2, 1] += step
        numeric = (krr_loss(model, images, shifted, real, real_targets, 1e-6) - loss) / step
    assert abs(float(numeric) - float(targets.grad[2, 1])) < 1e-2 * max(1.0, abs(float(numeric)))


def pool(reset: bool, budget: int = 3) -> ModelPool:
    def build(seed: int):
        return build_student(ConvNetConfig(width=4, depth=2), (1, 8, 8), 3, seed=seed % 2**31)

    return ModelPool(
        build, 2, budget, lambda m: torch.optim.SGD(m.parameters(), lr=0.1), reset, torch.Generator().manual_seed(0)
    )


@pytest.mark.parametrize("reset", [True, False])
def test_the_pool_reinitialises_after_the_budget_and_resets_the_counter_only_when_asked(reset):
    models = pool(reset, budget=3)
    images, targets = torch.randn(4, 1, 8, 8), torch.randn(4, 3)
    assert all(0 <= c < 3 for c in models.counters) and models.trained == [0, 0]
    models.counters[0] = 0
    trained_steps = []
    for _ in range(8):
        before = models.models[0]
        models.advance(0, images, targets)
        trained_steps.append(models.trained[0])
        if models.trained[0] == 0:
            assert models.models[0] is not before  # re-initialised: a fresh model and optimiser
    if reset:
        # 3 steps, re-init, 3 steps, re-init: every model trains its whole budget again
        assert trained_steps == [1, 2, 3, 0, 1, 2, 3, 0]
        assert models.counters[0] == 0
    else:
        # upstream: the counter stays at the budget, so the model is re-initialised at every later draw
        assert trained_steps == [1, 2, 3, 0, 0, 0, 0, 0]
        assert models.counters[0] == 3


def test_an_sgd_step_moves_the_drawn_model_only():
    models = pool(True, budget=10)
    models.counters = [0, 0]
    before = [[p.detach().clone() for p in m.parameters()] for m in models.models]
    models.advance(1, torch.randn(4, 1, 8, 8), torch.randn(4, 3))
    assert all(torch.equal(a, b) for a, b in zip(before[0], models.models[0].parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(before[1], models.models[1].parameters()))


@pytest.fixture(scope="module")
def baselines(tiny_study, tmp_path_factory):
    """The toy study with krr_st, mtt_ssl and their evaluations run through the entry point."""
    root = clone_study(tiny_study, tmp_path_factory.mktemp("baselines"), ("data", "teacher", "represent", "init"))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        for argv in (["krr_st"], ["mtt_ssl"], ["evaluate", "--method", "krr_st"], ["evaluate", "--method", "mtt_ssl"]):
            assert main(argv) == 0, argv
    finally:
        os.chdir(cwd)
    return root


def test_the_stages_write_sets_that_evaluate_pretrains_on(baselines: Path):
    import json

    krr = load_artifact(baselines / "artifacts" / "krr_st" / "synthetic_seed0.pt", "synthetic", produced_by="krr_st")
    mtt = load_artifact(baselines / "artifacts" / "mtt_ssl" / "synthetic_seed0.pt", "synthetic", produced_by="mtt_ssl")
    assert krr["images"].shape[0] == 20 and len(krr["losses"]) == 3  # tiny.gin: init.size 20, 3 iterations
    assert mtt["objective"] == "barlow_twins" and len(mtt["matching_losses"]) == 3
    initial = load_artifact(
        baselines / "artifacts" / "represent" / "representations.pt", "representations", produced_by="represent"
    )
    # MTT-SSL learns the images only: its targets are the teacher's of the start images
    torch.testing.assert_close(mtt["representations"], initial["representations"][mtt["init_indices"]].float())
    for method in ("krr_st", "mtt_ssl"):
        runs = json.loads((baselines / "artifacts" / "evaluate" / f"{method}.json").read_text())["runs"]
        assert {run["distill_seed"] for run in runs} == {0} and all(run["accuracy"] for run in runs)
    mtt_runs = json.loads((baselines / "artifacts" / "evaluate" / "mtt_ssl.json").read_text())["runs"]
    assert all(run["matching_loss_final"] == pytest.approx(float(mtt["matching_loss_final"])) for run in mtt_runs)


def test_mtt_ssl_draws_its_sets_from_its_own_seeds_not_distill_s(baselines: Path, tmp_path, capsys):
    """mtt_ssl.seeds, not distill.seeds, names MTT-SSL's sets (a sweep over MKDT's seeds leaves it alone)."""
    root = clone_study(baselines, tmp_path / "seeds", ("data", "teacher", "represent", "init"))
    code, _ = run(
        capsys, root, "mtt_ssl", "--bind", "sslkd.mtt_ssl.seeds = [3]", "--bind", "sslkd.distill.seeds = [0, 1]"
    )
    assert code == 0
    assert sorted(p.name for p in (root / "artifacts" / "mtt_ssl").glob("*.pt")) == ["synthetic_seed3.pt"]


def run(capsys, root: Path, *argv: str) -> tuple[int, list[str]]:
    cwd = os.getcwd()
    os.chdir(root)
    try:
        code = main(list(argv))
    finally:
        os.chdir(cwd)
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["krr_st", "--bind", "sslkd.krr_st.ridge = 0.0"], "ridge > 0"),
        (["krr_st", "--bind", "sslkd.krr_st.pool_size = 0"], "pool_size"),
        (["krr_st", "--bind", "sslkd.krr_st.reset_step_counter = 1"], "must be bool"),
        (["mtt_ssl", "--bind", "sslkd.mtt_ssl.objective = 'kd'"], "unknown mtt_ssl.objective 'kd'"),
        (["mtt_ssl", "--bind", "sslkd.mtt_ssl.seeds = []"], "mtt_ssl.seeds must name at least one seed"),
    ],
)
def test_bad_config_values_end_in_one_line(tiny_study, tmp_path, capsys, argv, message):
    root = clone_study(tiny_study, tmp_path / "bad", ("data", "teacher", "represent"))
    code, err = run(capsys, root, *argv)
    assert code == 2 and len(err) == 1 and message in err[0]
    assert not (root / "artifacts" / argv[0]).exists()


def test_missing_inputs_and_sets_name_the_stage_to_run(tiny_study, tmp_path, capsys):
    root = clone_study(tiny_study, tmp_path / "missing", ("data",))
    code, err = run(capsys, root, "krr_st")
    assert code == 2 and "sslkd represent" in err[-1]
    root = clone_study(tiny_study, tmp_path / "noset", ("data", "represent"))
    code, err = run(capsys, root, "evaluate", "--method", "mtt_ssl")
    assert code == 2 and len(err) == 1 and "run `sslkd mtt_ssl` first" in err[0]


def krr_config(**overrides):
    from sslkd.data.augmentations import AugmentConfig
    from sslkd.methods.krr_st import KrrStConfig
    from sslkd.methods.selection import InitConfig

    values = dict(
        student=ConvNetConfig(width=4, depth=2),
        init=InitConfig(size=6, method="random", high_loss_scope="global", seed=0),
        augment=AugmentConfig((0.5, 1.0), True, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
        iterations=5,
        batch_real=8,
        lr_images=0.01,
        lr_representations=0.01,
        weight_decay=0.0,
        ridge=1e-6,
        pool_size=2,
        model_steps=2,
        model_lr=0.1,
        model_momentum=0.9,
        model_weight_decay=0.0,
        reset_step_counter=True,
        seeds=(0,),
    )
    return KrrStConfig(**{**values, **overrides})


def run_krr(config, resume=None, states=None):
    from sslkd.methods.krr_st import distill_krr_st

    generator = torch.Generator().manual_seed(3)
    pixels = torch.rand(20, 1, 8, 8, generator=generator)
    projection = torch.randn(64, 3, generator=generator)
    return distill_krr_st(
        lambda seed: build_student(config.student, (1, 8, 8), 3, seed=seed % 2**31),
        pixels[:6] * 2 - 1,
        pixels[:6].flatten(1) @ projection,
        pixels,
        lambda p: p * 2 - 1,
        lambda p: p.flatten(1) @ projection,
        config,
        torch.Generator().manual_seed(0),
        torch.Generator().manual_seed(1),
        resume=resume,
        # a copy, as the checkpoint files are: the state holds the live tensors
        on_checkpoint=None if states is None else lambda state: states.append(copy.deepcopy(state)),
    )


def test_krr_st_learns_and_resumes_bit_identically():
    config = krr_config()
    states: list[dict] = []
    full = run_krr(config, states=states)
    assert len(full.losses) == 5
    frozen = run_krr(krr_config(lr_images=0.0, lr_representations=0.0))
    assert not torch.equal(full.images, frozen.images) and not torch.equal(full.representations, frozen.representations)
    resumed = run_krr(config, resume=states[1])
    assert torch.equal(full.images, resumed.images) and torch.equal(full.representations, resumed.representations)
    assert full.losses == resumed.losses and full.model_steps == resumed.model_steps


@pytest.mark.parametrize("reset", [True, False])
def test_without_the_reset_every_kernel_comes_from_an_untrained_model_once_the_budgets_are_spent(reset):
    result = run_krr(krr_config(iterations=40, reset_step_counter=reset))
    late = result.model_steps[20:]  # pool 2 x budget 2: every counter has reached the budget by then
    if reset:
        assert any(steps > 0 for steps in late)
    else:
        assert all(steps == 0 for steps in late)
