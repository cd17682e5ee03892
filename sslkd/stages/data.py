"""``sslkd data``: read the configured dataset, split and normalise it, write artifacts/data/dataset.pt."""

from __future__ import annotations

import dataclasses

from sslkd import config
from sslkd.data.datasets import Normalisation, check_dataset, load_dataset
from sslkd.stages.options import StageOptions
from sslkd.store.artifacts import save_artifact
from sslkd.store.workspace import Workspace


def main(workspace: Workspace, options: StageOptions) -> None:
    data_config = config.build("data")
    dataset = load_dataset(data_config)
    check_dataset(dataset, f"{data_config.dataset} {data_config.root}".strip())
    normalisation = Normalisation.of(dataset.train_images)
    save_artifact(
        workspace.dataset,
        "dataset",
        {
            "train_images": dataset.train_images,
            "train_labels": dataset.train_labels,
            "test_images": dataset.test_images,
            "test_labels": dataset.test_labels,
            "mean": normalisation.mean,
            "std": normalisation.std,
            "class_names": dataset.class_names,
            **(
                {}
                if dataset.pool_images is None
                else {"pool_images": dataset.pool_images, "pool_labels": dataset.pool_labels}
            ),
        },
        config=config.operative_config(),
        extra={
            "data": dataclasses.asdict(data_config),
            "normalisation": {
                "space": "per-channel standardised, [0,1] pixels",
                "mean": normalisation.mean.tolist(),
                "std": normalisation.std.tolist(),
            },
        },
    )
