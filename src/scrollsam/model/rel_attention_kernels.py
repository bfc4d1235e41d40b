"""The Triton kernels of :mod:`scrollsam.model.rel_attention` (see there for the method).

Programs cover one (image, head) ``z`` and one block of queries (NQ of them, in order) or of key
positions of the padded key grid (H rows of WP = W rounded up to a power of two); BLOCK_N is a
multiple of WP, so a key block is whole rows. Tensors: q [B, nh, NQ, D], k, v [B, nh, N, D]
(N = H * W) with strides (``s?b``, ``s?h``, ``s?n``) and a unit last stride; O, DO, DQ
contiguous [B * nh, NQ, D], DK, DV [B * nh, N, D]; RH, RW, DRH, DRW contiguous
[B * nh, NQ, H or W]; LSE, DELTA float32 [B * nh, NQ] (DELTA written by backward_q, which
runs first, and read by backward_kv). Tiles are float32 except loaded q, k, v,
dO (their dtype). The head dim D is walked in one or two parts, BLOCK_D and BLOCK_D2 columns
(``rel_attention.head_parts``: vit_h's 80 as 64 + 16, with 0 for no second part, whose code
the compiler drops), each product over the head dim a sum of the parts' products. Only
imported where Triton is.

Each softmax term is ``exp2(s * LOG2E - m * LOG2E)``, one fused multiply-add and one exp2 per
score, with the row's ``m * LOG2E`` computed once (``exp`` would cost a multiply and, compiled
for sm_90, a denormal check around each exp2 besides). Padded positions need no per-score
select: their bias is -inf (columns >= W in rel_w, rows >= H in rel_h), so their softmax terms
are 0, and queries past NQ load zeros (q, dO), so they add 0 to every gradient.
"""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): exp(x) = exp2(x * LOG2E)


@triton.jit
def _program(POSITIONS: tl.constexpr, BLOCK: tl.constexpr):
    """This program's (image and head z as int64, so that offsets past 2**31 elements do not
    wrap; index of its block of BLOCK of the POSITIONS), blocks varying fastest."""
    blocks = (POSITIONS + BLOCK - 1) // BLOCK  # constexpr arithmetic: a compile-time number
    pid = tl.program_id(0)
    return (pid // blocks).to(tl.int64), pid % blocks


@triton.jit
def _heads(Q, K, V, z, heads, sqb, sqh, skb, skh, svb, svh):
    """q, k and v of (image and head) ``z``: their base pointers."""
    b, h = z // heads, z % heads
    return Q + b * sqb + h * sqh, K + b * skb + h * skh, V + b * svb + h * svh


@triton.jit
def _queries(start, BLOCK_M: tl.constexpr, NQ: tl.constexpr):
    """Queries start .. start + BLOCK_M - 1 -> (their index, real: index < NQ)."""
    tok = start + tl.arange(0, BLOCK_M)
    return tok, tok < NQ


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
def _part(PTR, token, ok, stride, START: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr):
    """Head-dim columns START .. START + BLOCK - 1 of rows ``token`` of a [.., N, D] tensor
    (row stride ``stride``) -> [len(token), BLOCK], 0 where not ``ok`` or past D."""
    offs = START + tl.arange(0, BLOCK)
    return tl.load(PTR + token[:, None] * stride + offs[None, :],
                   mask=ok[:, None] & (offs < D)[None, :], other=0.0)


@triton.jit
def _store_part(PTR, value, token, ok, START: tl.constexpr, BLOCK: tl.constexpr,
                D: tl.constexpr):
    """Store ``value`` [len(token), BLOCK] as head-dim columns START .. of rows ``token`` of a
    contiguous [.., D] tensor, where ``ok`` and below D."""
    offs = START + tl.arange(0, BLOCK)
    tl.store(PTR + token[:, None] * D + offs[None, :], value.to(PTR.dtype.element_ty),
             mask=ok[:, None] & (offs < D)[None, :])


@triton.jit
def _bias(TABLE, tok_m, m_ok, index, size: tl.constexpr):
    """Columns ``index`` of the queries' rows of a bias table [NQ, size] -> [BLOCK_M,
    len(index)] float32: -inf at ``index >= size`` (padding), 0 in padded rows."""
    real = index < size
    b = tl.load(TABLE + tok_m[:, None] * size + index[None, :],
                mask=m_ok[:, None] & real[None, :], other=0.0).to(tl.float32)
    return tl.where(real[None, :], b, float("-inf"))


@triton.jit
def _scores(qk, scale, RH, bw, tok_m, m_ok, start_n, H: tl.constexpr, WP: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """scale * ``qk`` (q k^T) plus the bias of the key block at ``start_n`` -> [BLOCK_M,
    BLOCK_N]: rel_h [BLOCK_M, RB] (RB = BLOCK_N / WP key rows) over each row's WP columns, and
    rel_w ``bw`` [BLOCK_M, WP] (from :func:`_bias`) over each of the RB rows."""
    s = qk * scale
    bh = _bias(RH, tok_m, m_ok, start_n // WP + tl.arange(0, BLOCK_N // WP), H)
    if BLOCK_N == WP:  # bw, the same for every key block, is converted to s's layout once
        return s + bh + bw
    bias = bh[:, :, None] + bw[:, None, :]  # (BLOCK_M, RB, WP), row-major as the keys
    return s + tl.reshape(bias, (BLOCK_M, BLOCK_N))


@triton.jit
def forward(Q, K, V, RH, RW, O, LSE,
            sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, heads, scale,
            NQ: tl.constexpr, N: tl.constexpr, H: tl.constexpr, W: tl.constexpr,
            WP: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr, PRECISION: tl.constexpr):
    """One block of queries of one (image, head): O [BLOCK_M, D] and its rows' LSE."""
    z, block = _program(NQ, BLOCK_M)
    tok_m, m_ok = _queries(block * BLOCK_M, BLOCK_M, NQ)
    Qz, Kz, Vz = _heads(Q, K, V, z, heads, sqb, sqh, skb, skh, svb, svh)
    q = _part(Qz, tok_m, m_ok, sqn, 0, BLOCK_D, D)  # (BLOCK_M, BLOCK_D)
    if BLOCK_D2 > 0:  # the head dim's second part (80 = 64 + 16)
        q2 = _part(Qz, tok_m, m_ok, sqn, BLOCK_D, BLOCK_D2, D)  # (BLOCK_M, BLOCK_D2)
        acc2 = tl.zeros([BLOCK_M, BLOCK_D2], tl.float32)
    RH += z * NQ * H
    bw = _bias(RW + z * NQ * W, tok_m, m_ok, tl.arange(0, WP), W)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row maximum
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running row sum of exp
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, H * WP, BLOCK_N):
        tok_n, n_ok = _tokens(start_n + tl.arange(0, BLOCK_N), H, W, WP)
        k = _part(Kz, tok_n, n_ok, skn, 0, BLOCK_D, D)  # (BLOCK_N, BLOCK_D)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # (BLOCK_M, BLOCK_N)
        if BLOCK_D2 > 0:
            k2 = _part(Kz, tok_n, n_ok, skn, BLOCK_D, BLOCK_D2, D)
            qk += tl.dot(q2, tl.trans(k2), input_precision=PRECISION)
        s = _scores(qk, scale, RH, bw, tok_m, m_ok, start_n, H, WP, BLOCK_M, BLOCK_N)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2((m_i - m_new) * LOG2E)
        p = tl.exp2(s * LOG2E - (m_new * LOG2E)[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _part(Vz, tok_n, n_ok, svn, 0, BLOCK_D, D)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        if BLOCK_D2 > 0:
            v2 = _part(Vz, tok_n, n_ok, svn, BLOCK_D, BLOCK_D2, D)
            acc2 = acc2 * alpha[:, None] + tl.dot(p.to(v2.dtype), v2,
                                                  input_precision=PRECISION)
        m_i = m_new
    _store_part(O + z * NQ * D, acc / l_i[:, None], tok_m, m_ok, 0, BLOCK_D, D)
    if BLOCK_D2 > 0:
        _store_part(O + z * NQ * D, acc2 / l_i[:, None], tok_m, m_ok, BLOCK_D, BLOCK_D2, D)
    tl.store(LSE + z * NQ + tok_m, m_i + tl.log(l_i), mask=m_ok)


@triton.jit
def backward_kv(Q, K, V, RH, RW, DO, LSE, DELTA, DK, DV,
                sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, heads, scale,
                NQ: tl.constexpr, N: tl.constexpr, H: tl.constexpr, W: tl.constexpr,
                WP: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr, PRECISION: tl.constexpr):
    """dK, dV of one block of keys of one (image, head), over every block of queries."""
    z, block = _program(H * WP, BLOCK_N)
    start_n = block * BLOCK_N
    tok_n, n_ok = _tokens(start_n + tl.arange(0, BLOCK_N), H, W, WP)
    Qz, Kz, Vz = _heads(Q, K, V, z, heads, sqb, sqh, skb, skh, svb, svh)
    DOz = DO + z * NQ * D
    k = _part(Kz, tok_n, n_ok, skn, 0, BLOCK_D, D)  # (BLOCK_N, BLOCK_D)
    v = _part(Vz, tok_n, n_ok, svn, 0, BLOCK_D, D)
    if BLOCK_D2 > 0:  # the head dim's second part
        k2 = _part(Kz, tok_n, n_ok, skn, BLOCK_D, BLOCK_D2, D)  # (BLOCK_N, BLOCK_D2)
        v2 = _part(Vz, tok_n, n_ok, svn, BLOCK_D, BLOCK_D2, D)
        dk2 = tl.zeros([BLOCK_N, BLOCK_D2], tl.float32)
        dv2 = tl.zeros([BLOCK_N, BLOCK_D2], tl.float32)
    RH += z * NQ * H
    RW += z * NQ * W
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start_m in range(0, NQ, BLOCK_M):
        tok_m, m_ok = _queries(start_m, BLOCK_M, NQ)
        q = _part(Qz, tok_m, m_ok, sqn, 0, BLOCK_D, D)  # (BLOCK_M, BLOCK_D)
        do = _part(DOz, tok_m, m_ok, D, 0, BLOCK_D, D)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # (BLOCK_M, BLOCK_N)
        if BLOCK_D2 > 0:
            q2 = _part(Qz, tok_m, m_ok, sqn, BLOCK_D, BLOCK_D2, D)
            do2 = _part(DOz, tok_m, m_ok, D, BLOCK_D, BLOCK_D2, D)
            qk += tl.dot(q2, tl.trans(k2), input_precision=PRECISION)
        lse = tl.load(LSE + z * NQ + tok_m, mask=m_ok, other=0.0) * LOG2E
        delta = tl.load(DELTA + z * NQ + tok_m, mask=m_ok, other=0.0)
        bw = _bias(RW, tok_m, m_ok, tl.arange(0, WP), W)
        s = _scores(qk, scale, RH, bw, tok_m, m_ok, start_n, H, WP, BLOCK_M, BLOCK_N)
        p = tl.exp2(s * LOG2E - lse[:, None])  # padded queries: dO = 0, so they add nothing
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        if BLOCK_D2 > 0:
            dv2 += tl.dot(tl.trans(p.to(do2.dtype)), do2, input_precision=PRECISION)
            dp += tl.dot(do2, tl.trans(v2), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])  # dScore (BLOCK_M, BLOCK_N)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
        if BLOCK_D2 > 0:
            dk2 += tl.dot(tl.trans(ds.to(q2.dtype)), q2, input_precision=PRECISION)
    _store_part(DK + z * N * D, dk * scale, tok_n, n_ok, 0, BLOCK_D, D)
    _store_part(DV + z * N * D, dv, tok_n, n_ok, 0, BLOCK_D, D)
    if BLOCK_D2 > 0:
        _store_part(DK + z * N * D, dk2 * scale, tok_n, n_ok, BLOCK_D, BLOCK_D2, D)
        _store_part(DV + z * N * D, dv2, tok_n, n_ok, BLOCK_D, BLOCK_D2, D)


@triton.jit
def backward_q(Q, K, V, RH, RW, DO, O, LSE, DELTA, DQ, DRH, DRW,
               sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, heads, scale,
               NQ: tl.constexpr, N: tl.constexpr, H: tl.constexpr, W: tl.constexpr,
               WP: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr, PRECISION: tl.constexpr):
    """dQ and the bias gradients d rel_h, d rel_w of one block of queries, and its rows' DELTA
    (rowsum(dO * O), float32, stored for :func:`backward_kv`, which runs after): d rel_w sums
    dS over the rows of every key block; d rel_h of a key row, the sum of dS over its columns,
    is complete in the one key block that holds the row, and stored there."""
    z, block = _program(NQ, BLOCK_M)
    tok_m, m_ok = _queries(block * BLOCK_M, BLOCK_M, NQ)
    cols = tl.arange(0, WP)
    Qz, Kz, Vz = _heads(Q, K, V, z, heads, sqb, sqh, skb, skh, svb, svh)
    DOz, Oz = DO + z * NQ * D, O + z * NQ * D
    q = _part(Qz, tok_m, m_ok, sqn, 0, BLOCK_D, D)  # (BLOCK_M, BLOCK_D)
    do = _part(DOz, tok_m, m_ok, D, 0, BLOCK_D, D)
    delta = tl.sum(do.to(tl.float32) * _part(Oz, tok_m, m_ok, D, 0, BLOCK_D, D).to(tl.float32),
                   1)  # (BLOCK_M,): 0 at padded queries (dO = 0)
    if BLOCK_D2 > 0:  # the head dim's second part
        q2 = _part(Qz, tok_m, m_ok, sqn, BLOCK_D, BLOCK_D2, D)  # (BLOCK_M, BLOCK_D2)
        do2 = _part(DOz, tok_m, m_ok, D, BLOCK_D, BLOCK_D2, D)
        delta += tl.sum(do2.to(tl.float32)
                        * _part(Oz, tok_m, m_ok, D, BLOCK_D, BLOCK_D2, D).to(tl.float32), 1)
        dq2 = tl.zeros([BLOCK_M, BLOCK_D2], tl.float32)
    tl.store(DELTA + z * NQ + tok_m, delta, mask=m_ok)
    lse = tl.load(LSE + z * NQ + tok_m, mask=m_ok, other=0.0) * LOG2E
    RH += z * NQ * H
    DRH += z * NQ * H
    bw = _bias(RW + z * NQ * W, tok_m, m_ok, cols, W)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    drw = tl.zeros([BLOCK_M, WP], tl.float32)
    for start_n in range(0, H * WP, BLOCK_N):
        tok_n, n_ok = _tokens(start_n + tl.arange(0, BLOCK_N), H, W, WP)
        k = _part(Kz, tok_n, n_ok, skn, 0, BLOCK_D, D)  # (BLOCK_N, BLOCK_D)
        v = _part(Vz, tok_n, n_ok, svn, 0, BLOCK_D, D)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # (BLOCK_M, BLOCK_N)
        if BLOCK_D2 > 0:
            k2 = _part(Kz, tok_n, n_ok, skn, BLOCK_D, BLOCK_D2, D)
            v2 = _part(Vz, tok_n, n_ok, svn, BLOCK_D, BLOCK_D2, D)
            qk += tl.dot(q2, tl.trans(k2), input_precision=PRECISION)
        s = _scores(qk, scale, RH, bw, tok_m, m_ok, start_n, H, WP, BLOCK_M, BLOCK_N)
        p = tl.exp2(s * LOG2E - lse[:, None])  # 0 at padded keys
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        if BLOCK_D2 > 0:
            dp += tl.dot(do2, tl.trans(v2), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])  # dScore (BLOCK_M, BLOCK_N), 0 off the grid: p = 0
        # at padded keys, dP = delta = 0 at padded queries
        dq += tl.dot(ds.to(q.dtype), k, input_precision=PRECISION)
        if BLOCK_D2 > 0:
            dq2 += tl.dot(ds.to(q2.dtype), k2, input_precision=PRECISION)
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
    _store_part(DQ + z * NQ * D, dq * scale, tok_m, m_ok, 0, BLOCK_D, D)
    if BLOCK_D2 > 0:
        _store_part(DQ + z * NQ * D, dq2 * scale, tok_m, m_ok, BLOCK_D, BLOCK_D2, D)
    tl.store(DRW + z * NQ * W + tok_m[:, None] * W + cols[None, :],
             drw.to(DRW.dtype.element_ty), mask=m_ok[:, None] & (cols < W)[None, :])
