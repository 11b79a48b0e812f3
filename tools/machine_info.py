"""Print the facts a test failure depends on: CPU model and cores, library versions, threads.

`make test` (and so CI) prints this before the suite, so a failure report shows the machine.
"""

from __future__ import annotations

import os
import platform
from importlib import metadata

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OPENBLAS_CORETYPE",
                    "TRITON_INTERPRET")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def main() -> None:
    import torch

    print(f"machine: {cpu_model()}, {os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable), "
          f"{platform.system()} {platform.machine()}, Python {platform.python_version()}; torch kernels "
          f"for {torch.backends.cpu.get_cpu_capability()}")
    print(f"versions: torch {torch.__version__}, numpy {version('numpy')}, triton {version('triton')}, "
          f"megatron-core {version('megatron-core')}; CUDA {'available' if torch.cuda.is_available() else 'none'}")
    env = ", ".join(f"{k}={os.environ[k]}" for k in THREAD_VARIABLES if k in os.environ) or "none set"
    print(f"threads: torch intra-op {torch.get_num_threads()}, inter-op {torch.get_num_interop_threads()}; "
          f"environment: {env}; {torch.__config__.parallel_info().splitlines()[-1].strip()}")
    blas = [line.strip() for line in torch.__config__.parallel_info().splitlines() if "Math Kernel" in line]
    print(f"BLAS: {blas[0] if blas else 'not MKL'}")


if __name__ == "__main__":
    main()
