"""Test-session setup shared by every test module."""

import os

# Several multi-process tests start ranks with fork. A forked child inherits the parent's
# OpenMP thread pool in a state it cannot use, and its first parallel matmul hangs; with a
# single intra-op thread the parent never creates that pool. The tests use tiny tensors.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

# Without a GPU, the Triton kernels are checked in Triton's interpreter on CPU tensors. The
# interpreter must be chosen before any module imports triton (lightning does), hence here.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
