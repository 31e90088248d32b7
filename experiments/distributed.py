"""The multi-host flags every command takes, and joining the job they describe.

python -m experiments.main --config=clear100 --distributed     # TPU pods, SLURM, ...
python -m experiments.main --coordinator=HOST:PORT --num_processes=N --process_id=I
"""

from __future__ import annotations

import jax
from absl import flags

_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize (auto-detects TPU/SLURM/etc.)."
)
_COORDINATOR = flags.DEFINE_string("coordinator", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_CPU_COLLECTIVES = flags.DEFINE_string(
    "cpu_collectives", None, "CPU collectives between processes, e.g. 'gloo'."
)


def initialize() -> None:
    """Joins a multi-process job when any of the flags asks for one."""
    if _CPU_COLLECTIVES.value:
        jax.config.update("jax_cpu_collectives_implementation", _CPU_COLLECTIVES.value)
    if _DISTRIBUTED.value or _COORDINATOR.value:
        jax.distributed.initialize(
            coordinator_address=_COORDINATOR.value,
            num_processes=_NUM_PROCESSES.value,
            process_id=_PROCESS_ID.value,
        )
