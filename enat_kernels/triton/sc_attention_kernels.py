"""Triton kernels of SC-Attention: forward, and a flash-attention-2 style backward.

Layouts (docs/KERNEL_CONTRACT.md): dense (B, N, H, D) with optional per-row lengths,
or packed (T, H, D) with int32 cu_seqlens (``VARLEN``).  Each tensor comes with its
own batch/token/head strides (unit stride on D), so views of a fused projection are
read in place; the cond and self segments are always separate tensors, read by two
loops of the same program (nothing is concatenated).

Grids are one-dimensional, ``blocks * H * B`` programs with the blocks of one
(row, head) adjacent, so that programs sharing K/V (or Q/dO) run together and hit
L2; a 1-D grid also has no 65535 limit on B or H.

Numerics: scores are scaled by ``qk_scale = scale * log2(e)`` and exponentiated with
exp2; lse is stored in natural log.  Accumulation is fp32; the probabilities are cast
to the operands' dtype before the P @ V / dS @ K style dots, as flash-attention does.

Masking: inside the key (or query) loops only the last, partial block uses masked
loads; a program's own tile (its queries, or a dK/dV program's keys) is loaded once,
masked.  Padding rows of any input (which may hold NaN/Inf) are never read as data:
masked loads give 0 and masked scores -inf (forward) or masked probabilities 0
(backward).

Offsets: the (batch, packed row, head) part of every address is computed in int64;
offsets inside a block are int32 (block * stride).

The backward uses no atomics: dK/dV and dQ come from separate kernels, so every
gradient is deterministic run to run.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .sc_attention_config import NO_SPECIALIZE

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)


# ----------------------------------------------------------------------------- helpers


@triton.jit
def _decode_pid(n_blocks, H):
    """Program id -> (block index, head, batch row); blocks of one (row, head) adjacent."""
    pid = tl.program_id(0)
    blk = pid % n_blocks
    bh = pid // n_blocks
    return blk, bh % H, bh // H


@triton.jit
def _seq_extent(b, CU, LENS, seqlen, total, VARLEN: tl.constexpr, HAS_LENS: tl.constexpr):
    """(start, length, owned) of batch row / sequence b in one segment.

    start: first packed row (varlen; 0 dense).  length: valid rows, clamped so that
    no bad value can address outside the tensor.  owned: rows this sequence owns in
    the outputs (dense: all N, padding included, which get zeros; varlen: length).
    """
    if VARLEN:
        start = tl.load(CU + b)
        end = tl.load(CU + b + 1)
        start = tl.minimum(tl.maximum(start, 0), total)
        length = tl.minimum(tl.maximum(end - start, 0), tl.minimum(seqlen, total - start))
        owned = length
    else:
        start = 0
        if HAS_LENS:
            length = tl.minimum(tl.maximum(tl.load(LENS + b), 0), seqlen)
        else:
            length = seqlen
        owned = seqlen
    return start, length, owned


@triton.jit
def _query_block(H, seqlen_q, seqlen_c, total_q, total_c, SELF_LENS, COND_LENS, CU_Q, CU_C,
                 BLOCK_M: tl.constexpr, VARLEN: tl.constexpr, HAS_SELF_LENS: tl.constexpr,
                 HAS_COND_LENS: tl.constexpr):
    """Coordinates of a query-stationary program (forward, dQ): BLOCK_M queries from
    start_m of batch row b, head h.

    Returns b, h, start_m, the query extent (q_start, q_len, q_owned), the cond start,
    and how many keys of each segment the block attends to: none for a block of padding
    rows only (dense form), which then just writes its zeros.
    """
    pid_m, h, b = _decode_pid(tl.cdiv(seqlen_q, BLOCK_M), H)
    q_start, q_len, q_owned = _seq_extent(b, CU_Q, SELF_LENS, seqlen_q, total_q, VARLEN, HAS_SELF_LENS)
    c_start, c_len, _c_owned = _seq_extent(b, CU_C, COND_LENS, seqlen_c, total_c, VARLEN, HAS_COND_LENS)
    start_m = pid_m * BLOCK_M
    active = start_m < q_len
    return b, h, start_m, q_start, q_len, q_owned, c_start, tl.where(active, c_len, 0), tl.where(active, q_len, 0)


@triton.jit
def _row_ptr(ptr, b, start, h, stride_b, stride_m, stride_h, VARLEN: tl.constexpr):
    """Pointer to (batch row b | packed row start, head h), in int64."""
    if VARLEN:
        off = start.to(tl.int64) * stride_m
    else:
        off = b.to(tl.int64) * stride_b
    return ptr + off + h.to(tl.int64) * stride_h


@triton.jit
def _lse_offset(b, start, h, stride_lb, stride_lh, VARLEN: tl.constexpr):
    """Offset of row 0 of (b, h) in an lse-shaped tensor (lse, dlse, delta): (B, H, N)
    dense, (H, T) packed, rows contiguous."""
    if VARLEN:
        off = h.to(tl.int64) * stride_lh + start
    else:
        off = b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh
    return off


@triton.jit
def _load_rows(ptr, first, stride_m, offs_r, offs_d, n_valid, MASKED: tl.constexpr):
    """Rows first + offs_r of a (rows, D) slab; masked rows (>= n_valid) read as 0.

    The row offset is int64: Triton types a stride that fits in int32 as int32, and
    offs_r * stride_m would wrap for token strides above 2^31 / BLOCK (a sequence-major
    buffer viewed as (B, N, H, D) has stride B * H * D)."""
    ptrs = ptr + tl.cast(first, tl.int64) * stride_m + offs_r[:, None].to(tl.int64) * stride_m + offs_d[None, :]
    if MASKED:
        return tl.load(ptrs, mask=(first + offs_r < n_valid)[:, None], other=0.0)
    return tl.load(ptrs)


@triton.jit
def _store_rows(ptr, first, stride_m, offs_r, offs_d, value, n_rows):
    ptrs = ptr + tl.cast(first, tl.int64) * stride_m + offs_r[:, None].to(tl.int64) * stride_m + offs_d[None, :]
    tl.store(ptrs, value.to(ptr.dtype.element_ty), mask=(first + offs_r < n_rows)[:, None])


# ----------------------------------------------------------------------------- key loop of a query block


@triton.jit
def _key_segment(state, operands, K, V, b, start, h, stride_kb, stride_km, stride_kh, stride_vb, stride_vm, stride_vh,
                 n_keys, STEP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                 VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Stream the first n_keys rows of one key segment (K, V: row `start` of batch row b,
    head h) through STEP, BLOCK_N keys at a time; the forward and dQ programs call it
    for the cond segment, then for the self segment.

    state = STEP(state, operands, k, v, key_valid, MASKED, DOT_PRECISION): state is what
    the program accumulates over the keys, operands the query block's inputs that STEP
    reads.  Only the partial last block is masked (key_valid; None when MASKED is off).
    """
    K = _row_ptr(K, b, start, h, stride_kb, stride_km, stride_kh, VARLEN)
    V = _row_ptr(V, b, start, h, stride_vb, stride_vm, stride_vh, VARLEN)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    n_full = (n_keys // BLOCK_N) * BLOCK_N
    for first in range(0, n_full, BLOCK_N):
        k = _load_rows(K, first, stride_km, offs_n, offs_d, n_keys, False)
        v = _load_rows(V, first, stride_vm, offs_n, offs_d, n_keys, False)
        state = STEP(state, operands, k, v, None, False, DOT_PRECISION)
    if n_full < n_keys:
        k = _load_rows(K, n_full, stride_km, offs_n, offs_d, n_keys, True)
        v = _load_rows(V, n_full, stride_vm, offs_n, offs_d, n_keys, True)
        state = STEP(state, operands, k, v, n_full + offs_n < n_keys, True, DOT_PRECISION)
    return state


# ----------------------------------------------------------------------------- forward


@triton.jit
def _fwd_step(state, operands, k, v, key_valid, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One online-softmax step over a block of keys (log2 domain); state = (acc, l_i, m_i),
    operands = (q, qk_scale)."""
    acc, l_i, m_i = state
    q, qk_scale = operands
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if MASKED:
        s = tl.where(key_valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit(do_not_specialize=NO_SPECIALIZE)
def sc_attn_fwd_kernel(
    Q, KC, VC, KS, VS, OUT, LSE,
    COND_LENS, SELF_LENS, CU_Q, CU_C,
    stride_qb, stride_qm, stride_qh,
    stride_kcb, stride_kcm, stride_kch,
    stride_vcb, stride_vcm, stride_vch,
    stride_ksb, stride_ksm, stride_ksh,
    stride_vsb, stride_vsm, stride_vsh,
    stride_ob, stride_om, stride_oh,
    stride_lb, stride_lh,
    H, seqlen_q, seqlen_c, total_q, total_c,
    qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    VARLEN: tl.constexpr, HAS_COND_LENS: tl.constexpr, HAS_SELF_LENS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """out, lse of BLOCK_M queries of one (row, head): cond keys, then self keys, one softmax."""
    b, h, start_m, q_start, q_len, q_owned, c_start, n_cond, n_self = _query_block(
        H, seqlen_q, seqlen_c, total_q, total_c, SELF_LENS, COND_LENS, CU_Q, CU_C,
        BLOCK_M, VARLEN, HAS_SELF_LENS, HAS_COND_LENS)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q_ptr = _row_ptr(Q, b, q_start, h, stride_qb, stride_qm, stride_qh, VARLEN)
    q = _load_rows(q_ptr, start_m, stride_qm, offs_m, offs_d, q_len, True)

    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    state = (acc, l_i, m_i)
    operands = (q, qk_scale)
    state = _key_segment(state, operands, KC, VC, b, c_start, h, stride_kcb, stride_kcm, stride_kch,
                         stride_vcb, stride_vcm, stride_vch, n_cond, _fwd_step, HEAD_DIM, BLOCK_N, VARLEN, DOT_PRECISION)
    state = _key_segment(state, operands, KS, VS, b, q_start, h, stride_ksb, stride_ksm, stride_ksh,
                         stride_vsb, stride_vsm, stride_vsh, n_self, _fwd_step, HEAD_DIM, BLOCK_N, VARLEN, DOT_PRECISION)
    acc, l_i, m_i = state

    valid = start_m + offs_m < q_len
    l_safe = tl.where(valid, l_i, 1.0)
    out = tl.where(valid[:, None], acc / l_safe[:, None], 0.0)
    lse = tl.where(valid, (m_i + tl.math.log2(l_safe)) * LN2, float("-inf"))
    _store_rows(_row_ptr(OUT, b, q_start, h, stride_ob, stride_om, stride_oh, VARLEN), start_m, stride_om,
                offs_m, offs_d, out, q_owned)
    lse_ptr = LSE + _lse_offset(b, q_start, h, stride_lb, stride_lh, VARLEN) + start_m
    tl.store(lse_ptr + offs_m, lse, mask=start_m + offs_m < q_owned)


# ----------------------------------------------------------------------------- backward


@triton.jit(do_not_specialize=NO_SPECIALIZE)
def sc_attn_bwd_preprocess_kernel(
    OUT, DOUT, DLSE, DELTA,
    SELF_LENS, CU_Q,
    stride_ob, stride_om, stride_oh,
    stride_dob, stride_dom, stride_doh,
    stride_lb, stride_lh,
    H, seqlen_q, total_q,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
    VARLEN: tl.constexpr, HAS_SELF_LENS: tl.constexpr, HAS_DLSE: tl.constexpr,
):
    """delta = rowsum(dO * O) - dlse (fp32, lse's layout); 0 on padding rows.

    With it the softmax backward is dS = P * (dP - delta) for both segments.
    """
    pid_m, h, b = _decode_pid(tl.cdiv(seqlen_q, BLOCK_M), H)
    q_start, q_len, q_owned = _seq_extent(b, CU_Q, SELF_LENS, seqlen_q, total_q, VARLEN, HAS_SELF_LENS)
    start_m = pid_m * BLOCK_M
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    valid = start_m + offs_m < q_len
    o = _load_rows(_row_ptr(OUT, b, q_start, h, stride_ob, stride_om, stride_oh, VARLEN),
                   start_m, stride_om, offs_m, offs_d, q_len, True)
    do = _load_rows(_row_ptr(DOUT, b, q_start, h, stride_dob, stride_dom, stride_doh, VARLEN),
                    start_m, stride_dom, offs_m, offs_d, q_len, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    row0 = _lse_offset(b, q_start, h, stride_lb, stride_lh, VARLEN) + start_m  # dlse and delta share lse's layout
    if HAS_DLSE:
        delta -= tl.load(DLSE + row0 + offs_m, mask=valid, other=0.0)
    delta = tl.where(valid, delta, 0.0)
    tl.store(DELTA + row0 + offs_m, delta, mask=start_m + offs_m < q_owned)


@triton.jit
def _dkdv_step(dk, dv, k, v, q, do, lse2, delta, qk_scale, query_valid,
               MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Accumulate dK, dV of a key block over one block of queries (transposed: keys x queries)."""
    p_t = tl.math.exp2(tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale - lse2[None, :])
    if MASKED:
        p_t = tl.where(query_valid[None, :], p_t, 0.0)
    dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _dkdv_block(
    K, V, DK, DV, stride_km, stride_vm, stride_dkm, stride_dvm, start_n, n_keys, n_keys_owned,
    Q, DO, LSE, DELTA, stride_qm, stride_dom, n_queries,
    qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dK, dV of keys start_n .. start_n + BLOCK_N of one segment, over all valid queries.

    K, V, DK, DV point at the segment's row 0 (head h); Q, DO at the queries' row 0;
    LSE, DELTA at the (b, h) row of lse / delta.
    """
    offs_n = tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    k = _load_rows(K, start_n, stride_km, offs_n, offs_d, n_keys, True)
    v = _load_rows(V, start_n, stride_vm, offs_n, offs_d, n_keys, True)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    n_queries = tl.where(start_n < n_keys, n_queries, 0)  # a block of padding keys: gradient 0
    n_full = (n_queries // BLOCK_M) * BLOCK_M
    for start in range(0, n_full, BLOCK_M):
        q = _load_rows(Q, start, stride_qm, offs_m, offs_d, n_queries, False)
        do = _load_rows(DO, start, stride_dom, offs_m, offs_d, n_queries, False)
        lse2 = tl.load(LSE + start + offs_m) * LOG2E
        delta = tl.load(DELTA + start + offs_m)
        dk, dv = _dkdv_step(dk, dv, k, v, q, do, lse2, delta, qk_scale, None, False, DOT_PRECISION)
    if n_full < n_queries:
        query_valid = n_full + offs_m < n_queries
        q = _load_rows(Q, n_full, stride_qm, offs_m, offs_d, n_queries, True)
        do = _load_rows(DO, n_full, stride_dom, offs_m, offs_d, n_queries, True)
        lse2 = tl.load(LSE + n_full + offs_m, mask=query_valid, other=0.0) * LOG2E
        delta = tl.load(DELTA + n_full + offs_m, mask=query_valid, other=0.0)
        dk, dv = _dkdv_step(dk, dv, k, v, q, do, lse2, delta, qk_scale, query_valid, True, DOT_PRECISION)
    key_valid = (start_n + offs_n < n_keys)[:, None]
    _store_rows(DK, start_n, stride_dkm, offs_n, offs_d, tl.where(key_valid, dk * sm_scale, 0.0), n_keys_owned)
    _store_rows(DV, start_n, stride_dvm, offs_n, offs_d, tl.where(key_valid, dv, 0.0), n_keys_owned)


@triton.jit(do_not_specialize=NO_SPECIALIZE)
def sc_attn_bwd_dkdv_kernel(
    Q, KC, VC, KS, VS, DOUT, LSE, DELTA, DKC, DVC, DKS, DVS,
    COND_LENS, SELF_LENS, CU_Q, CU_C,
    stride_qb, stride_qm, stride_qh,
    stride_kcb, stride_kcm, stride_kch,
    stride_vcb, stride_vcm, stride_vch,
    stride_ksb, stride_ksm, stride_ksh,
    stride_vsb, stride_vsm, stride_vsh,
    stride_dob, stride_dom, stride_doh,
    stride_dkcb, stride_dkcm, stride_dkch,
    stride_dvcb, stride_dvcm, stride_dvch,
    stride_dksb, stride_dksm, stride_dksh,
    stride_dvsb, stride_dvsm, stride_dvsh,
    stride_lb, stride_lh,
    H, seqlen_q, seqlen_c, total_q, total_c,
    qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    VARLEN: tl.constexpr, HAS_COND_LENS: tl.constexpr, HAS_SELF_LENS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dK, dV of one block of BLOCK_N keys: the cond segment's blocks come first, then the self segment's."""
    n_cond_blocks = tl.cdiv(seqlen_c, BLOCK_N)
    pid_n, h, b = _decode_pid(n_cond_blocks + tl.cdiv(seqlen_q, BLOCK_N), H)
    q_start, q_len, q_owned = _seq_extent(b, CU_Q, SELF_LENS, seqlen_q, total_q, VARLEN, HAS_SELF_LENS)
    c_start, c_len, c_owned = _seq_extent(b, CU_C, COND_LENS, seqlen_c, total_c, VARLEN, HAS_COND_LENS)
    q_ptr = _row_ptr(Q, b, q_start, h, stride_qb, stride_qm, stride_qh, VARLEN)
    do_ptr = _row_ptr(DOUT, b, q_start, h, stride_dob, stride_dom, stride_doh, VARLEN)
    lse_off = _lse_offset(b, q_start, h, stride_lb, stride_lh, VARLEN)
    lse_ptr = LSE + lse_off
    delta_ptr = DELTA + lse_off
    # Two inlined copies (one per segment) rather than selecting pointers at run time,
    # so each keeps its own stride/alignment facts for vectorized loads.
    if pid_n < n_cond_blocks:
        _dkdv_block(
            _row_ptr(KC, b, c_start, h, stride_kcb, stride_kcm, stride_kch, VARLEN),
            _row_ptr(VC, b, c_start, h, stride_vcb, stride_vcm, stride_vch, VARLEN),
            _row_ptr(DKC, b, c_start, h, stride_dkcb, stride_dkcm, stride_dkch, VARLEN),
            _row_ptr(DVC, b, c_start, h, stride_dvcb, stride_dvcm, stride_dvch, VARLEN),
            stride_kcm, stride_vcm, stride_dkcm, stride_dvcm, pid_n * BLOCK_N, c_len, c_owned,
            q_ptr, do_ptr, lse_ptr, delta_ptr, stride_qm, stride_dom, q_len,
            qk_scale, sm_scale, HEAD_DIM, BLOCK_M, BLOCK_N, DOT_PRECISION,
        )
    else:
        _dkdv_block(
            _row_ptr(KS, b, q_start, h, stride_ksb, stride_ksm, stride_ksh, VARLEN),
            _row_ptr(VS, b, q_start, h, stride_vsb, stride_vsm, stride_vsh, VARLEN),
            _row_ptr(DKS, b, q_start, h, stride_dksb, stride_dksm, stride_dksh, VARLEN),
            _row_ptr(DVS, b, q_start, h, stride_dvsb, stride_dvsm, stride_dvsh, VARLEN),
            stride_ksm, stride_vsm, stride_dksm, stride_dvsm, (pid_n - n_cond_blocks) * BLOCK_N, q_len, q_owned,
            q_ptr, do_ptr, lse_ptr, delta_ptr, stride_qm, stride_dom, q_len,
            qk_scale, sm_scale, HEAD_DIM, BLOCK_M, BLOCK_N, DOT_PRECISION,
        )


@triton.jit
def _dq_step(dq, operands, k, v, key_valid, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dQ of the query block over one block of keys; operands = (q, do, lse2, delta, qk_scale)."""
    q, do, lse2, delta, qk_scale = operands
    p = tl.math.exp2(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale - lse2[:, None])
    if MASKED:
        p = tl.where(key_valid[None, :], p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    return tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)


@triton.jit(do_not_specialize=NO_SPECIALIZE)
def sc_attn_bwd_dq_kernel(
    Q, KC, VC, KS, VS, DOUT, LSE, DELTA, DQ,
    COND_LENS, SELF_LENS, CU_Q, CU_C,
    stride_qb, stride_qm, stride_qh,
    stride_kcb, stride_kcm, stride_kch,
    stride_vcb, stride_vcm, stride_vch,
    stride_ksb, stride_ksm, stride_ksh,
    stride_vsb, stride_vsm, stride_vsh,
    stride_dob, stride_dom, stride_doh,
    stride_dqb, stride_dqm, stride_dqh,
    stride_lb, stride_lh,
    H, seqlen_q, seqlen_c, total_q, total_c,
    qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    VARLEN: tl.constexpr, HAS_COND_LENS: tl.constexpr, HAS_SELF_LENS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dQ of BLOCK_M queries of one (row, head): cond keys, then self keys."""
    b, h, start_m, q_start, q_len, q_owned, c_start, n_cond, n_self = _query_block(
        H, seqlen_q, seqlen_c, total_q, total_c, SELF_LENS, COND_LENS, CU_Q, CU_C,
        BLOCK_M, VARLEN, HAS_SELF_LENS, HAS_COND_LENS)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    valid = start_m + offs_m < q_len
    q = _load_rows(_row_ptr(Q, b, q_start, h, stride_qb, stride_qm, stride_qh, VARLEN),
                   start_m, stride_qm, offs_m, offs_d, q_len, True)
    do = _load_rows(_row_ptr(DOUT, b, q_start, h, stride_dob, stride_dom, stride_doh, VARLEN),
                    start_m, stride_dom, offs_m, offs_d, q_len, True)
    lse_off = _lse_offset(b, q_start, h, stride_lb, stride_lh, VARLEN) + start_m
    lse_ptr = LSE + lse_off
    delta_ptr = DELTA + lse_off
    lse2 = tl.load(lse_ptr + offs_m, mask=valid, other=0.0) * LOG2E
    delta = tl.load(delta_ptr + offs_m, mask=valid, other=0.0)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    operands = (q, do, lse2, delta, qk_scale)
    dq = _key_segment(dq, operands, KC, VC, b, c_start, h, stride_kcb, stride_kcm, stride_kch,
                      stride_vcb, stride_vcm, stride_vch, n_cond, _dq_step, HEAD_DIM, BLOCK_N, VARLEN, DOT_PRECISION)
    dq = _key_segment(dq, operands, KS, VS, b, q_start, h, stride_ksb, stride_ksm, stride_ksh,
                      stride_vsb, stride_vsm, stride_vsh, n_self, _dq_step, HEAD_DIM, BLOCK_N, VARLEN, DOT_PRECISION)
    dq = tl.where(valid[:, None], dq * sm_scale, 0.0)
    _store_rows(_row_ptr(DQ, b, q_start, h, stride_dqb, stride_dqm, stride_dqh, VARLEN), start_m, stride_dqm,
                offs_m, offs_d, dq, q_owned)


# ----------------------------------------------------------------------------- rows no sequence owns


@triton.jit(do_not_specialize=("batch", "total", "stride_c"))
def fill_unowned_rows_kernel(
    X0, X1, X2, CU, batch, total, width, stride_r, stride_c, value,
    BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """Packed form: set the rows no sequence owns, those before cu[0] and from cu[batch]
    on (offsets clamped to [0, total]), to `value` in up to three tensors of one layout
    (X1, X2 may be None): row t, column c at t * stride_r + c * stride_c.  The main
    kernels write only owned rows; the fill reads two offsets on the device (no host
    sync) and its masked stores touch nothing else."""
    lo = tl.minimum(tl.maximum(tl.load(CU), 0), total)
    hi = tl.maximum(tl.minimum(tl.maximum(tl.load(CU + batch), 0), total), lo)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    unowned = ((rows < lo) | (rows >= hi)) & (rows < total)
    mask = unowned[:, None] & (cols < width)[None, :]
    offs = rows[:, None] * stride_r + cols[None, :].to(tl.int64) * stride_c
    fill = tl.zeros([BLOCK_R, BLOCK_W], dtype=tl.float32) + value
    tl.store(X0 + offs, fill.to(X0.dtype.element_ty), mask=mask)
    if X1 is not None:
        tl.store(X1 + offs, fill.to(X1.dtype.element_ty), mask=mask)
    if X2 is not None:
        tl.store(X2 + offs, fill.to(X2.dtype.element_ty), mask=mask)
