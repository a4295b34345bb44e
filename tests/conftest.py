"""Test-wide setup.

Triton's interpreter must be chosen before Triton is first imported: without CUDA (this project's CI), the Triton
kernels run interpreted on CPU tensors, so they are tested against the reference executor everywhere.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
