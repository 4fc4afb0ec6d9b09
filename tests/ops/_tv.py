"""Shared inputs of the task-vector ops' tests (tv_combine, tv_coef_grad): a flat parameter vector cut into
segments by int64 offsets."""

import torch

SIZES = [[1], [7, 0, 5], [5000, 17, 40000, 3], [0]]


def offsets(sizes):
    return torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()], dtype=torch.int64)
