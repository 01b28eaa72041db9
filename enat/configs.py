"""ENAT configurations, named by their numbers, and the published sampling settings.

A configuration name spells out every size: ``e22d2-c1024h16-l256`` is 22 encoder
blocks, 2 decoder blocks, width 1024, 16 heads, 256 tokens (16 x 16).  Optional
``-v<codebook>`` and ``-k<classes>`` suffixes change the token and label spaces
(default 1024 codes and 1000 classes, those of the released checkpoints and of the
MaskGIT VQGAN).  Any such name parses, so a new size needs no code; the published
ENAT-L models also have the aliases ``enat-l-256`` and ``enat-l-512``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

_NAME = re.compile(r"^e(\d+)d(\d+)-c(\d+)h(\d+)-l(\d+)(?:-v(\d+))?(?:-k(\d+))?$")


# Largest model a configuration may describe (parameters); far above any ENAT.
MAX_PARAMS = 10**11


@dataclass(frozen=True)
class ENATConfig:
    depth_enc: int  # NE: encoder blocks (visible tokens)
    depth_dec: int  # ND: decoder blocks (masked tokens)
    width: int  # C
    heads: int  # H (head_dim D = C / H)
    tokens: int  # L = h * w
    codebook_size: int = 1024  # V; the mask token id is V
    num_classes: int = 1000  # K; label K is the null class for guidance
    mlp_ratio: int = 4

    def __post_init__(self):
        for field in ("depth_enc", "depth_dec", "width", "heads", "tokens", "codebook_size", "num_classes", "mlp_ratio"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if field == "depth_enc" else 1):
                raise ValueError(f"ENATConfig.{field} must be a positive int, got {value!r}")
        if self.width % self.heads:
            raise ValueError(f"width ({self.width}) must be divisible by heads ({self.heads})")
        side = math.isqrt(self.tokens)
        if side * side != self.tokens:
            raise ValueError(f"tokens ({self.tokens}) must be a square number (an h x w token map with h = w)")
        if self.num_params() > MAX_PARAMS:
            # Checked before any allocation: a typo such as e99999999d1 would otherwise
            # allocate for minutes before failing.
            raise ValueError(f"configuration {self.name} has {self.num_params():.3g} parameters, above the limit of "
                             f"{MAX_PARAMS:.0e} ({4 * MAX_PARAMS / 2**30:.0f} GiB in float32); ENAT-L has 0.3e9")

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def grid(self) -> tuple[int, int]:
        side = math.isqrt(self.tokens)
        return side, side

    @property
    def mask_id(self) -> int:
        return self.codebook_size

    @property
    def null_label(self) -> int:
        return self.num_classes

    @property
    def name(self) -> str:
        s = f"e{self.depth_enc}d{self.depth_dec}-c{self.width}h{self.heads}-l{self.tokens}"
        if self.codebook_size != 1024:
            s += f"-v{self.codebook_size}"
        if self.num_classes != 1000:
            s += f"-k{self.num_classes}"
        return s

    def num_params(self) -> int:
        """Parameter count of the model with this configuration (all checkpoint tensors)."""
        C, V, K, L, F = self.width, self.codebook_size, self.num_classes, self.tokens, self.mlp_ratio * self.width
        linear = lambda i, o: i * o + o  # noqa: E731
        mlp = linear(C, F) + linear(F, C)
        block = linear(C, C) + 2 * linear(C, 2 * C) + linear(C, C) + mlp + linear(C, 8 * C)
        embed = (V + 1) * C + L * C + 2 * C + (K + 1) * C
        head = 2 * C + linear(C, C) + 2 * C + (V + 1)
        return embed + mlp + (2 * C + mlp) + (self.depth_enc + self.depth_dec) * block + head


ALIASES = {
    # Published ENAT-L (NeurIPS 2024): ImageNet 256 px (16x16 tokens) and 512 px (32x32).
    "enat-l-256": "e22d2-c1024h16-l256",
    "enat-l-512": "e22d2-c1024h16-l1024",
}

# Sizes this project uses (any name of the pattern works; these are the documented ones).
NAMED = {
    "e22d2-c1024h16-l256": "ENAT-L, ImageNet 256 px (released checkpoint nnet_ema.pth)",
    "e22d2-c1024h16-l1024": "ENAT-L, ImageNet 512 px (released checkpoint nnet_ema_512.pth)",
    "e4d2-c256h4-l256": "CPU demo: the default of enat-sample (256 tokens, head_dim 64)",
    "e2d1-c64h2-l64": "tests: small, head_dim 32",
    "e2d1-c32h2-l16-v64-k10": "tests: tiny (Triton interpreter), head_dim 16",
}

DEFAULT_CONFIG = "e4d2-c256h4-l256"


def get_config(name: str) -> ENATConfig:
    """The configuration called `name` (an alias or a name of the e#d#-c#h#-l# pattern)."""
    if isinstance(name, ENATConfig):
        return name
    key = ALIASES.get(name.lower(), name.lower())
    m = _NAME.match(key)
    if m is None:
        known = ", ".join(list(ALIASES) + list(NAMED))
        raise ValueError(
            f"unknown ENAT configuration {name!r}: expected an alias or a name like "
            f"'e22d2-c1024h16-l256' (encoder blocks, decoder blocks, width, heads, tokens"
            f"[, -v<codebook>][, -k<classes>]); documented ones: {known}"
        )
    ne, nd, c, h, tokens, v, k = m.groups()
    return ENATConfig(int(ne), int(nd), int(c), int(h), int(tokens),
                      codebook_size=int(v) if v else 1024, num_classes=int(k) if k else 1000)


@dataclass(frozen=True)
class SamplingSettings:
    steps: int = 8
    cfg_scale: float = 2.5
    mask_temp: float = 1.5
    samp_temp: float = 6.0


# Published settings (ENAT README / paper), keyed by token count.
PUBLISHED_SAMPLING = {
    256: SamplingSettings(steps=8, cfg_scale=2.5, mask_temp=1.5, samp_temp=6.0),  # ImageNet 256
    1024: SamplingSettings(steps=8, cfg_scale=3.5, mask_temp=1.5, samp_temp=4.0),  # ImageNet 512
}


def sampling_settings(config: ENATConfig) -> SamplingSettings:
    """The published settings for this token count (the 256 px ones otherwise)."""
    return PUBLISHED_SAMPLING.get(config.tokens, PUBLISHED_SAMPLING[256])
