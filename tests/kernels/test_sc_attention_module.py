"""The SCAttention module (parameter names of the ENAT checkpoint, the forward of
ENAT's attention) and the reference being the ``torch`` backend."""

import pytest
import torch

import enat_kernels as ek
from enat_kernels.reference import sc_attention_ref


def test_scattention_parameter_names_match_the_checkpoint():
    m = ek.SCAttention(64, 4)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {
        "q.weight": (64, 64), "q.bias": (64,),
        "kv.A.weight": (128, 64), "kv.A.bias": (128,),
        "kv.B.weight": (128, 64), "kv.B.bias": (128,),
        "proj.weight": (64, 64), "proj.bias": (64,),
    }


@pytest.mark.parametrize("with_cond", [True, False])
def test_scattention_forward_is_enat_attention(with_cond, gen):
    """K first, V second in each kv output; softmax over cond then self; then proj."""
    torch.manual_seed(0)
    B, N, Nc, C, H = 2, 6, 9, 32, 4
    D = C // H
    m = ek.SCAttention(C, H, backend="torch").double()
    x = torch.randn(B, N, C, generator=gen, dtype=torch.float64)
    cond = torch.randn(B, Nc, C, generator=gen, dtype=torch.float64) if with_cond else None
    got = m(x, cond)

    q = m.q(x).reshape(B, N, H, D).transpose(1, 2)
    kv = m.kv["B"](x).reshape(B, N, 2, H, D).permute(2, 0, 3, 1, 4)
    k, v = kv[0], kv[1]
    if with_cond:
        kvc = m.kv["A"](cond).reshape(B, Nc, 2, H, D).permute(2, 0, 3, 1, 4)
        k, v = torch.cat([kvc[0], k], 2), torch.cat([kvc[1], v], 2)
    attn = ((q @ k.transpose(-2, -1)) * D**-0.5).softmax(-1)
    want = m.proj((attn @ v).transpose(1, 2).reshape(B, N, C))
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


def test_scattention_rejects_bad_head_count():
    with pytest.raises(ValueError, match="divisible"):
        ek.SCAttention(30, 4)


def test_reference_is_the_torch_backend(gen):
    q, k, v = (torch.randn(2, 5, 2, 16, generator=gen) for _ in range(3))
    kc, vc = (torch.randn(2, 7, 2, 16, generator=gen) for _ in range(2))
    out, lse = ek.sc_attention(q, kc, vc, k, v, return_lse=True, backend="torch")
    ro, rl = sc_attention_ref(q, kc, vc, k, v)
    assert torch.equal(out, ro) and torch.equal(lse, rl)
