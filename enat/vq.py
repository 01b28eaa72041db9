"""Turning token maps into pictures: the MaskGIT VQGAN decoder, or a labelled token preview.

ENAT generates (B, h, w) maps of VQGAN codes.  With the VQGAN that ENAT was trained
on (MaskGIT's, ported to PyTorch as ``vqgan_jax_strongaug.ckpt``: 1024 codes of 256
channels, 16x upsampling, no attention layers), ``load_vq_decoder(path)`` builds the
decoder and ``decoder.decode(tokens)`` gives images (B, 3, 16h, 16w) in [0, 1].

Without a decoder there are no images: ``save_token_maps`` writes the tokens as .npy
and a small PNG in which every token is a coloured square, captioned as a token map,
so that nobody mistakes it for a generated image.
"""

from __future__ import annotations

import os
import re
import struct
import zlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import CheckpointError, read_state_dict

# ----------------------------------------------------------------------------- decoder


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True)


class _ResBlock(nn.Module):
    """norm-swish-conv twice; when the width changes, a 1x1 conv of the branch output
    is the skip path (the port of MaskGIT's checkpoint does this; kept to load it)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1 = _group_norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.norm2 = _group_norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.nin_shortcut = nn.Conv2d(cout, cout, 1, bias=False) if cin != cout else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(h)
        return skip + h


class _Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    def __init__(self, blocks, upsample):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        if upsample is not None:
            self.upsample = upsample


class _Decoder(nn.Module):
    """The VQGAN decoder; module names follow the checkpoint's ``decoder.*`` keys."""

    def __init__(self, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, z_channels: int, out_ch: int = 3):
        super().__init__()
        n = len(ch_mult)
        width = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, width, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = _ResBlock(width, width)
        self.mid.block_2 = _ResBlock(width, width)
        levels = [None] * n
        for i in reversed(range(n)):
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(_ResBlock(width, ch * ch_mult[i]))
                width = ch * ch_mult[i]
            levels[i] = _Level(blocks, _Upsample(width) if i != 0 else None)
        self.up = nn.ModuleList(levels)  # index 0 = full resolution, as in the checkpoint
        self.norm_out = _group_norm(width)
        self.conv_out = nn.Conv2d(width, out_ch, 3, padding=1)

    def forward(self, z):
        h = self.mid.block_2(self.mid.block_1(self.conv_in(z)))
        for i in reversed(range(len(self.up))):
            for blk in self.up[i].block:
                h = blk(h)
            if i != 0:
                h = self.up[i].upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class _Quantize(nn.Module):
    def __init__(self, n_embed: int, embed_dim: int):
        super().__init__()
        self.embedding = nn.Embedding(n_embed, embed_dim)


class VQDecoder(nn.Module):
    """Codes (B, h, w) -> images (B, 3, 16h, 16w) in [0, 1].  State dict keys: ``decoder.*``
    and ``quantize.embedding.weight`` of the VQGAN checkpoint (its encoder is not needed)."""

    def __init__(self, ch: int = 128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks: int = 2, z_channels: int = 256,
                 n_embed: int = 1024, embed_dim: int = 256):
        super().__init__()
        if embed_dim != z_channels:
            raise ValueError(f"embed_dim ({embed_dim}) must equal z_channels ({z_channels})")
        self.decoder = _Decoder(ch, tuple(ch_mult), num_res_blocks, z_channels)
        self.quantize = _Quantize(n_embed, embed_dim)
        self.downsampling = 2 ** (len(ch_mult) - 1)

    @property
    def codebook_size(self) -> int:
        return self.quantize.embedding.num_embeddings

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 3:
            raise ValueError(f"tokens must be (batch, h, w), got shape {tuple(tokens.shape)}")
        z = self.quantize.embedding(tokens.to(self.quantize.embedding.weight.device)).permute(0, 3, 1, 2)
        return self.decoder(z.contiguous()).clamp_(0.0, 1.0)

    forward = decode


def _decoder_shape(state: dict[str, torch.Tensor]) -> dict:
    """VQDecoder arguments read from the checkpoint's tensor shapes."""
    try:
        n_embed, embed_dim = state["quantize.embedding.weight"].shape
        z_channels = state["decoder.conv_in.weight"].shape[1]
        ch = state["decoder.conv_out.weight"].shape[1]  # width at full resolution = ch * ch_mult[0]
    except KeyError as e:
        raise CheckpointError(f"not a VQGAN checkpoint with a decoder: key {e.args[0]!r} is missing") from e
    levels = sorted({int(m.group(1)) for k in state if (m := re.match(r"decoder\.up\.(\d+)\.", k))})
    if not levels:
        raise CheckpointError("not a VQGAN checkpoint with a decoder: no 'decoder.up.*' keys")
    blocks = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"decoder\.up\.0\.block\.(\d+)\.", k)))
    mult = [state[f"decoder.up.{i}.block.0.conv2.weight"].shape[0] // ch for i in levels]
    return dict(ch=int(ch), ch_mult=tuple(mult), num_res_blocks=blocks, z_channels=int(z_channels),
                n_embed=int(n_embed), embed_dim=int(embed_dim))


def load_vq_decoder(path: str | os.PathLike, *, codebook_size: int | None = 1024, device=None) -> VQDecoder:
    """Build the decoder a VQGAN checkpoint describes and load it strictly (encoder keys ignored).

    codebook_size: the model's V; a checkpoint with another codebook is refused.
    """
    state = read_state_dict(path)
    state = {k: v for k, v in state.items() if k.startswith(("decoder.", "quantize."))}
    dec = VQDecoder(**_decoder_shape(state))
    if codebook_size is not None and dec.codebook_size != codebook_size:
        raise CheckpointError(f"VQGAN {os.fspath(path)!r} has {dec.codebook_size} codes, the ENAT model {codebook_size}")
    expected = dec.state_dict()
    for k, v in expected.items():
        if k not in state:
            raise CheckpointError(f"VQGAN {os.fspath(path)!r}: missing key {k!r}")
        if tuple(state[k].shape) != tuple(v.shape):
            raise CheckpointError(f"VQGAN {os.fspath(path)!r}: {k!r} has shape {tuple(state[k].shape)}, expected {tuple(v.shape)}")
    extra = [k for k in state if k not in expected]
    if extra:
        raise CheckpointError(f"VQGAN {os.fspath(path)!r}: unexpected key {extra[0]!r} (a decoder with attention layers is not supported)")
    dec.load_state_dict(state, strict=True)
    return dec.eval().to(device) if device is not None else dec.eval()


# ----------------------------------------------------------------------------- PNG


def write_png(path: str | os.PathLike, rgb: np.ndarray, text: dict[str, str] | None = None) -> None:
    """Write an (H, W, 3) uint8 array as an 8-bit RGB PNG (zlib + struct, no imaging library).

    text: tEXt chunks (keyword -> Latin-1 text), e.g. {"Title": ...}.
    """
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"rgb must be (H, W, 3) uint8, got shape {rgb.shape}")
    h, w, _ = rgb.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))  # filter type 0 per scanline
    parts = [b"\x89PNG\r\n\x1a\n", chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))]
    for key, value in (text or {}).items():
        parts.append(chunk(b"tEXt", key.encode("latin-1") + b"\x00" + value.encode("latin-1")))
    parts += [chunk(b"IDAT", zlib.compress(raw, 9)), chunk(b"IEND", b"")]
    with open(path, "wb") as f:
        f.write(b"".join(parts))


def read_png(path: str | os.PathLike) -> tuple[np.ndarray, dict[str, str]]:
    """Read back a PNG written by write_png (8-bit RGB, filter 0): the pixels and the tEXt chunks."""
    data = open(path, "rb").read()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path} is not a PNG file")
    pos, idat, text, w, h = 8, b"", {}, 0, 0
    while pos < len(data):
        (n,), kind = struct.unpack(">I", data[pos : pos + 4]), data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + n]
        if zlib.crc32(kind + body) & 0xFFFFFFFF != struct.unpack(">I", data[pos + 8 + n : pos + 12 + n])[0]:
            raise ValueError(f"{path}: bad CRC in chunk {kind!r}")
        if kind == b"IHDR":
            w, h, depth, color = struct.unpack(">IIBB", body[:10])
            if (depth, color) != (8, 2):
                raise ValueError(f"{path}: only 8-bit RGB is supported")
        elif kind == b"IDAT":
            idat += body
        elif kind == b"tEXt":
            key, value = body.split(b"\x00", 1)
            text[key.decode("latin-1")] = value.decode("latin-1")
        pos += 12 + n
    raw = np.frombuffer(zlib.decompress(idat), dtype=np.uint8).reshape(h, 1 + 3 * w)
    if raw[:, 0].any():
        raise ValueError(f"{path}: only filter type 0 is supported")
    return raw[:, 1:].reshape(h, w, 3).copy(), text


# ----------------------------------------------------------------------------- previews

# 3x5 bitmap glyphs for the caption (rows top to bottom, 3 bits each, MSB left).
_GLYPHS = {
    "A": (2, 5, 7, 5, 5), "D": (6, 5, 5, 5, 6), "E": (7, 4, 6, 4, 7), "G": (3, 4, 5, 5, 3),
    "I": (7, 2, 2, 2, 7), "K": (5, 5, 6, 5, 5), "M": (5, 7, 7, 5, 5), "N": (6, 5, 5, 5, 5),
    "O": (2, 5, 5, 5, 2), "P": (6, 5, 6, 4, 4), "S": (3, 4, 2, 1, 6), "T": (7, 2, 2, 2, 2),
    "C": (3, 4, 4, 4, 3), "V": (5, 5, 5, 5, 2), "R": (6, 5, 6, 5, 5), "-": (0, 0, 7, 0, 0),
    " ": (0, 0, 0, 0, 0), ",": (0, 0, 0, 2, 4),
}
CAPTION = "TOKEN MAPS - NOT IMAGES"


def _caption(text: str, width: int, scale: int) -> np.ndarray:
    """A white strip with `text` in black 3x5 glyphs, `scale` pixels per glyph pixel."""
    h = 7 * scale
    strip = np.full((h, width, 3), 255, dtype=np.uint8)
    x = scale
    for ch in text:
        for r, bits in enumerate(_GLYPHS.get(ch, _GLYPHS[" "])):
            for c in range(3):
                if bits >> (2 - c) & 1:
                    y0, x0 = (1 + r) * scale, x + c * scale
                    strip[y0 : y0 + scale, x0 : x0 + scale] = 0
        x += 4 * scale
        if x + 3 * scale > width:
            break
    return strip


def token_colors(tokens: np.ndarray, codebook_size: int = 1024) -> np.ndarray:
    """A fixed colour per code (hue spread by the golden ratio): (..., 3) uint8."""
    t = np.asarray(tokens, dtype=np.int64) % max(codebook_size, 1)
    hue = (t * 0.6180339887) % 1.0
    sat = 0.55 + 0.45 * ((t * 7) % 5) / 4
    val = 0.6 + 0.4 * ((t * 3) % 4) / 3
    k = (np.stack([5.0, 3.0, 1.0]) + hue[..., None] * 6) % 6
    rgb = val[..., None] - val[..., None] * sat[..., None] * np.clip(np.minimum(k, 4 - k), 0, 1)
    return (rgb * 255).round().astype(np.uint8)


def token_grid(tokens: np.ndarray, codebook_size: int = 1024, cell: int = 4, per_row: int = 8, gap: int = 2) -> np.ndarray:
    """(B, h, w) tokens -> one RGB picture: each map as coloured cell x cell squares, on a grid."""
    tokens = np.asarray(tokens)
    B, h, w = tokens.shape
    cols = max(1, min(per_row, B))
    rows = -(-B // cols)
    H, W = rows * (h * cell + gap) + gap, cols * (w * cell + gap) + gap
    out = np.full((H, W, 3), 40, dtype=np.uint8)
    colors = token_colors(tokens, codebook_size).repeat(cell, axis=1).repeat(cell, axis=2)
    for i in range(B):
        y, x = gap + (i // cols) * (h * cell + gap), gap + (i % cols) * (w * cell + gap)
        out[y : y + h * cell, x : x + w * cell] = colors[i]
    return out


def save_token_maps(tokens: torch.Tensor | np.ndarray, out_dir: str | os.PathLike, codebook_size: int = 1024,
                    stem: str = "tokens") -> tuple[str, str]:
    """Save tokens (B, h, w) as ``<stem>.npy`` and a captioned preview ``<stem>_token_maps.png``."""
    os.makedirs(out_dir, exist_ok=True)
    arr = tokens.detach().cpu().numpy() if isinstance(tokens, torch.Tensor) else np.asarray(tokens)
    npy = os.path.join(out_dir, f"{stem}.npy")
    np.save(npy, arr.astype(np.int64))
    grid = token_grid(arr, codebook_size)
    scale = max(1, min(3, grid.shape[1] // (4 * len(CAPTION) + 2)))
    width = max(grid.shape[1], (4 * len(CAPTION) + 2) * scale)
    if grid.shape[1] < width:
        grid = np.concatenate([grid, np.full((grid.shape[0], width - grid.shape[1], 3), 40, np.uint8)], axis=1)
    picture = np.concatenate([_caption(CAPTION, width, scale), grid], axis=0)
    png = os.path.join(out_dir, f"{stem}_token_maps.png")
    write_png(png, picture, {"Title": "ENAT token maps (VQ codes as colours), NOT decoded images",
                              "Description": "Each square is one VQGAN code; pass a VQGAN decoder checkpoint to get images."})
    return npy, png


def save_images(images: torch.Tensor, out_dir: str | os.PathLike, stem: str = "sample", start: int = 0) -> list[str]:
    """Save decoded images (B, 3, H, W) in [0, 1] as ``<stem>_<index>.png``."""
    os.makedirs(out_dir, exist_ok=True)
    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    paths = []
    for i, img in enumerate(arr):
        p = os.path.join(out_dir, f"{stem}_{start + i:06d}.png")
        write_png(p, img, {"Title": "ENAT sample (VQGAN-decoded)"})
        paths.append(p)
    return paths
