"""Random ENAT models that react to their inputs, for tests.

`ENAT.reset_parameters` draws label embeddings with std 0.02 and small adaLN weights:
such a model barely depends on the label (guidance changes almost nothing) and its
attention contributes little to the logits, so a test comparing two implementations
of the model passes even when one of them has a wrong attention scale or swapped
modulation chunks.  `responsive_model` rescales the parameters that carry the
condition so that labels, gates, shifts and scales are of order 0.3 to 1.
"""

from __future__ import annotations

import torch

from enat import ENAT

# Standard deviations after rescaling (the adaLN outputs then come out at about 0.5).
LABEL_STD = 1.0
ADALN_WEIGHT_STD = 1.0 / 8  # times sqrt(C) |silu(c)| ~ 0.4 sqrt(C): outputs ~ 0.4 at C = 64
ADALN_BIAS_STD = 0.3


@torch.no_grad()
def make_responsive(model: ENAT, generator: torch.Generator) -> ENAT:
    """Redraw the label table and every block's adaLN Linear at order-one scales."""
    C = model.config.width
    model.y_embedder.embedding_table.weight.normal_(0.0, LABEL_STD, generator=generator)
    for blk in model.blocks:
        lin = blk.adaLN_modulation[1]
        lin.weight.normal_(0.0, ADALN_WEIGHT_STD * 8 / C**0.5, generator=generator)
        lin.bias.normal_(0.0, ADALN_BIAS_STD, generator=generator)
    return model


def responsive_model(config: str, *, seed: int, backend: str | None = "torch") -> ENAT:
    """An ENAT model in eval mode with reset_parameters(seed), then make_responsive."""
    model = ENAT(config, backend=backend).eval()
    gen = torch.Generator().manual_seed(seed)
    model.reset_parameters(gen)
    return make_responsive(model, gen)
