"""The multi-host flags every command takes, and joining the job they describe.

python -m experiments.main --config=clear100 --distributed     # TPU pods, SLURM, ...
python -m experiments.main --coordinator=HOST:PORT --num_processes=N --process_id=I
"""

from __future__ import annotations

from absl import flags


def define_flags() -> None:
    """The multi-host flags; a command calls this when it runs as a command."""
    flags.DEFINE_bool(
        "distributed",
        False,
        "Call jax.distributed.initialize (auto-detects TPU/SLURM/etc.).",
    )
    flags.DEFINE_string("coordinator", None, "host:port of process 0.")
    flags.DEFINE_integer("num_processes", None, "Processes in the job.")
    flags.DEFINE_integer("process_id", None, "This process's index.")
    flags.DEFINE_string(
        "cpu_collectives", None, "CPU collectives between processes, e.g. 'gloo'."
    )


def initialize() -> None:
    """Joins a multi-process job when any of the flags asks for one."""
    import jax

    given = flags.FLAGS
    if given.cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", given.cpu_collectives)
    if given.distributed or given.coordinator:
        jax.distributed.initialize(
            coordinator_address=given.coordinator,
            num_processes=given.num_processes,
            process_id=given.process_id,
        )
