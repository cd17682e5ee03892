"""Transfer and fine-tuning: the bookkeeping of results/transfer.json (pairing across methods, schema, paired
differences against hand-computed values), the fine-tuning protocol (lr groups, learning, determinism),
the downstream images (channels) and bad input (one line, exit code 2)."""

from __future__ import annotations

import dataclasses
import math
import os

import pytest
import torch

from sslkd.cli import main
from sslkd.data.augmentations import padded_crop_flip
from sslkd.errors import SslkdError
from sslkd.evaluation.fine_tune import Classifier, accuracy, fine_tune, fine_tune_at_fractions, parameter_groups
from sslkd.evaluation.probe import FineTuneConfig
from sslkd.evaluation.transfer import (
    DownstreamConfig,
    TransferConfig,
    downstream_evaluation,
    downstream_key,
    match_channels,
)
from sslkd.methods.experts import build_student
from sslkd.models import ConvNetConfig
from sslkd.stages.report import protocol_table, transfer_tables
from sslkd.store.artifacts import save_artifact

from conftest import make_workspace

# Two downstream sets. On "a": random at evaluation seeds 0 and 1; MKDT from two distilled sets (distillation
# seeds 0 and 1) at both seeds, fine-tuned too; no_pretrain at seed 0 only. On "b": random and MKDT at seed 0.
TRANSFERS = {
    "random": {
        "downstream": {
            "a": {
                "runs": [
                    {"eval_seed": 0, "distill_seed": None, "accuracy": {"0.1": 20.0}, "fine_tune": {"0.1": 30.0}},
                    {"eval_seed": 1, "distill_seed": None, "accuracy": {"0.1": 24.0}, "fine_tune": {"0.1": 34.0}},
                ]
            },
            "b": {"runs": [{"eval_seed": 0, "distill_seed": None, "accuracy": {"0.1": 40.0}}]},
        }
    },
    "mkdt": {
        "downstream": {
            "a": {
                "runs": [
                    {"eval_seed": 0, "distill_seed": 0, "accuracy": {"0.1": 25.0}, "fine_tune": {"0.1": 31.0}},
                    {"eval_seed": 0, "distill_seed": 1, "accuracy": {"0.1": 21.0}, "fine_tune": {"0.1": 33.0}},
                    {"eval_seed": 1, "distill_seed": 0, "accuracy": {"0.1": 27.0}, "fine_tune": {"0.1": 35.0}},
                    {"eval_seed": 1, "distill_seed": 1, "accuracy": {"0.1": 23.0}, "fine_tune": {"0.1": 37.0}},
                ]
            },
            "b": {"runs": [{"eval_seed": 0, "distill_seed": 0, "accuracy": {"0.1": 41.0}}]},
        }
    },
    "no_pretrain": {"downstream": {"a": {"runs": [{"eval_seed": 0, "distill_seed": None, "accuracy": {"0.1": 10.0}}]}}},
}


def test_transfer_json_has_each_downstream_s_methods_and_paired_differences():
    table = transfer_tables(TRANSFERS, "linear_probe")
    assert set(table) == {"a", "b"}
    assert set(table["a"]) == {"random", "mkdt", "no_pretrain", "mkdt - random", "mkdt - no_pretrain"}
    assert set(table["b"]) == {"random", "mkdt", "mkdt - random"}
    for rows in table.values():
        for name, cells in rows.items():
            paired = {"sem"} if " - " in name else set()
            assert set(cells) == {"0.1"} and set(cells["0.1"]) == {"mean", "std", "n"} | paired


def test_transfer_paired_differences_pair_by_evaluation_seed_for_every_distilled_set():
    a = transfer_tables(TRANSFERS, "linear_probe")["a"]
    # mkdt - random: seed 0: 25 - 20 = 5, 21 - 20 = 1; seed 1: 27 - 24 = 3, 23 - 24 = -1 -> mean 2,
    # squared deviations 9 + 1 + 1 + 9 = 20, sample variance 20 / 3
    assert a["mkdt - random"]["0.1"]["mean"] == pytest.approx(2.0)
    assert a["mkdt - random"]["0.1"]["std"] == pytest.approx(math.sqrt(20 / 3))
    assert a["mkdt - random"]["0.1"]["n"] == 4
    # mkdt - no_pretrain: only seed 0 has a no_pretrain run: 25 - 10 = 15, 21 - 10 = 11
    assert a["mkdt - no_pretrain"]["0.1"] == {"mean": 13.0, "std": pytest.approx(math.sqrt(8)), "n": 2, "sem": 0.0}
    assert a["mkdt"]["0.1"]["mean"] == pytest.approx(24.0) and a["mkdt"]["0.1"]["n"] == 4
    assert transfer_tables(TRANSFERS, "linear_probe")["b"]["mkdt - random"]["0.1"] == {
        "mean": 1.0,
        "std": 0.0,
        "n": 1,
        "sem": 0.0,
    }


def test_fine_tuning_tables_hold_only_the_fine_tuned_runs():
    table = transfer_tables(TRANSFERS, "fine_tune")
    assert set(table) == {"a"}  # nothing was fine-tuned on b
    assert set(table["a"]) == {"random", "mkdt", "mkdt - random"}  # no_pretrain was not fine-tuned
    # seed 0: 31 - 30 = 1, 33 - 30 = 3; seed 1: 35 - 34 = 1, 37 - 34 = 3 -> mean 2, variance 4 / 3
    assert table["a"]["mkdt - random"]["0.1"]["mean"] == pytest.approx(2.0)
    assert table["a"]["mkdt - random"]["0.1"]["std"] == pytest.approx(math.sqrt(4 / 3))
    assert protocol_table({"random": TRANSFERS["no_pretrain"]["downstream"]["a"]["runs"]}, "fine_tune") == {}


def test_padded_crop_flip_takes_windows_of_the_padded_image_and_is_seeded():
    images = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).view(2, 3, 5, 5)
    out = padded_crop_flip(images, 2, torch.Generator().manual_seed(0))
    assert out.shape == images.shape
    assert torch.equal(out, padded_crop_flip(images, 2, torch.Generator().manual_seed(0)))
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    for index in range(2):
        windows = [
            window
            for top in range(5)
            for left in range(5)
            for window in (padded[index, :, top : top + 5, left : left + 5],)
            for window in (window, window.flip(-1))
        ]
        assert any(torch.equal(out[index], window) for window in windows)
    many = images[:1].expand(64, -1, -1, -1)
    flipped = padded_crop_flip(many, 0, torch.Generator().manual_seed(1))  # no padding: flips only
    is_flipped = [torch.equal(view, images[0].flip(-1)) for view in flipped]
    assert all(f or torch.equal(view, images[0]) for f, view in zip(is_flipped, flipped))
    assert 10 < sum(is_flipped) < 54  # about half


CONFIG = FineTuneConfig(
    epochs=15, batch_size=16, lr=0.1, backbone_lr_factor=0.1, momentum=0.9, weight_decay=0.0, padding=1
)


def test_the_backbone_learns_at_a_tenth_of_the_head_s_lr():
    encoder = build_student(ConvNetConfig(width=4, depth=2), (1, 8, 8), 6, seed=0)
    model = Classifier(encoder, 3)
    backbone, head = parameter_groups(model, CONFIG)
    assert backbone["lr"] == pytest.approx(0.1 * head["lr"]) and head["lr"] == CONFIG.lr
    assert {id(p) for p in backbone["params"]} == {id(p) for p in model.trunk.parameters()}
    assert {id(p) for p in head["params"]} == {id(p) for p in model.head.parameters()}
    # the copy is trained, not the encoder
    assert all(p is not q for p, q in zip(model.trunk.parameters(), encoder.trunk.parameters()))


def separable_problem(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [count, 1, 8, 8]: class 0 bright in the top half, class 1 in the bottom half (flips keep it)."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % 2
    images = torch.randint(0, 60, (count, 1, 8, 8), generator=generator)
    for index, label in enumerate(labels):
        rows = slice(0, 4) if label == 0 else slice(4, 8)
        images[index, :, rows] += 180
    return images.to(torch.uint8), labels


def test_fine_tuning_learns_a_separable_problem_and_is_deterministic():
    train, train_labels = separable_problem(64, 0)
    test, test_labels = separable_problem(40, 1)
    encoder = build_student(ConvNetConfig(width=4, depth=2), (1, 8, 8), 6, seed=0)
    to_input = lambda pixels: (pixels - 0.4) / 0.3  # noqa: E731

    def run(seed: int) -> dict[str, float]:
        return fine_tune_at_fractions(
            encoder,
            train,
            train_labels,
            to_input(test.float() / 255.0),
            test_labels,
            to_input,
            (0.5,),
            CONFIG,
            lambda index: torch.Generator().manual_seed(10 + index),
            lambda index: torch.Generator().manual_seed(seed + index),
        )

    before = [p.clone() for p in encoder.parameters()]
    first = run(0)
    assert first["0.5"] > 90.0  # chance: 50
    assert run(0) == first
    assert all(torch.equal(p, q) for p, q in zip(before, encoder.parameters())), "the encoder is left as it was"
    model_a = fine_tune(
        encoder, train.float() / 255, train_labels, 2, to_input, CONFIG, torch.Generator().manual_seed(3)
    )
    model_b = fine_tune(
        encoder, train.float() / 255, train_labels, 2, to_input, CONFIG, torch.Generator().manual_seed(3)
    )
    assert all(torch.equal(p, q) for p, q in zip(model_a.parameters(), model_b.parameters()))
    assert accuracy(model_a, to_input(test.float() / 255), test_labels) > 90.0


def test_downstream_images_take_the_encoder_s_channels():
    grey = torch.randint(0, 256, (2, 1, 4, 4), dtype=torch.uint8)
    rgb = match_channels(grey, 3)
    assert rgb.shape == (2, 3, 4, 4) and all(torch.equal(rgb[:, c], grey[:, 0]) for c in range(3))
    assert torch.equal(match_channels(rgb, 1), grey)  # the luma weights sum to 1
    assert match_channels(grey, 1) is grey


def test_the_seed_key_of_a_downstream_set_is_its_name_s():
    assert downstream_key("tinyimagenet") == downstream_key("tinyimagenet") != downstream_key("cifar10")


def test_bad_transfer_configs_are_refused(tmp_path):
    from sslkd import config

    config.parse(REPO_GIN, "digits", [], ["sslkd.evaluate.seeds = [0]"])
    evaluate = config.build("evaluate")
    tiny = DownstreamConfig(name="tiny", dataset="tinyimagenet", holdout_fraction=0.1, split_seed=0)
    with pytest.raises(SslkdError, match="unknown dataset 'nope'"):
        DownstreamConfig(name="x", dataset="nope", holdout_fraction=0.1, split_seed=0)
    with pytest.raises(SslkdError, match="'tiny' has no files"):
        TransferConfig(downstream=(tiny,), evaluate=evaluate, files={})
    with pytest.raises(SslkdError, match="names a set twice"):
        TransferConfig(downstream=(tiny, tiny), evaluate=evaluate, files={"tiny": {"root": "x"}})
    with pytest.raises(SslkdError, match="must map 'root'"):
        TransferConfig(downstream=(tiny,), evaluate=evaluate, files={"tiny": {"path": "x"}})
    assert TransferConfig((tiny,), evaluate, {"tiny": {"root": "r.npz"}}).location(tiny) == ("r.npz", "")


def test_a_downstream_set_s_label_fractions_pick_its_probe_and_fine_tuning_fractions():
    from sslkd import config

    config.parse(
        REPO_GIN,
        "digits",
        [],
        [
            "sslkd.evaluate.seeds = [0]",
            "sslkd.probe.label_fractions = (0.01, 0.05, 0.1, 0.5)",
            "sslkd.fine_tune.label_fractions = (0.01, 0.05)",
        ],
    )
    evaluate = config.build("evaluate")
    assert evaluate.probe.label_fractions == (0.01, 0.05, 0.1, 0.5)
    same = DownstreamConfig(name="d", dataset="digits", holdout_fraction=0.3, split_seed=0)
    assert downstream_evaluation(evaluate, same) is evaluate
    on = dataclasses.replace(evaluate, protocols=("linear_probe", "fine_tune"))
    chosen = downstream_evaluation(on, dataclasses.replace(same, label_fractions=(0.05, 0.1)))
    assert chosen.probe.label_fractions == (0.05, 0.1) and chosen.fine_tune.label_fractions == (0.05,)
    assert chosen.fine_tunes
    none_tuned = downstream_evaluation(on, dataclasses.replace(same, label_fractions=(0.1, 0.5)))
    assert none_tuned.probe.label_fractions == (0.1, 0.5) and not none_tuned.fine_tunes
    with pytest.raises(SslkdError, match="label_fractions must lie in"):
        dataclasses.replace(same, label_fractions=(0.0,))


REPO_GIN = __import__("conftest").REPO / "gin"

NPZ_DOWNSTREAM = [
    "--bind",
    "sslkd.transfer.downstream = (@x/sslkd.downstream(),)",
    "--bind",
    "x/sslkd.downstream.name = 'x'",
    "--bind",
    "x/sslkd.downstream.holdout_fraction = 0.2",
    "--bind",
    "x/sslkd.downstream.split_seed = 0",
]


def run_transfer(root, capsys, dataset: str) -> tuple[int, str]:
    cwd = os.getcwd()
    os.chdir(root)
    try:
        code = main(
            ["transfer", "--method", "random", *NPZ_DOWNSTREAM, "--bind", f"x/sslkd.downstream.dataset = '{dataset}'"]
        )
    finally:
        os.chdir(cwd)
    return code, capsys.readouterr().err


@pytest.fixture
def transfer_workspace(tmp_path):
    """A workspace whose params name a missing .npz for downstream x, with the random method's encoders."""
    root = make_workspace(tmp_path)
    params = root / "params.yaml"
    params.write_text(
        params.read_text().replace(
            "    tinyimagenet:\n", f"    x:\n      root: {tmp_path / 'missing.npz'}\n    tinyimagenet:\n"
        )
    )
    encoder = build_student(ConvNetConfig(width=8, depth=3), (1, 8, 8), 4, seed=0)
    save_artifact(
        root / "artifacts" / "encoders" / "random.pt",
        "encoders",
        {
            "method": "random",
            "encoder": {"width": 8, "depth": 3},
            "image_shape": [1, 8, 8],
            "out_dim": 4,
            "input_space": "standardised",
            "horizons": ["equal_steps"],
            "encoders": [
                {"eval_seed": 0, "distill_seed": None, "horizon": "equal_steps", "state_dict": encoder.state_dict()}
            ],
        },
    )
    return root


def test_a_missing_downstream_file_is_one_line_and_exit_code_2(transfer_workspace, capsys):
    code, err = run_transfer(transfer_workspace, capsys, "npz")
    assert code == 2
    assert err.count("\n") == 1 and "missing.npz" in err and "not found" in err
    assert not (transfer_workspace / "artifacts" / "transfer" / "random.json").exists()


def test_an_unknown_downstream_dataset_is_one_line_and_exit_code_2(transfer_workspace, capsys):
    code, err = run_transfer(transfer_workspace, capsys, "imagenet22k")
    assert code == 2 and err.count("\n") == 1 and "unknown dataset 'imagenet22k'" in err


def test_missing_encoders_name_the_stage_to_run(transfer_workspace, capsys):
    (transfer_workspace / "artifacts" / "encoders" / "random.pt").unlink()
    code, err = run_transfer(transfer_workspace, capsys, "digits")
    assert code == 2 and err.count("\n") == 1 and "sslkd evaluate --method random" in err


def test_transfer_to_digits_writes_paired_runs_of_every_encoder(transfer_workspace):
    from sslkd.store.artifacts import load_json_artifact

    cwd = os.getcwd()
    os.chdir(transfer_workspace)
    try:
        assert (
            main(["transfer", "--method", "random", *NPZ_DOWNSTREAM, "--bind", "x/sslkd.downstream.dataset = 'digits'"])
            == 0
        )
    finally:
        os.chdir(cwd)
    result = load_json_artifact(
        transfer_workspace / "artifacts" / "transfer" / "random.json", "transfer", produced_by="transfer"
    )
    entry = result["downstream"]["x"]
    assert entry["classes"] == 10 and entry["dataset"] == "digits"
    (run,) = entry["runs"]
    assert run["eval_seed"] == 0 and set(run["accuracy"]) == {"0.05", "0.5"}
    assert set(run["fine_tune"]) == {"0.05", "0.5"}  # tiny.gin fine-tunes
    assert all(0 <= value <= 100 for value in run["accuracy"].values())


def test_report_without_transfer_results_says_which_stage_to_run_and_writes_nothing(tmp_path, capsys):
    from sslkd.stage_configs import METHODS
    from sslkd.store.artifacts import save_json_artifact

    root = make_workspace(tmp_path)
    for method in METHODS:
        runs = [{"eval_seed": 0, "distill_seed": None, "horizon": "equal_steps", "accuracy": {"0.5": 50.0}}]
        save_json_artifact(
            root / "artifacts" / "evaluate" / f"{method}.json", "evaluation", {"method": method, "runs": runs}
        )
    cwd = os.getcwd()
    os.chdir(root)
    try:
        code = main(["report", "--no-tracking"])
    finally:
        os.chdir(cwd)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "sslkd transfer --method no_pretrain" in err
    assert not (root / "results").exists() or not any((root / "results").iterdir())
