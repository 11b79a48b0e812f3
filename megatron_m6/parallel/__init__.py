"""Parallelism applied to the model from outside: the process mesh and the plans for tensor,
sequence and data parallelism (see DESIGN.md, "Parallelism")."""

from megatron_m6.parallel.mesh import ParallelDims, destroy_process_mesh, init_process_mesh, parallel_dims
from megatron_m6.parallel.parallelize import ParallelState, parallelize

__all__ = ["ParallelDims", "ParallelState", "destroy_process_mesh", "init_process_mesh", "parallel_dims", "parallelize"]
