"""`python -m microserve.kernels`: build the CPU kernels ahead of the first engine (setup.sh runs it)."""

import logging

from microserve.kernels import cpu_ops

logging.basicConfig(level=logging.INFO)
print("microserve CPU kernels:", "ready" if cpu_ops() is not None else "unavailable (torch's ops are used)")
