"""The Triton kernels of :mod:`scrollsam.model.rel_attention` (see there for the method).

Programs cover one (image, head) ``z`` and one block of positions of the padded grid (H rows of
WP = W rounded up to a power of two); BLOCK_N is a multiple of WP, so a key block is whole rows.
Tensors: q, k, v [B, nh, N, D] with strides (``s?b``, ``s?h``, ``s?n``) and a unit last stride;
O, DO, DQ, DK, DV contiguous [B * nh, N, D]; RH, RW, DRH, DRW contiguous [B * nh, N, H or W];
LSE, DELTA float32 [B * nh, N]. Only imported where Triton is.
"""

import triton
import triton.language as tl


@triton.jit
def _tokens(pos, H: tl.constexpr, W: tl.constexpr, WP: tl.constexpr):
    """Positions in the padded H x WP grid -> (token index row * W + col, real token)."""
    row, col = pos // WP, pos % WP
    if W == WP:
        token = pos
    else:
        token = row * W + col
    return token, (col < W) & (row < H)

@triton.jit
def _program(H: tl.constexpr, WP: tl.constexpr, BLOCK: tl.constexpr):
    """This program's (image and head z as int64, so that offsets past 2**31 elements do
    not wrap; index of its block of BLOCK positions), blocks varying fastest."""
    blocks: tl.constexpr = (H * WP + BLOCK - 1) // BLOCK
    pid = tl.program_id(0)
    return (pid // blocks).to(tl.int64), pid % blocks

@triton.jit
def _row_bias(RH, tok_m, m_ok, start_n, H: tl.constexpr, WP: tl.constexpr,
              BLOCK_N: tl.constexpr):
    """rel_h of the queries for the key rows of the block at ``start_n`` -> float32
    [BLOCK_M, BLOCK_N / WP] ([BLOCK_M, 1] for one row)."""
    rows = start_n // WP + tl.arange(0, BLOCK_N // WP)
    bh = tl.load(RH + tok_m[:, None] * H + rows[None, :],
                 mask=m_ok[:, None] & (rows < H)[None, :], other=0.0)
    return bh.to(tl.float32)

@triton.jit
def _add_bias(s, bh, bw, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              WP: tl.constexpr):
    """Scores [BLOCK_M, BLOCK_N] + rel_h [BLOCK_M, RB] over each row's WP columns +
    rel_w [BLOCK_M, WP] over each of the RB rows."""
    if BLOCK_N == WP:
        return s + bh + bw
    bias = bh[:, :, None] + bw[:, None, :]  # (BLOCK_M, RB, WP)
    return s + tl.reshape(bias, (BLOCK_M, BLOCK_N))

@triton.jit
def forward(Q, K, V, RH, RW, O, LSE,
             sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, heads, scale,
             N: tl.constexpr, H: tl.constexpr, W: tl.constexpr, WP: tl.constexpr,
             D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """One block of queries of one (image, head): O [BLOCK_M, D] and its rows' LSE."""
    z, block = _program(H, WP, BLOCK_M)
    b, h = z // heads, z % heads
    tok_m, m_ok = _tokens(block * BLOCK_M + tl.arange(0, BLOCK_M), H, W, WP)
    offs_d, cols = tl.arange(0, BLOCK_D), tl.arange(0, WP)
    d_ok = offs_d < D
    q = tl.load(Q + b * sqb + h * sqh + tok_m[:, None] * sqn + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
    RH += z * N * H
    RW += z * N * W
    bw = tl.load(RW + tok_m[:, None] * W + cols[None, :],
                 mask=m_ok[:, None] & (cols < W)[None, :], other=0.0).to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row maximum
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running row sum of exp
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, H * WP, BLOCK_N):
        tok_n, n_ok = _tokens(start_n + tl.arange(0, BLOCK_N), H, W, WP)
        k = tl.load(K + b * skb + h * skh + tok_n[None, :] * skn + offs_d[:, None],
                    mask=d_ok[:, None] & n_ok[None, :], other=0.0)  # (BLOCK_D, BLOCK_N)
        s = tl.dot(q, k, input_precision=PRECISION) * scale
        bh = _row_bias(RH, tok_m, m_ok, start_n, H, WP, BLOCK_N)
        s = _add_bias(s, bh, bw, BLOCK_M, BLOCK_N, WP)
        s = tl.where(n_ok[None, :], s, float("-inf"))  # (BLOCK_M, BLOCK_N)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + b * svb + h * svh + tok_n[:, None] * svn + offs_d[None, :],
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(O + z * N * D + tok_m[:, None] * D + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(LSE + z * N + tok_m, m_i + tl.log(l_i), mask=m_ok)


@triton.jit
def backward_kv(Q, K, V, RH, RW, DO, LSE, DELTA, DK, DV,
                 sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, heads, scale,
                 N: tl.constexpr, H: tl.constexpr, W: tl.constexpr, WP: tl.constexpr,
                 D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """dK, dV of one block of keys of one (image, head), over every block of queries."""
    z, block = _program(H, WP, BLOCK_N)
    b, h = z // heads, z % heads
    start_n = block * BLOCK_N
    tok_n, n_ok = _tokens(start_n + tl.arange(0, BLOCK_N), H, W, WP)
    offs_d, cols = tl.arange(0, BLOCK_D), tl.arange(0, WP)
    d_ok = offs_d < D
    nd_ok = n_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b * skb + h * skh + tok_n[:, None] * skn + offs_d[None, :],
                mask=nd_ok, other=0.0)  # (BLOCK_N, BLOCK_D)
    v = tl.load(V + b * svb + h * svh + tok_n[:, None] * svn + offs_d[None, :],
                mask=nd_ok, other=0.0)
    RH += z * N * H
    RW += z * N * W
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start_m in range(0, H * WP, BLOCK_M):
        tok_m, m_ok = _tokens(start_m + tl.arange(0, BLOCK_M), H, W, WP)
        md_ok = m_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + b * sqb + h * sqh + tok_m[:, None] * sqn + offs_d[None, :],
                    mask=md_ok, other=0.0)  # (BLOCK_M, BLOCK_D)
        do = tl.load(DO + z * N * D + tok_m[:, None] * D + offs_d[None, :],
                     mask=md_ok, other=0.0)
        lse = tl.load(LSE + z * N + tok_m, mask=m_ok, other=0.0)
        delta = tl.load(DELTA + z * N + tok_m, mask=m_ok, other=0.0)
        bw = tl.load(RW + tok_m[:, None] * W + cols[None, :],
                     mask=m_ok[:, None] & (cols < W)[None, :], other=0.0).to(tl.float32)
        bh = _row_bias(RH, tok_m, m_ok, start_n, H, WP, BLOCK_N)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        s = _add_bias(s, bh, bw, BLOCK_M, BLOCK_N, WP)
        p = tl.where(m_ok[:, None] & n_ok[None, :], tl.exp(s - lse[:, None]), 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])  # dScore (BLOCK_M, BLOCK_N)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    out = z * N * D + tok_n[:, None] * D + offs_d[None, :]
    tl.store(DK + out, (dk * scale).to(DK.dtype.element_ty), mask=nd_ok)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=nd_ok)


@triton.jit
def backward_q(Q, K, V, RH, RW, DO, LSE, DELTA, DQ, DRH, DRW,
                sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, heads, scale,
                N: tl.constexpr, H: tl.constexpr, W: tl.constexpr, WP: tl.constexpr,
                D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """dQ and the bias gradients d rel_h, d rel_w of one block of queries."""
    z, block = _program(H, WP, BLOCK_M)
    b, h = z // heads, z % heads
    tok_m, m_ok = _tokens(block * BLOCK_M + tl.arange(0, BLOCK_M), H, W, WP)
    offs_d, cols = tl.arange(0, BLOCK_D), tl.arange(0, WP)
    d_ok = offs_d < D
    md_ok = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * sqb + h * sqh + tok_m[:, None] * sqn + offs_d[None, :],
                mask=md_ok, other=0.0)  # (BLOCK_M, BLOCK_D)
    do = tl.load(DO + z * N * D + tok_m[:, None] * D + offs_d[None, :], mask=md_ok,
                 other=0.0)
    lse = tl.load(LSE + z * N + tok_m, mask=m_ok, other=0.0)
    delta = tl.load(DELTA + z * N + tok_m, mask=m_ok, other=0.0)
    RH += z * N * H
    RW += z * N * W
    DRH += z * N * H
    bw_ok = m_ok[:, None] & (cols < W)[None, :]
    bw = tl.load(RW + tok_m[:, None] * W + cols[None, :], mask=bw_ok,
                 other=0.0).to(tl.float32)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    drw = tl.zeros([BLOCK_M, WP], tl.float32)
    for start_n in range(0, H * WP, BLOCK_N):
        tok_n, n_ok = _tokens(start_n + tl.arange(0, BLOCK_N), H, W, WP)
        nd_ok = n_ok[:, None] & d_ok[None, :]
        k = tl.load(K + b * skb + h * skh + tok_n[:, None] * skn + offs_d[None, :],
                    mask=nd_ok, other=0.0)  # (BLOCK_N, BLOCK_D)
        v = tl.load(V + b * svb + h * svh + tok_n[:, None] * svn + offs_d[None, :],
                    mask=nd_ok, other=0.0)
        bh = _row_bias(RH, tok_m, m_ok, start_n, H, WP, BLOCK_N)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        s = _add_bias(s, bh, bw, BLOCK_M, BLOCK_N, WP)
        p = tl.where(m_ok[:, None] & n_ok[None, :], tl.exp(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])  # dScore (BLOCK_M, BLOCK_N), 0 off the grid
        dq += tl.dot(ds.to(q.dtype), k, input_precision=PRECISION)
        rows = start_n // WP + tl.arange(0, BLOCK_N // WP)
        if BLOCK_N == WP:  # one key row: its d rel_h is the row sum
            drw += ds
            drh = tl.sum(ds, 1)[:, None]  # (BLOCK_M, 1)
        else:
            ds3 = tl.reshape(ds, (BLOCK_M, BLOCK_N // WP, WP))
            drw += tl.sum(ds3, 1)
            drh = tl.sum(ds3, 2)  # (BLOCK_M, RB)
        tl.store(DRH + tok_m[:, None] * H + rows[None, :], drh.to(DRH.dtype.element_ty),
                 mask=m_ok[:, None] & (rows < H)[None, :])
    tl.store(DQ + z * N * D + tok_m[:, None] * D + offs_d[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=md_ok)
    tl.store(DRW + z * N * W + tok_m[:, None] * W + cols[None, :],
             drw.to(DRW.dtype.element_ty), mask=bw_ok)
