"""Suite-wide settings: one torch thread per test process.

Tests use tiny tensors, where a second intra-op thread only adds contention (measured up to ~300x
slower on a loaded 2-core machine); `make test` runs two pytest workers instead.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
