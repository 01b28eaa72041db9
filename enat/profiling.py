"""Where sampling time goes: named scopes in the model and a per-category breakdown.

The model marks its parts with ``scope("enat::<category>")``; outside a torch.profiler
session a scope costs one flag check.  ``profile_sampling`` runs the sampler under
the profiler and returns the time of each category (exclusive: a scope's time minus
its nested scopes), so the shares add up to the step time.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile, record_function

CATEGORIES = {
    "enat::attention": "SC-Attention (the attention op itself)",
    "enat::linear": "linear layers (q/kv/proj, MLPs, adaLN, prev_proj, head)",
    "enat::norm_mod": "LayerNorms + adaLN modulation + gated residuals",
    "enat::activation": "GELU",
    "enat::routing": "token routing (indices, gather, merge, restore)",
    "enat::embed": "embeddings",
    "enat::sampling": "sampler math (guidance, softmax, Gumbel noise, top-k re-masking)",
}

_null = contextlib.nullcontext()


def scope(name: str):
    """A profiler range when a profiler is recording, else a no-op."""
    return record_function(name) if torch.autograd._profiler_enabled() else _null


def breakdown(prof) -> dict[str, float]:
    """Exclusive milliseconds per enat:: category (plus 'other' = step time not in any)."""
    events = [e for e in prof.events() if e.name.startswith("enat::")]
    # Exclusive time: subtract the time of enat:: scopes nested directly inside another.
    events.sort(key=lambda e: (e.time_range.start, -e.time_range.end))
    excl = defaultdict(float)
    stack: list = []
    for e in events:
        while stack and stack[-1].time_range.end <= e.time_range.start:
            stack.pop()
        dur = (e.time_range.end - e.time_range.start) / 1e3
        excl[e.name] += dur
        if stack:
            excl[stack[-1].name] -= dur
        stack.append(e)
    return dict(excl)


def profile_sampling(run) -> dict[str, float]:
    """Call run() (one sampling call) under the CPU profiler, return breakdown() + 'total'."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function("enat::step_total"):
            run()
    cats = breakdown(prof)
    total = sum(cats.values())
    cats.pop("enat::step_total", None)
    cats["other"] = total - sum(cats.values())
    cats["total"] = total
    return cats


def format_breakdown(cats: dict[str, float], title: str) -> str:
    total = cats["total"]
    lines = [f"{title}: {total:.0f} ms"]
    for name, ms in sorted(((k, v) for k, v in cats.items() if k != "total"), key=lambda kv: -kv[1]):
        label = CATEGORIES.get(name, "python overhead and everything else" if name == "other" else name)
        lines.append(f"  {name.replace('enat::', ''):<11} {ms:9.1f} ms {100 * ms / total:5.1f}%  {label}")
    return "\n".join(lines)
