"""Test-suite settings: the problems here are tiny, and on a 2-core machine shared by the
multi-process tests, intra-op threads only add contention (50x slower small matmuls)."""

import torch

torch.set_num_threads(1)
