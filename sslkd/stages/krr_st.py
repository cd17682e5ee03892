"""``sslkd krr_st``: the KRR-ST baseline, one synthetic set per seed -> artifacts/krr_st/synthetic_seed<seed>.pt.

The set starts from the init stage's random subset (drawn here with the same seed, so this stage does not
wait for the experts) and its teacher representations; the real batches' targets are the teacher's
representations of their augmented views.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from sslkd import config
from sslkd.data.datasets import InputSpace, ZCAWhitening
from sslkd.infra import tracking
from sslkd.infra.devices import stage_device
from sslkd.methods.experts import build_student
from sslkd.methods.krr_st import KrrStConfig, KrrStResult, distill_krr_st
from sslkd.methods.selection import random_indices
from sslkd.seeding import KrrStStream, generator
from sslkd.stages.inputs import representations, student_data, teacher_encoder
from sslkd.stages.options import StageOptions
from sslkd.store.artifacts import save_artifact
from sslkd.store.checkpoints import run_checkpoints
from sslkd.store.workspace import Workspace

log = logging.getLogger(__name__)


def teacher_space(space: InputSpace) -> InputSpace:
    """The space the teacher reads: the standardised images, also when the students see them whitened."""
    return space.normalisation if isinstance(space, ZCAWhitening) else space


def main(workspace: Workspace, options: StageOptions) -> None:
    krr_config = config.build("krr_st")
    device = stage_device()
    data = student_data(workspace)
    targets = representations(workspace, data)
    encoder = teacher_encoder(workspace, data).to(device).eval()
    standardise = teacher_space(data.space).apply

    @torch.no_grad()
    def teacher(pixels: torch.Tensor) -> torch.Tensor:
        return encoder(standardise(pixels)).float()

    indices = random_indices(len(data.images), krr_config.init.size, generator(krr_config.init.seed))
    real_pixels = data.space.invert(data.images).clamp(0.0, 1.0)
    run = run_checkpoints(
        options.checkpoints, "krr_st", krr_config, [workspace.dataset, workspace.representations, workspace.teacher]
    )
    for seed in krr_config.seeds:
        result = distill_krr_st(
            lambda init_seed: build_student(krr_config.student, data.image_shape, targets.shape[1], init_seed),
            data.images[indices].to(device),
            targets[indices].to(device),
            real_pixels.to(device),
            data.space.apply,
            teacher,
            krr_config,
            generator(seed, KrrStStream.TRAINING),
            generator(seed, KrrStStream.POOL),
            on_iteration=lambda iteration, loss: tracking.log_metrics({f"krr_loss/seed_{seed}": loss}, iteration),
            resume=run.load(f"seed{seed}"),
            on_checkpoint=run.saver(f"seed{seed}"),
        )
        save_krr_st_set(workspace, seed, result, indices, krr_config, data.space.name)
    run.clear()


def save_krr_st_set(
    workspace: Workspace,
    seed: int,
    result: KrrStResult,
    indices: torch.Tensor,
    krr_config: KrrStConfig,
    input_space: str,
) -> None:
    """artifacts/krr_st/synthetic_seed<seed>.pt: the set, its KRR losses and the drawn models' step counts;
    the sidecar records the fraction of kernels that came from untrained models."""
    untrained = sum(steps == 0 for steps in result.model_steps) / len(result.model_steps)
    log.info(
        "seed %d: KRR loss %.4f -> %.4f; %.0f%% of the kernels from untrained models",
        seed,
        result.losses[0],
        result.losses[-1],
        100 * untrained,
    )
    save_artifact(
        workspace.method_set("krr_st", seed),
        "synthetic",
        {
            "images": result.images.cpu(),
            "representations": result.representations.cpu(),
            "init_indices": indices,
            "losses": torch.tensor(result.losses),
            "model_steps": torch.tensor(result.model_steps),
            "input_space": input_space,
        },
        config=config.operative_config(),
        inputs={
            "dataset": workspace.dataset,
            "representations": workspace.representations,
            "teacher": workspace.teacher,
        },
        extra={
            "seed": seed,
            "krr_st": dataclasses.asdict(krr_config),
            "input_space": input_space,
            "loss_first": result.losses[0],
            "loss_last": result.losses[-1],
            "untrained_kernel_fraction": untrained,
        },
    )
