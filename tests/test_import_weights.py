"""Starting an experiment from imported PyTorch weights: the reference-data configs and
`python -m experiments.import_weights`."""

from __future__ import annotations

import numpy as np
import pytest

from experiments import import_weights, methods, runner, settings, sources
from experiments.configs import clear10, clear100, yearbook
from grasp_jax import torch_models
from grasp_jax.checkpoints import CheckpointError


@pytest.mark.parametrize(
    ("module", "classes", "bins"), [(clear10, 10, 5), (clear100, 30, 5), (yearbook, 2, 4)]
)
def test_reference_configs_are_valid_for_every_model(module, classes, bins):
    for model in (None, "mobilevit_xxs", "mobilevit_xs", "efficientnet_b1", "resnet50"):
        config = module.get_config(model)
        assert config.num_classes == classes and len(config.bins) == bins
        assert config.model == (model or "mobilevit_xxs")
        assert settings.check(config, methods.REGISTRY) == list(config.bins)
        assert (config.pipeline.crop_size, config.pipeline.batch_size) == (224, 32)
        assert config.grasp.learning_rate == 5e-5 and config.source_training.epochs == 15
    with pytest.raises(ValueError, match="unknown model 'vit'"):
        module.get_config("vit")


def test_imagenet_init_reads_imported_weights_with_a_new_head(tmp_path):
    config = clear10.get_config("mobilevit_xxs")
    with pytest.raises(CheckpointError, match=r"python -m experiments\.import_weights"):
        sources.initial_variables(config, tmp_path, writer=None)

    imagenet = torch_models.randomize(torch_models.hf_model("mobilevit_xxs", 1000), seed=0)
    imagenet.save_pretrained(tmp_path / "hub")
    out = sources.imported_weights_dir(config, tmp_path)
    _, new_head = import_weights.import_weights(
        "mobilevit_xxs", str(tmp_path / "hub"), 10, str(out)
    )
    assert new_head
    variables = sources.initial_variables(config, tmp_path, writer=None)
    assert variables["params"]["classifier"]["kernel"].shape == (320, 10)
    stem = imagenet.state_dict()["mobilevit.conv_stem.convolution.weight"].numpy()
    np.testing.assert_array_equal(
        np.asarray(variables["params"]["mobilevit"]["conv_stem"]["convolution"]["kernel"]),
        stem.transpose(2, 3, 1, 0),
    )

    # A checkpoint whose head already has the data set's classes keeps it.
    _, new_head = import_weights.import_weights(
        "mobilevit_xxs", str(tmp_path / "hub"), 1000, str(tmp_path / "same")
    )
    assert not new_head


@pytest.mark.slow
def test_yearbook_experiment_runs_end_to_end_from_imported_weights(tmp_path):
    """`--config=yearbook:mobilevit_xxs` on a small Yearbook tree built here, from
    "ImageNet" weights (a 1000-class transformers checkpoint) imported with a new head:
    sources, GRASP and the ensemble, at 32 pixels and one epoch per stage."""
    from data.build import build
    from data.yearbook import PERIODS
    from tests.test_data_builders import make_bin

    periods = list(PERIODS)[:3]
    for period in periods:
        make_bin(tmp_path / "manual", period, PERIODS[period], split=True, per_class=10)
    build(
        "yearbook",
        manual_dir=tmp_path / "manual",
        data_dir=tmp_path / "tfds",
        configs=periods,
    )
    config = yearbook.get_config("mobilevit_xxs")
    config.data_dir = str(tmp_path / "tfds")
    config.bins = tuple(periods)
    config.targets = (periods[-1],)
    config.methods = ("grasp", "ensemble")
    config.trials = 1
    config.pipeline.resize_size, config.pipeline.crop_size = 40, 32
    config.pipeline.batch_size = 4
    config.source_training.epochs = 1
    config.grasp.initial_epochs = config.grasp.finetune_epochs = 1

    imagenet = torch_models.hf_model("mobilevit_xxs", 1000)
    imagenet.save_pretrained(tmp_path / "hub")
    import_weights.import_weights(
        "mobilevit_xxs",
        str(tmp_path / "hub"),
        2,
        str(sources.imported_weights_dir(config, tmp_path / "run")),
    )
    summary = runner.run_experiment(config, tmp_path / "run", progress=False)
    for method in ("grasp", "ensemble"):
        accuracy = summary["methods"][method]["test_accuracy_mean"]
        assert 0.0 <= accuracy <= 1.0, (method, accuracy)
        run = runner.run_name(config, periods[-1], method, 1)
        assert (tmp_path / "run/results/yearbook" / run / "metrics.json").exists()
