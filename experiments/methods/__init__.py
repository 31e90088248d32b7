"""The methods an experiment compares, collected into one registry.

Each module defines its methods' `Method` entries (`experiments.context.Method`) next to
their runners: `grasp` (grasp, grasp_random), `finetune` (finetune, target_only),
`ensembles` (ensemble_soft and its alias ensemble, ensemble_prob, ensemble_vote),
`fusion`, `pearl`, `weight_merges` (soup, task_arithmetic, ties, dare, magmax, fisher).
Adding a method is adding an entry to one of them. `--config.methods=all` runs every
one but the aliases.
"""

from __future__ import annotations

from experiments import settings
from experiments.context import Method
from experiments.methods import ensembles, finetune, fusion, grasp, pearl, weight_merges

REGISTRY: dict[str, Method] = {
    method.name: method
    for module in (grasp, ensembles, fusion, pearl, weight_merges, finetune)
    for method in module.METHODS
}
# The methods that draw GRASP's alignment batches from a target's train split.
ALIGNING = frozenset(method.name for method in grasp.METHODS)
# Names that run another entry's method under the name earlier results used.
ALIASES = {m.name: m.alias_of for m in REGISTRY.values() if m.alias_of}


def selected(config) -> list[str]:
    """The methods `config.methods` asks for, "all" expanded (aliases left out)."""
    names = settings.requested_methods(config)
    if "all" in names:
        return [name for name in REGISTRY if name not in ALIASES]
    return names
