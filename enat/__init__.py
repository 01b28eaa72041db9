"""ENAT (NeurIPS 2024) on enat_kernels: model, sampler, training (enat.training), checkpoints, scale-out, command lines.

    >>> import torch, enat
    >>> model = enat.ENAT("e4d2-c256h4-l256").eval()
    >>> tokens = enat.sample(model, torch.tensor([1, 2]), steps=8, cfg_scale=2.5,
    ...                      generator=torch.Generator().manual_seed(0))
"""

from .checkpoint import CheckpointError, infer_config, load_checkpoint, read_state_dict, save_checkpoint
from .configs import ALIASES, DEFAULT_CONFIG, NAMED, ENATConfig, SamplingSettings, get_config, sampling_settings
from .model import ENAT, ENATOutput, TokenCounts
from .sampler import CUDAGraphSampler, SamplingPlan, mask_schedule, sample

__all__ = [
    "ALIASES",
    "CUDAGraphSampler",
    "CheckpointError",
    "DEFAULT_CONFIG",
    "ENAT",
    "ENATConfig",
    "ENATOutput",
    "NAMED",
    "SamplingPlan",
    "SamplingSettings",
    "TokenCounts",
    "get_config",
    "infer_config",
    "load_checkpoint",
    "mask_schedule",
    "read_state_dict",
    "sample",
    "sampling_settings",
    "save_checkpoint",
]
