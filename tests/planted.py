"""Planted models and helpers shared by the activation-aware solver tests."""

import math

import torch
import torch.nn.functional as F

from torch_lowrank import solvers

f64 = torch.float64
ACT = {
    "relu": torch.relu,
    "leaky_relu": lambda a: F.leaky_relu(a, 0.01),
    "relu6": F.relu6,
    "gelu": F.gelu,
    "silu": F.silu,
    "tanh": torch.tanh,
}


def linear_start(weight, bias, x, rank):
    return solvers.linear(weight, bias, x.mean(0), torch.cov(x.T, correction=0), rank=rank)


def post_error(weight, bias, factors, x, act=torch.relu) -> float:
    """Mean squared post-activation error ``E || act(Z x + c) - act(W x + b) ||^2`` on ``x``."""
    target = act(x @ weight.T + bias)
    approx = act(x @ factors.down.T @ factors.up.T + factors.bias)
    return (approx - target).square().sum(1).mean().item()


def output_variance(weight, bias, x, act=torch.relu) -> float:
    return act(x @ weight.T + bias).var(0, correction=0).sum().item()


def planted(seed, alive=6, dead=6, n=8, r=2, margin=1.0, sigma=0.0):
    """A dense layer whose post-activations are those of the rank-r model ``act(Z* x + c*)``.

    Inputs are uniform on ``[-1, 1]^n``. The first ``alive`` units are ``Z* x + c*`` with
    ``rank Z* = r``; the ``dead`` units have large full-rank weights and a bias below
    ``-(||w||_1 + margin)``, so they are negative on every input: ReLU (and, for a large enough
    margin, GELU/SiLU) maps them to (about) zero, but they dominate the output covariance, so
    the ``linear`` recovery spends its rank on them. With ``sigma > 0`` the pre-activations get
    Gaussian noise, entering as ``m`` extra input columns with weight ``sigma * I``.
    Returns ``weight, bias, sample`` with ``sample(N)`` drawing ``N`` input rows.
    """
    gen = torch.Generator().manual_seed(seed)
    z_star = torch.randn(alive, r, generator=gen, dtype=f64) @ torch.randn(
        r, n, generator=gen, dtype=f64
    )
    c_star = 0.3 * torch.randn(alive, generator=gen, dtype=f64)
    d = 3.0 * torch.randn(dead, n, generator=gen, dtype=f64)
    weight = torch.cat([z_star / math.sqrt(n), d])
    bias = torch.cat([c_star, -(d.abs().sum(1) + margin)])
    m = alive + dead
    if sigma > 0:
        weight = torch.cat([weight, sigma * torch.eye(m, dtype=f64)], 1)

    def sample(rows):
        x = 2 * torch.rand(rows, n, generator=gen, dtype=f64) - 1
        if sigma > 0:
            x = torch.cat([x, torch.randn(rows, m, generator=gen, dtype=f64)], 1)
        return x

    return weight, bias, sample


def assert_orthonormal(up, atol=1e-10):
    eye = torch.eye(up.shape[1], dtype=up.dtype)
    torch.testing.assert_close(up.T @ up, eye, atol=atol, rtol=0)
