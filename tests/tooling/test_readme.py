"""The README's Python example runs as written and its results are right (documentation
that cannot rot): the attention output against the independent float64 oracle, the
routing results against direct boolean indexing."""

import re

import torch

from support.attention_cases import sc_attention_oracle
from support.paths import REPO

README = REPO / "README.md"


def test_readme_python_example_runs_and_is_right():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    ns = {}
    for code in blocks:
        exec(compile(code, str(README), "exec"), ns)
    q, kc, vc, ks, vs = (ns[n].double() for n in ("q", "k_cond", "v_cond", "k_self", "v_self"))
    want_out, want_lse = sc_attention_oracle(q, kc, vc, ks, vs, ns["cond_lens"], ns["self_lens"])
    torch.testing.assert_close(ns["out"].double(), want_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ns["lse"].double(), want_lse, atol=1e-4, rtol=1e-4)
    x, mask, parts = ns["x"], ns["mask"], ns["parts"]
    B, C = x.shape[0], x.shape[2]
    assert torch.equal(parts.true_tokens, x[mask].view(B, -1, C))
    assert torch.equal(parts.false_tokens, x[~mask].view(B, -1, C))
    assert torch.equal(ns["x_back"], x)
    assert ns["y"].shape == (ns["B"], ns["N"], 1024) and torch.isfinite(ns["y"]).all()
