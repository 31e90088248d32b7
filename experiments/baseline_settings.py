"""The recipes of the paper's baselines FUSION and PEARL (defaults: the reference's),
kept apart from the methods so that the config and its checks can read them."""

from __future__ import annotations

import dataclasses

from grasp_jax import recipe


@dataclasses.dataclass(frozen=True)
class FusionConfig:
    """The reference's recipe: AdamW 5e-5, weight decay 0.01, cosine per epoch, no
    clipping, 3 epochs, best-validation epoch kept."""

    epochs: int = 3
    learning_rate: float = 5e-5
    weight_decay: float = 0.01
    augment: bool = True

    def __post_init__(self):
        if self.epochs < 1:
            raise ValueError(f"fusion.epochs={self.epochs}; train at least one epoch")
        if not self.learning_rate > 0:
            raise ValueError(f"fusion.learning_rate={self.learning_rate}; must be > 0")

    def recipe(self) -> recipe.TrainConfig:
        return recipe.fine_tuning(
            self.epochs, self.learning_rate, self.weight_decay, self.augment
        )


@dataclasses.dataclass(frozen=True)
class PearlConfig:
    rank: int = 16
    adapter_epochs: int = 3
    composition_epochs: int = 3
    learning_rate: float = 5e-5  # the reference's driver (its single run uses 1e-3)
    weight_decay: float = 0.01
    composition_learning_rate: float = 0.01
    augment: bool = True
    faithful: bool = False

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"pearl.rank={self.rank}; use a rank of at least 1")
        for name in ("adapter_epochs", "composition_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"pearl.{name}={getattr(self, name)}; use at least 1")
        for name in ("learning_rate", "composition_learning_rate"):
            if not getattr(self, name) > 0:
                raise ValueError(f"pearl.{name}={getattr(self, name)}; must be > 0")

    def adapter_recipe(self) -> recipe.TrainConfig:
        return recipe.fine_tuning(
            self.adapter_epochs, self.learning_rate, self.weight_decay, self.augment
        )

    def composition_recipe(self) -> recipe.TrainConfig:
        """Epochs, augmentation and the logged rate; the optimiser itself is
        `pearl.composition_optimizer` (Adam, constant rate, simplex projection)."""
        return recipe.fine_tuning(
            self.composition_epochs,
            self.composition_learning_rate,
            0.0,
            self.augment,
            schedule="constant",
        )
