"""``sslkd transfer --method M``: evaluate the encoders ``evaluate --method M`` pre-trained on every
downstream set of the setting (sslkd.transfer.downstream) -> artifacts/transfer/<method>.json.

Each downstream set is read like the data stage reads its set (datasets.load_dataset; its root and test
file are params.yaml's transfer.files.<name>), resized to the encoder's input size, made grey or RGB as the
encoder takes, and put in the students' kind of input space fit on its own training pool (standardised
with its statistics, ZCA-whitened too when the students are). Every encoder of the headline (first)
pre-training horizon is probed at the probe's label fractions of the downstream training pool (and
fine-tuned with 'fine_tune' in evaluate.protocols); the labelled subsets are drawn from the evaluation seed,
the downstream set's key and the fraction's index, so every method sees the same labels at a given seed and
runs pair across methods exactly as in-domain (sslkd/stages/report.py aggregates them).
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

import torch

from sslkd import config
from sslkd.data.datasets import StudentInputConfig
from sslkd.data.training_data import TrainingData
from sslkd.errors import SslkdError
from sslkd.evaluation.fine_tune import protocol_accuracies
from sslkd.evaluation.report import protocol_runs, summarise
from sslkd.evaluation.transfer import (
    DownstreamConfig,
    TransferConfig,
    downstream_data,
    downstream_evaluation,
    downstream_key,
)
from sslkd.infra import tracking
from sslkd.infra.devices import stage_device
from sslkd.methods.experts import build_student
from sslkd.models import ConvNetConfig
from sslkd.seeding import EvaluateStream, generator
from sslkd.stage_configs import METHODS
from sslkd.stages.options import StageOptions
from sslkd.store.artifacts import load_artifact, save_json_artifact
from sslkd.store.workspace import Workspace

log = logging.getLogger(__name__)


def check_encoders(payload: dict, student_input: StudentInputConfig, path: object) -> None:
    """Refuse encoders pre-trained on another kind of input than the students now see."""
    whitened = str(payload.get("input_space", "standardised")).startswith("zca")
    if whitened != student_input.zca:
        raise SslkdError(
            f"{path} holds encoders pre-trained on {payload.get('input_space')} images, but the students now see "
            f"{'ZCA-whitened' if student_input.zca else 'standardised'} images: rerun `sslkd evaluate`"
        )


def evaluate_downstream(
    downstream: DownstreamConfig,
    data: TrainingData,
    payload: dict,
    transfer_config: TransferConfig,
    device: torch.device,
) -> list[dict[str, Any]]:
    """One run per encoder of the headline horizon: {"eval_seed", "distill_seed", "horizon", "accuracy"
    (linear probe per label fraction)[, "fine_tune"]}."""
    headline = payload["horizons"][0]
    image_shape = tuple(payload["image_shape"])
    encoder_config = ConvNetConfig(**payload["encoder"])
    key = downstream_key(downstream.name)
    pool, test = data.images.to(device), data.test_images.to(device)
    runs = []
    for record in (r for r in payload["encoders"] if r["horizon"] == headline):
        eval_seed = record["eval_seed"]
        encoder = build_student(encoder_config, image_shape, payload["out_dim"], seed=0)
        encoder.load_state_dict(record["state_dict"])
        encoder.to(device)

        run: dict[str, Any] = {
            "eval_seed": eval_seed,
            "distill_seed": record["distill_seed"],
            "horizon": headline,
            **protocol_accuracies(
                encoder,
                pool,
                data,
                test,
                downstream_evaluation(transfer_config.evaluate, downstream),
                partial(generator, eval_seed, EvaluateStream.TRANSFER_LABELLED_SUBSET, key),
                partial(generator, eval_seed, EvaluateStream.TRANSFER_FINE_TUNING, key),
            ),
        }
        log.info(
            "%s eval seed %d%s: %s",
            downstream.name,
            eval_seed,
            "" if record["distill_seed"] is None else f" distill seed {record['distill_seed']}",
            ", ".join(f"{k}: {v:.1f}%" for k, v in run["accuracy"].items()),
        )
        runs.append(run)
    return runs


def log_downstream(method: str, name: str, runs: list[dict], protocols: tuple[str, ...]) -> None:
    """Tracking: ``acc/<downstream>/<fraction>`` (linear probe) and ``ft_acc/<downstream>/<fraction>``
    (fine-tuning) at step = evaluation seed, and ``..._mean`` / ``_std`` / ``_n`` over the runs at step 0."""
    for protocol, metric in (("linear_probe", "acc"), ("fine_tune", "ft_acc")):
        if protocol not in protocols:
            continue
        chosen = protocol_runs(runs, protocol)
        for run in chosen:
            tracking.log_metrics({f"{metric}/{name}/{k}": v for k, v in run["accuracy"].items()}, run["eval_seed"])
        for fraction, stats in summarise({method: chosen})[method].items():
            tracking.log_metrics({f"{metric}/{name}/{fraction}_{stat}": v for stat, v in stats.items()}, 0)


def main(workspace: Workspace, options: StageOptions) -> None:
    method = options.method
    if method not in METHODS:
        raise SslkdError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    transfer_config = config.build("transfer")
    student_input = config.build("student_input")
    results: dict[str, Any] = {}
    inputs = {}
    if transfer_config.downstream:
        device = stage_device()
        path = workspace.encoders(method)
        payload = load_artifact(path, "encoders", produced_by=f"evaluate --method {method}")
        check_encoders(payload, student_input, path)
        inputs["encoders"] = path
        image_shape = tuple(payload["image_shape"])
        for downstream in transfer_config.downstream:
            data = downstream_data(downstream, transfer_config.location(downstream), image_shape, student_input)
            runs = evaluate_downstream(downstream, data, payload, transfer_config, device)
            results[downstream.name] = {
                "dataset": downstream.dataset,
                "train_images": len(data.images),
                "test_images": len(data.test_images),
                "classes": int(data.labels.max()) + 1,
                "runs": runs,
            }
    save_json_artifact(
        workspace.transfer(method),
        "transfer",
        {"method": method, "downstream": results},
        config=config.operative_config(),
        inputs=inputs,
    )
    for name, entry in results.items():
        log_downstream(method, name, entry["runs"], transfer_config.evaluate.protocols)
    tracking.log_artifact(workspace.transfer(method))
