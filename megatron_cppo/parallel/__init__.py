"""Parallel setup and one file per parallel primitive."""

from megatron_cppo.parallel.state import (
    ParallelConfig,
    ParallelState,
    check_model_divisibility,
    destroy_parallel,
    initialize_parallel,
)

__all__ = ["ParallelConfig", "ParallelState", "check_model_divisibility", "destroy_parallel",
           "initialize_parallel"]
