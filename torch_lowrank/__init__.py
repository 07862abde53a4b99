"""torch_lowrank: post-training low-rank compression as data-driven low-rank recovery.

The pre-activations a dense layer produces on calibration data are treated as noisy observations
of a low-rank model, which is recovered by minimising the reconstruction error of those
activations rather than the distance between weight matrices (Zhang & Saab, "Theoretical
Guarantees for Low-Rank Compression of Deep Neural Networks", arXiv 2502.02766).

Example:
    >>> import torch, torch_lowrank as tl
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    >>> model, report = tl.compress(model, [torch.randn(256, 64)], ratio=0.5)
    >>> report.params_after < report.params_before
    True
"""

from .conv import LowRankConv1d, LowRankConv2d
from .convert import convert
from .finetune import finetune_, merge_
from .hub import from_pretrained, save_pretrained
from .linear import LowRankLinear
from .model import calibrate, default_forward
from .options import METHODS
from .pipeline import compress
from .quantize import quantize_factors_
from .recover import recover_
from .report import LayerReport, Report
from .serialize import load_state_dict

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "LayerReport",
    "LowRankConv1d",
    "LowRankConv2d",
    "LowRankLinear",
    "Report",
    "calibrate",
    "compress",
    "convert",
    "default_forward",
    "finetune_",
    "from_pretrained",
    "load_state_dict",
    "merge_",
    "quantize_factors_",
    "recover_",
    "save_pretrained",
]
