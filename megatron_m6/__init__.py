"""megatron_m6: pretraining M6 from one CPU to a SLURM GPU cluster (see ../shared/DESIGN.md)."""

import re
import sys

# The oldest torch the code runs on: FSDPModule.set_reduce_scatter_unused_params (data_parallel.py:
# ranks whose micro-batch has no image still reduce the image encoder's gradients) first shipped
# in torch 2.13; everything else used (fully_shard, DTensor placements, pipelining's
# ScheduleInterleavedZeroBubble, DeviceMesh backend_override) is older.
MIN_TORCH = (2, 13)


def _check_torch() -> None:
    """One clear line, not an ImportError from deep inside, when torch is missing or too old."""
    need = ".".join(map(str, MIN_TORCH))
    try:
        import torch
    except ImportError:
        sys.exit(f"error: megatron_m6 needs torch >= {need}, found none (pip install 'torch>={need}')")
    found = re.match(r"(\d+)\.(\d+)", torch.__version__)
    if found is None or tuple(map(int, found.groups())) < MIN_TORCH:
        sys.exit(f"error: megatron_m6 needs torch >= {need}, found {torch.__version__} "
                 f"(pip install 'torch>={need}')")


_check_torch()
