"""Loading and saving ENAT weights, strictly, with errors that name the offending key.

The released checkpoints (``nnet_ema.pth``, ``nnet_ema_512.pth``) are plain state
dicts; ``load_checkpoint`` also accepts one wrapped in a dict under "state_dict",
"model", "nnet_ema" or "ema" and strips a DistributedDataParallel "module." prefix.
"""

from __future__ import annotations

import os
import re
import warnings

import torch

from .configs import ENATConfig


class CheckpointError(ValueError):
    """The file is not a readable ENAT checkpoint, or does not fit the model."""


_WRAPPERS = ("state_dict", "model", "nnet_ema", "ema", "nnet")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file (weights only: no code in the file is run)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist or is not a file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated / non-torch files
        raise CheckpointError(f"cannot read checkpoint {path!r} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                              "is it a torch.save file, and complete?") from e
    for key in _WRAPPERS:
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise CheckpointError(f"checkpoint {path!r} does not hold a state dict (a dict of name -> tensor), got {type(obj).__name__}")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str = "state dict") -> None:
    """Raise CheckpointError naming the first missing, unexpected or mis-shaped key."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shaped = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s), first {missing[0]!r} (shape {tuple(expected[missing[0]].shape)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s), first {unexpected[0]!r} (shape {tuple(state[unexpected[0]].shape)})")
    if shaped:
        k = shaped[0]
        problems.append(f"{len(shaped)} mis-shaped tensor(s), first {k!r}: {tuple(state[k].shape)} in the checkpoint, "
                        f"{tuple(expected[k].shape)} in the model")
    if problems:
        hint = ""
        config = getattr(model, "config", None)
        try:
            guess = infer_config(state, heads=getattr(config, "heads", None), depth_dec=getattr(config, "depth_dec", None), quiet=True)
            if config is not None and guess != config:
                hint = f"; the checkpoint looks like configuration {guess.name}, the model is {config.name}"
        except CheckpointError:
            pass
        raise CheckpointError(f"{source} does not match the model: " + "; ".join(problems) + hint)
    not_float = [k for k, v in state.items() if not v.is_floating_point()]
    if not_float:
        raise CheckpointError(f"{source}: tensor {not_float[0]!r} has dtype {state[not_float[0]].dtype}, expected floating point")


def load_checkpoint(model: torch.nn.Module, path: str | os.PathLike) -> torch.nn.Module:
    """Strictly load the weights in `path` into `model` (any floating dtype is cast to the model's)."""
    state = read_state_dict(path)
    check_state_dict(model, state, source=f"checkpoint {os.fspath(path)!r}")
    bad = [k for k, v in state.items() if not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"checkpoint {os.fspath(path)!r}: tensor {bad[0]!r} holds NaN or Inf (corrupted file?)")
    model.load_state_dict(state, strict=True)
    return model


def save_checkpoint(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Save the state dict in the released checkpoints' format (a plain dict of tensors)."""
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, os.fspath(path))


def infer_config(state: dict[str, torch.Tensor], *, heads: int | None = None, depth_dec: int | None = None,
                 quiet: bool = False) -> ENATConfig:
    """The configuration a state dict was made with, from its tensor shapes.

    The head count is not visible in the shapes: default width // 64 (ENAT-L: 16).
    The encoder/decoder split is not either: default 2 decoder blocks (ENAT-L: 22 + 2).
    Unless quiet, a warning names what was assumed: a checkpoint made otherwise would
    load without error and compute something else.
    """
    def shape(key: str, what: str) -> tuple[int, ...]:
        if key not in state:
            raise CheckpointError(f"not an ENAT state dict: key {key!r} is missing")
        t = state[key]
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise CheckpointError(f"{key} must be a 2-D tensor {what}, got {got}")
        return tuple(t.shape)

    V1, C = shape("x_embedder.word_embeddings.weight", "(codebook size + 1, width)")
    L = shape("x_embedder.position_embeddings.weight", "(tokens, width)")[0]
    K1 = shape("y_embedder.embedding_table.weight", "(classes + 1, width)")[0]
    F = shape("prev_proj.mlp.fc1.weight", "(mlp width, width)")[0]
    depth = 1 + max((int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    nd = min(depth_dec if depth_dec is not None else 2, depth)
    h = heads if heads is not None else max(1, C // 64)
    try:
        config = ENATConfig(depth - nd, nd, int(C), int(h), int(L), codebook_size=int(V1) - 1, num_classes=int(K1) - 1,
                            mlp_ratio=int(F) // int(C))
    except ValueError as e:
        raise CheckpointError(f"cannot infer a configuration from the state dict: {e}") from e
    assumed = [what for what, given in (("2 decoder blocks", depth_dec), (f"{h} heads (width / 64)", heads)) if given is None]
    if assumed and not quiet:
        warnings.warn(
            f"enat: configuration {config.name} inferred from the checkpoint's shapes, "
            f"assuming {' and '.join(assumed)}, which the shapes do not show; give the configuration "
            "(--config) if the checkpoint was made otherwise", UserWarning, stacklevel=2)
    return config
