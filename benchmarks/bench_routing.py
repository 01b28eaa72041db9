"""Token routing (split, gather, restore, merge): this library's backends next to the anchors.

One pytest-benchmark group per (operation, shape).  Each path's result on the first
input copy must equal (exactly: routing only moves data) what boolean indexing gives,
before it is timed.  See _routing_paths.py for the paths and benchmarks/README.md for
the commands.
"""

from __future__ import annotations

import pytest
import torch

from ._cases import ROUTE_SHAPES, active
from ._costs import routing_bytes
from ._env import DEVICE, measure, record
from ._routing_paths import OPS, RouteCase, routing_paths

PATHS = routing_paths(DEVICE.type)

_CASE: dict = {}  # the current shape's RouteCase, one shape at a time


def _route_case(shape, env) -> RouteCase:
    if _CASE.get("shape") != shape:
        _CASE.clear()
        _CASE.update(shape=shape, case=RouteCase(shape, env))
    return _CASE["case"]


def _params():
    return [
        pytest.param(op, shape, path, id=f"{op}-{shape.id}-{path.name}")
        for shape in active(ROUTE_SHAPES)
        for op in OPS
        for path in PATHS
    ]


@pytest.mark.parametrize("op,shape,path", _params())
def test_routing(benchmark, bench_env, op, shape, path):
    env = bench_env
    case = _route_case(shape, env)
    reason = path.unavailable(case)
    if reason:
        pytest.skip(reason)
    benchmark.group = f"routing {op} | {shape.label}"
    n = env.copies_for(case.bytes_per_copy())
    with path.context():
        inputs = [case.inputs(op, seed=i) for i in range(n)]
        got = path.run(op, case, *inputs[0])
        for k, (g, w) in enumerate(zip(got, case.expected(op, seed=0), strict=True)):
            assert g.shape == w.shape and torch.equal(g, w), f"{path.name} {op}: output {k} differs from boolean indexing"
        del got

        def call(i):
            return path.run(op, case, *inputs[i])

        timing = measure(benchmark, call, n, env)

    s = shape
    n_a, n_b = {"gather": (s.n_new, 0), "merge": (s.n_new, s.n_vis - s.n_new)}.get(op, (0, 0))
    record(
        benchmark, env,
        op=f"routing:{op}", direction=None, case=s.id, case_label=s.label,
        shape={"B": s.B, "L": s.L, "C": s.C, "n_vis": s.n_vis, "n_new": s.n_new},
        path=path.name, role=path.role, family=path.family, concat_counted=None,
        flops=0.0, bytes=routing_bytes(op, s.B, s.L, s.C, env.dtype.itemsize, n_a, n_b),
        **path.extra(), **timing,
    )
