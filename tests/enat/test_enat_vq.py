"""VQ decoder hook (MaskGIT VQGAN layout), PNG writing and the labelled token-map preview."""

import numpy as np
import pytest
import torch

from enat import CheckpointError
from enat.vq import CAPTION, VQDecoder, load_vq_decoder, read_png, save_images, save_token_maps, write_png

SMALL = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=32, n_embed=64, embed_dim=32)


def small_decoder(seed=0):
    torch.manual_seed(seed)
    dec = VQDecoder(**SMALL).eval()
    with torch.no_grad():
        for p in dec.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return dec


def vqgan_file(tmp_path, dec, **extra):
    """A checkpoint shaped like the VQGAN's: encoder and decoder under 'state_dict'."""
    sd = {k: v.clone() for k, v in dec.state_dict().items()}
    sd["encoder.conv_in.weight"] = torch.randn(32, 3, 3, 3)  # not needed for decoding: ignored
    sd.update(extra)
    path = tmp_path / "vqgan.ckpt"
    torch.save({"state_dict": sd}, path)
    return path


def test_decoder_layout_is_the_maskgit_vqgan():
    """The default decoder has the checkpoint's tensors: 1024 x 256 codebook, 4 upsamplings."""
    sd = VQDecoder().state_dict()
    assert len(sd) == 89
    assert sd["quantize.embedding.weight"].shape == (1024, 256)
    assert sd["decoder.conv_in.weight"].shape == (512, 256, 3, 3)
    assert sd["decoder.up.4.upsample.conv.weight"].shape == (512, 512, 3, 3)
    assert sd["decoder.up.3.block.0.nin_shortcut.weight"].shape == (256, 256, 1, 1)
    assert sd["decoder.up.0.block.1.conv2.weight"].shape == (128, 128, 3, 3)
    assert "decoder.up.0.upsample.conv.weight" not in sd and "decoder.up.0.block.0.conv1.bias" not in sd
    assert sd["decoder.conv_out.weight"].shape == (3, 128, 3, 3)
    assert VQDecoder().downsampling == 16


def test_load_and_decode(tmp_path):
    dec = small_decoder()
    path = vqgan_file(tmp_path, dec)
    loaded = load_vq_decoder(path, codebook_size=64)
    tokens = torch.randint(0, 64, (2, 3, 4))
    images = loaded.decode(tokens)
    assert images.shape == (2, 3, 6, 8)
    assert images.min() >= 0 and images.max() <= 1 and images.std() > 0
    assert torch.equal(images, dec.decode(tokens))
    assert not torch.equal(images[0], loaded.decode(tokens[1:])[0])  # depends on the tokens


def test_wrong_vqgan_files_are_refused(tmp_path):
    dec = small_decoder()
    with pytest.raises(CheckpointError, match="has 64 codes, the ENAT model 1024"):
        load_vq_decoder(vqgan_file(tmp_path, dec), codebook_size=1024)
    path = vqgan_file(tmp_path, dec, **{"decoder.mid.attn_1.q.weight": torch.zeros(64, 64, 1, 1)})
    with pytest.raises(CheckpointError, match="unexpected key 'decoder.mid.attn_1.q.weight'"):
        load_vq_decoder(path, codebook_size=64)
    torch.save({"state_dict": {"encoder.x": torch.zeros(1)}}, tmp_path / "enc.ckpt")
    with pytest.raises(CheckpointError, match="not a VQGAN checkpoint"):
        load_vq_decoder(tmp_path / "enc.ckpt")


def test_png_round_trip_and_standard_reader(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    write_png(tmp_path / "a.png", rgb, {"Title": "hello"})
    back, text = read_png(tmp_path / "a.png")
    assert np.array_equal(back, rgb) and text == {"Title": "hello"}
    Image = pytest.importorskip("PIL.Image")
    with Image.open(tmp_path / "a.png") as im:
        assert im.mode == "RGB" and np.array_equal(np.asarray(im), rgb)


def test_token_map_preview_is_labelled(tmp_path):
    tokens = torch.randint(0, 1024, (3, 16, 16))
    npy, png = save_token_maps(tokens, tmp_path)
    assert np.array_equal(np.load(npy), tokens.numpy())
    assert png.endswith("_token_maps.png")
    pixels, text = read_png(png)
    assert "NOT decoded images" in text["Title"]
    assert pixels.shape[1] >= 4 * len(CAPTION)  # the caption fits
    caption = pixels[:7]  # the caption strip is 7 x scale rows, scale >= 1
    assert (caption == 0).any() and (caption == 255).any()  # black glyphs on white
    # Equal tokens give equal colours, different tokens (here) different ones.
    same = save_token_maps(torch.full((1, 2, 2), 5), tmp_path / "s")[1]
    body = read_png(same)[0][-12:]  # the grid: 2 x 2 cells of 4 px and a 2 px frame
    cells = body[body.sum(-1) != 120]  # not the grey frame
    assert len(np.unique(cells.reshape(-1, 3), axis=0)) == 1


def test_save_images(tmp_path):
    paths = save_images(torch.rand(2, 3, 8, 8), tmp_path, start=10)
    assert [p.rsplit("/", 1)[1] for p in paths] == ["sample_000010.png", "sample_000011.png"]
    assert read_png(paths[0])[0].shape == (8, 8, 3)
