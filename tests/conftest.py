"""Test-session set-up."""

import os

# Triton kernels are checked in Triton's interpreter on machines without a GPU. The variable must be set before
# anything imports triton (later imports reuse the first one's mode), so it is set here, first.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
