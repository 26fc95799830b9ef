"""The flash-attention backward kernels (CUDA C++ text over flash_tiles.py's TILES; the algorithm and the
launches: tensor/cuda/flash_attention.py): Delta, dK/dV (with the fused dQ of the 16-bit types), dQ for float32,
and the dQ conversion."""

BACKWARD = r"""
// ---- backward 1: Delta = rowsum(dO * O); with FUSED_DQ it also zeroes the row of the float32 dQ
// accumulator (rows, D) that flash_bwd_dkdv adds to. 128 threads; VEC false: one warp per row, one element
// per lane at a time (grid ceil(rows / 4)); VEC true: 16 bytes per thread (R = D * sizeof(S) / 16 threads
// a row, 128 / R rows per block, grid ceil(rows / (128 / R))): whole 16-byte loads and stores instead of
// 2-byte ones, for a narrower shuffle reduction
template <class T, int D, bool VEC>
__global__ void __launch_bounds__(128) flash_bwd_delta(const typename T::S* __restrict__ go,
        const typename T::S* __restrict__ o, float* __restrict__ delta, float* __restrict__ dq_acc, int rows, int H,
        int Tq, long long osb, long long osh, int ost) {
    typedef typename T::S S;
    constexpr int E = 16 / sizeof(S), R = VEC ? D / E : 32;   // elements per load, threads per row
    const int r = blockIdx.x * (128 / R) + threadIdx.x / R, lane = threadIdx.x % R;
    const bool in = r < rows;   // (no early return: every lane of the warp takes part in the shuffles)
    const long long ro = in ? fa_head(r / Tq, H, osb, osh) + (long long)(r % Tq) * ost : 0;   // row r of O, dO
    float s = 0.f;
    if constexpr (VEC) {
        if (in) {
            __align__(16) S a[E], b[E];
            copy16(a, go + ro + lane * E);
            copy16(b, o + ro + lane * E);
#pragma unroll
            for (int e = 0; e < E; ++e) s += T::tof(a[e]) * T::tof(b[e]);
        }
    } else if (in) {
        for (int d = lane; d < D; d += 32) s += T::tof(go[ro + d]) * T::tof(o[ro + d]);
    }
    for (int w = R / 2; w > 0; w >>= 1) s += __shfl_xor_sync(FA_FULL, s, w);
    if (!in) return;
    if (lane == 0) delta[r] = s;
    if constexpr (T::FUSED_DQ) {
        if constexpr (VEC)
            for (int d = lane * 4; d < D; d += 4 * R) zero16(dq_acc + (long long)r * D + d);
        else
            for (int d = lane; d < D; d += 32) dq_acc[(long long)r * D + d] = 0.f;
    }
}

// ---- backward 4 (FUSED_DQ): dQ = dq_acc / sqrt(D) in the dtype (dQ strides), 8 elements per thread: two
// 16-byte loads of float32 sums, one 16-byte store (D is a multiple of 8, dQ's rows 16-byte aligned)
template <class T, int D>
__global__ void __launch_bounds__(256) flash_bwd_dq_convert(const float* __restrict__ dq_acc,
        typename T::S* __restrict__ dq, long long n8, float scale, int H, int Tq, long long dsb, long long dsh,
        int dst) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n8) return;
    const long long e = i * 8;
    const int row = (int)(e / D), col = (int)(e % D);   // row of B * H * Tq (< 2^31 rows)
    __align__(16) float a[8];
    __align__(16) typename T::S o[8];
    copy16(a, dq_acc + e);
    copy16(a + 4, dq_acc + e + 4);
#pragma unroll
    for (int c = 0; c < 8; ++c) o[c] = T::fromf(a[c] * scale);
    copy16(dq + fa_head(row / Tq, H, dsb, dsh) + (long long)(row % Tq) * dst + col, o);
}

// ---- backward 2: dK, dV for 16 * V::WARPS keys per block (16 per warp), looping over query tiles of N;
// with FUSED_DQ also dQ += dS K / sqrt(D) for each tile, added into dq_acc (float32, zeroed by
// flash_bwd_delta) by atomics (no second recomputation of S and dP); 32 * V::WARPS threads; grid
// (ceil(Tk / KB), B * H), or (B * H, ceil(Tk / KB)) with V::HEAVY_FIRST; dynamic shared memory of
// dkdv_smem_bytes (flash_attention.py computes the same count; a launch with less traps)
template <int WARPS_, int ATOM_, bool HEAVY_FIRST_, int STAGES_, int MIN_BLOCKS_, bool FAST_EXP_>
struct BwdV {
    // 4: 64 keys per block (128 threads); 8: 128 keys (256 threads): each query tile's Q/dO loads and
    // fused-dQ atomics serve twice the keys (half the global traffic and atomics per key), for twice
    // the shared memory (K and dS^T of 128 keys) and half the blocks (a coarser causal tail)
    static constexpr int WARPS = WARPS_;
    // fused dQ's atomics: 1 = atomicAdd per float; 2 = red.global.add.v2.f32 (the two adjacent columns a
    // lane holds: half the atomic instructions); 4 = red.v4 after one pair exchange with the lane t ^ 1
    // (a quarter of the atomics, for two shuffles per 8 columns)
    static constexpr int ATOM = ATOM_;
    // grid (B * H, key blocks): blocks are dispatched in order of their linear index, so every head's
    // first key blocks (causal: the most query tiles) start in the first wave and the short ones fill
    // the tail; false: (key blocks, B * H), head after head
    static constexpr bool HEAVY_FIRST = HEAVY_FIRST_;
    // query-tile stages: 2 = the next tile's cp.async in flight during this one's products (more shared
    // memory, fewer blocks per SM); 1 = load then compute; 0 = 2 where the total fits 48 KiB, else 1
    static constexpr int STAGES = STAGES_;
    // blocks per SM the compiler must fit (__launch_bounds__' second argument; 0: no bound): 3 blocks of 4
    // warps cap registers at 168 (12 warps per SM to hide the mma/ldmatrix latencies instead of 8), at the
    // price of spills where the kernel needs more
    static constexpr int MIN_BLOCKS = MIN_BLOCKS_;
    // P = 2^x by ex2.approx.ftz (one MUFU op; results below 2^-126 flushed to 0) instead of exp2f's
    // denormal-safe sequence
    static constexpr bool FAST_EXP = FAST_EXP_;
};
// P = 2^(S^T scale_log2 - L) and dS^T = P (dP^T - Delta) (times sqrt(D) at the end), in place on a warp's
// (16 keys from key0, N queries from q0) fragments; L and Delta of the tile's queries in sl, sd. ALL: every
// pair is allowed, no per-element test; two builds, so that the common (full) tiles carry no branches
template <bool ALL, bool FAST_EXP, int N>
__device__ __forceinline__ void softmax_grad(float (&st)[N / 8][4], float (&dpt)[N / 8][4], const float* sl,
        const float* sd, float scale_log2, int key0, int q0, int Tq, int Tk, int off, int causal,
        const unsigned char* mrow) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int nt = 0; nt < N / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int j = key0 + g + 8 * (e >> 1), c = nt * 8 + 2 * t + (e & 1), i = q0 + c;
            const float x = st[nt][e] * scale_log2 - sl[c];
            const float p = ALL || (i < Tq && fa_allowed(i, j, Tk, off, causal, mrow)) ? (FAST_EXP ? fast_exp2(x) : exp2f(x)) : 0.f;
            st[nt][e] = p;
            dpt[nt][e] = p * (dpt[nt][e] - sd[c]);
        }
}
template <class T, int D, int N, class V>
struct DkdvSmem {
    static constexpr bool F = T::FUSED_DQ;
    static constexpr int KB = 16 * V::WARPS, FK = F ? KB : 1, FN = F ? N : 1;   // FK, FN: the fused dQ's buffers
    // VS: V of the block's keys in shared memory too, its fragments read by ldmatrix at each use (with K's
    // fragments beside two (16, D) accumulators, registers hold V's only up to D = 64; above that they
    // were reloaded from global memory at each use)
    static constexpr bool VS = F && D > 64;
    static constexpr int FV = VS ? KB : 0;
    static constexpr int tiles(int st) { return (2 * st * N * (D + FA_PAD) + FK * (D + FA_PAD) + FK * (FN + FA_PAD) + FV * (D + FA_PAD)); }
    static constexpr int bytes_for(int st) { return (tiles(st) * (int)sizeof(typename T::S) + 15) / 16 * 16 + 8 * st * N; }
    static constexpr int ST = V::STAGES ? V::STAGES : (bytes_for(2) <= 48 * 1024 ? 2 : 1);
    static constexpr int BYTES = bytes_for(ST), FLOATS_AT = BYTES - 8 * ST * N;   // L and Delta after the tiles
    static_assert(BYTES <= 227 * 1024, "flash_bwd_dkdv: shared memory");
};
template <class T, int D, int N, class V>
__global__ void __launch_bounds__(32 * V::WARPS, V::MIN_BLOCKS) flash_bwd_dkdv(const typename T::S* __restrict__ q,
        const typename T::S* __restrict__ k, const typename T::S* __restrict__ v, const unsigned char* __restrict__ mask,
        const typename T::S* __restrict__ go, const float* __restrict__ lse, const float* __restrict__ delta,
        typename T::S* __restrict__ dk, typename T::S* __restrict__ dv, float* __restrict__ dq_acc, int H, int Tq,
        int Tk, int causal, int has_mask, float scale_log2, float scale, FA_IN_STRIDES, long long dsb, long long dsh,
        int dst) {
    typedef typename T::S S; typedef typename T::P P;
    typedef DkdvSmem<T, D, N, V> M;
    constexpr int ST = M::ST, KB = M::KB, FK = M::FK, FN = M::FN, W = V::WARPS;
    FA_DYNAMIC_SMEM(smem);
    if (dynamic_smem_size() < (unsigned)M::BYTES) __trap();   // the launch's byte count disagrees with M
    S (*sQ)[N][D + FA_PAD] = reinterpret_cast<S (*)[N][D + FA_PAD]>(smem);   // [ST]: the query tile's Q
    S (*sG)[N][D + FA_PAD] = sQ + ST;                                        // [ST]: its dO
    S (*sK)[D + FA_PAD] = reinterpret_cast<S (*)[D + FA_PAD]>(sG + ST);      // [FK]: the block's keys (dS K)
    S (*sdS)[FN + FA_PAD] = reinterpret_cast<S (*)[FN + FA_PAD]>(sK + FK);   // [FK]: dS^T, rows = keys
    S (*sV)[D + FA_PAD] = reinterpret_cast<S (*)[D + FA_PAD]>(sdS + FK);     // [FV]: the block's values (VS)
    float (*sL)[N] = reinterpret_cast<float (*)[N]>(smem + M::FLOATS_AT);   // [ST]
    float (*sD)[N] = sL + ST;                                                                                 // [ST]
    const int bh = V::HEAVY_FIRST ? blockIdx.x : blockIdx.y, kblock = V::HEAVY_FIRST ? blockIdx.y : blockIdx.x;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int k0 = kblock * KB, key0 = k0 + warp * 16, off = Tk - Tq;
    const long long qoff = fa_head(bh, H, qsb, qsh), koff = fa_head(bh, H, ksb, ksh), goff = fa_head(bh, H, osb, osh);
    const long long dkoff = fa_head(bh, H, dsb, dsh);   // dK and dV: the dKV strides
    const unsigned char* mrow = has_mask ? mask + (long long)(bh / H) * Tk : nullptr;
    RowFrags<T, D, T::CACHE && !T::FUSED_DQ> ka;   // with FUSED_DQ: K's fragments from sK by ldmatrix
    RowFrags<T, D, T::CACHE && D <= 64> va;
    ka.init(k + koff + (long long)key0 * kst, Tk - key0, kst);
    va.init(v + koff + (long long)key0 * kst, Tk - key0, kst);
    float ak[D / 8][4], av[D / 8][4];
#pragma unroll
    for (int nt = 0; nt < D / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) ak[nt][e] = av[nt][e] = 0.f;
    if constexpr (T::FUSED_DQ) load_tile<T, D, FK>(sK, k + koff, k0, Tk, kst);   // visible after the loop's barrier
    if constexpr (M::VS) load_tile<T, D, M::FV>(sV, v + koff, k0, Tk, kst);
    int qstart = causal ? max(0, k0 - off) : 0;   // earlier queries see none of these keys
    qstart -= qstart % N;
    for (int q0 = qstart, it = 0; q0 < Tq; q0 += N, ++it) {
        const int cur = ST == 2 ? (it & 1) : 0;
        // (a stage is refilled only after the closing barrier of the iteration that last read it)
        if (ST == 1 || it == 0)   // this tile, unless the previous iteration prefetched it
            load_query_tile<T, D, N, 32 * W>(sQ[cur], sG[cur], sL[cur], sD[cur], q + qoff, go + goff, lse + (long long)bh * Tq,
                                     delta + (long long)bh * Tq, q0, Tq, qst, ost);
        cp_async_commit();
        if (ST == 2 && q0 + N < Tq)
            load_query_tile<T, D, N, 32 * W>(sQ[cur ^ 1], sG[cur ^ 1], sL[cur ^ 1], sD[cur ^ 1], q + qoff, go + goff,
                                     lse + (long long)bh * Tq, delta + (long long)bh * Tq, q0 + N, Tq, qst, ost);
        cp_async_commit();
        cp_async_wait<1>();   // every group but the newest (the prefetch): this tile has landed
        __syncthreads();
        float st[N / 8][4], dpt[N / 8][4];   // S^T and dP^T: rows = this warp's keys, columns = queries
#pragma unroll
        for (int nt = 0; nt < N / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) st[nt][e] = dpt[nt][e] = 0.f;
#pragma unroll
        for (int kc = 0; kc < D / 16; ++kc) {
            P tk[4], tv[4];
            const P* a = tk;
            if constexpr (T::FUSED_DQ) load_a_sm<T>(tk, &sK[warp * 16][kc * 16], D + FA_PAD);
            else a = ka.get(kc, tk);
            const P* b = tv;
            if constexpr (M::VS) load_a_sm<T>(tv, &sV[warp * 16][kc * 16], D + FA_PAD);
            else b = va.get(kc, tv);
#pragma unroll
            for (int nt = 0; nt < N / 8; nt += 2) {
                P bb[2][2];
                load_b_nk2<T>(bb, &sQ[cur][nt * 8][kc * 16], D + FA_PAD);
                T::mma(st[nt], a, bb[0]);
                T::mma(st[nt + 1], a, bb[1]);
                load_b_nk2<T>(bb, &sG[cur][nt * 8][kc * 16], D + FA_PAD);
                T::mma(dpt[nt], b, bb[0]);
                T::mma(dpt[nt + 1], b, bb[1]);
            }
        }
        // every query of the tile sees every key of this warp (warp-uniform): the build without a test
        if (!has_mask && key0 + 16 <= Tk && q0 + N <= Tq && (!causal || key0 + 15 <= q0 + off))
            softmax_grad<true, V::FAST_EXP, N>(st, dpt, sL[cur], sD[cur], scale_log2, key0, q0, Tq, Tk, off, causal, mrow);
        else
            softmax_grad<false, V::FAST_EXP, N>(st, dpt, sL[cur], sD[cur], scale_log2, key0, q0, Tq, Tk, off, causal, mrow);
#pragma unroll
        for (int kc = 0; kc < N / 16; ++kc) {
            P pa[4], sa[4];
            c_to_a<T>(pa, st[2 * kc], st[2 * kc + 1]);
            c_to_a<T>(sa, dpt[2 * kc], dpt[2 * kc + 1]);
#pragma unroll
            for (int nt = 0; nt < D / 8; nt += 2) {
                P bb[2][2];
                load_b_kn2<T>(bb, &sG[cur][kc * 16][nt * 8], D + FA_PAD);
                T::mma(av[nt], pa, bb[0]);   // dV += P^T dO
                T::mma(av[nt + 1], pa, bb[1]);
                load_b_kn2<T>(bb, &sQ[cur][kc * 16][nt * 8], D + FA_PAD);
                T::mma(ak[nt], sa, bb[0]);   // dK += dS^T Q
                T::mma(ak[nt + 1], sa, bb[1]);
            }
        }
        if constexpr (T::FUSED_DQ) {
            // dS^T (rounded as for dK) to shared memory; then warp w computes rows 16 (w % MT) .. of the
            // tile's (N, D) product dS K, columns NT * 8 (w / MT) .., and adds them to dq_acc
#pragma unroll
            for (int nt = 0; nt < N / 8; ++nt)
#pragma unroll
                for (int h = 0; h < 2; ++h)
                    *(P*)&sdS[warp * 16 + g + 8 * h][nt * 8 + 2 * t] = T::pack(dpt[nt][2 * h], dpt[nt][2 * h + 1]);
            __syncthreads();
            constexpr int MT = N / 16, NT = D / 8 / (W / MT);   // m-tiles of the tile; n-tiles per warp
            static_assert(W % MT == 0 && NT % 2 == 0, "flash_bwd_dkdv: fused dQ split");
            const int mt = warp % MT, nb = (warp / MT) * NT, i = lane >> 3, r = lane & 7;
            float dqa[NT][4];
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) dqa[nt][0] = dqa[nt][1] = dqa[nt][2] = dqa[nt][3] = 0.f;
#pragma unroll
            for (int kc = 0; kc < KB / 16; ++kc) {   // the block's keys, 16 at a time
                P a[4];   // A = dS (queries x keys): the transposes of sdS's 8x8 blocks
                ldsm_x4_trans(a, &sdS[kc * 16 + (i >> 1) * 8 + r][mt * 16 + (i & 1) * 8]);
#pragma unroll
                for (int nt = 0; nt < NT; nt += 2) {
                    P bb[2][2];
                    load_b_kn2<T>(bb, &sK[kc * 16][(nb + nt) * 8], D + FA_PAD);
                    T::mma(dqa[nt], a, bb[0]);
                    T::mma(dqa[nt + 1], a, bb[1]);
                }
            }
            float* tile_acc = dq_acc + ((long long)bh * Tq + q0 + mt * 16) * D + nb * 8;   // (16, NT * 8) of D
            if constexpr (V::ATOM == 4) {
                // lanes t, t ^ 1 swap pairs: even t then holds row g, columns 4 (t / 2) .. + 3; odd t row g + 8
                const bool even = (t & 1) == 0;
                const int row = g + (even ? 0 : 8);
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
                    const float s0 = even ? dqa[nt][2] : dqa[nt][0], s1 = even ? dqa[nt][3] : dqa[nt][1];
                    const float r0 = __shfl_xor_sync(FA_FULL, s0, 1), r1 = __shfl_xor_sync(FA_FULL, s1, 1);
                    if (q0 + mt * 16 + row < Tq) {   // (after the exchange: every lane shuffles)
                        float* p = tile_acc + (long long)row * D + nt * 8 + 4 * (t >> 1);
                        if (even) red_add_v4(p, dqa[nt][0], dqa[nt][1], r0, r1);
                        else red_add_v4(p, r0, r1, dqa[nt][2], dqa[nt][3]);
                    }
                }
            } else {
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    if (q0 + mt * 16 + g + 8 * h >= Tq) continue;
                    float* p = tile_acc + (long long)(g + 8 * h) * D + 2 * t;
#pragma unroll
                    for (int nt = 0; nt < NT; ++nt) {
                        if constexpr (V::ATOM == 2) red_add_v2(p + nt * 8, dqa[nt][2 * h], dqa[nt][2 * h + 1]);
                        else {
                            atomicAdd(p + nt * 8, dqa[nt][2 * h]);
                            atomicAdd(p + nt * 8 + 1, dqa[nt][2 * h + 1]);
                        }
                    }
                }
            }
        }
        __syncthreads();   // every warp done with stage cur (and sdS) before a later iteration refills it
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int j = key0 + g + 8 * h;
        if (j >= Tk) continue;
#pragma unroll
        for (int nt = 0; nt < D / 8; ++nt)
#pragma unroll
            for (int c = 0; c < 2; ++c) {
                const long long idx = dkoff + (long long)j * dst + nt * 8 + 2 * t + c;
                dk[idx] = T::fromf(ak[nt][2 * h + c] * scale);
                dv[idx] = T::fromf(av[nt][2 * h + c]);
            }
    }
}

// ---- backward 3 (float32, not FUSED_DQ): dQ for 64 queries per block (16 per warp), looping over key
// tiles of N; grid (ceil(Tq / 64), B * H), 128 threads
template <class T, int D, int N>
__global__ void __launch_bounds__(128) flash_bwd_dq(const typename T::S* __restrict__ q,
        const typename T::S* __restrict__ k, const typename T::S* __restrict__ v, const unsigned char* __restrict__ mask,
        const typename T::S* __restrict__ go, const float* __restrict__ lse, const float* __restrict__ delta,
        typename T::S* __restrict__ dq, int H, int Tq, int Tk, int causal, int has_mask, float scale_log2,
        float scale, FA_IN_STRIDES, long long dsb, long long dsh, int dst) {
    typedef typename T::S S; typedef typename T::P P;
    __shared__ __align__(16) S sK[N][D + FA_PAD];
    __shared__ __align__(16) S sV[N][D + FA_PAD];
    const int bh = blockIdx.y, warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int m0 = blockIdx.x * 64, row0 = m0 + warp * 16, off = Tk - Tq;
    const long long qoff = fa_head(bh, H, qsb, qsh), koff = fa_head(bh, H, ksb, ksh), goff = fa_head(bh, H, osb, osh);
    const unsigned char* mrow = has_mask ? mask + (long long)(bh / H) * Tk : nullptr;
    RowFrags<T, D> qa, ga;
    qa.init(q + qoff + (long long)row0 * qst, Tq - row0, qst);
    ga.init(go + goff + (long long)row0 * ost, Tq - row0, ost);
    float L[2], Dl[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int i = row0 + g + 8 * h;
        L[h] = i < Tq ? lse[(long long)bh * Tq + i] * FA_LOG2E : FA_POS_INF;
        Dl[h] = i < Tq ? delta[(long long)bh * Tq + i] : 0.f;
    }
    float acc[D / 8][4];
#pragma unroll
    for (int nt = 0; nt < D / 8; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;
    const int kend = causal ? min(Tk, m0 + 64 + off) : Tk;
    for (int n0 = 0; n0 < kend; n0 += N) {
        __syncthreads();
        load_tile<T, D, N>(sK, k + koff, n0, Tk, kst);
        load_tile<T, D, N>(sV, v + koff, n0, Tk, kst);
        __syncthreads();
        float s[N / 8][4], dp[N / 8][4];
#pragma unroll
        for (int nt = 0; nt < N / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[nt][e] = dp[nt][e] = 0.f;
#pragma unroll
        for (int kc = 0; kc < D / 16; ++kc) {
            P tq[4], tg[4];
            const P* a = qa.get(kc, tq);
            const P* b = ga.get(kc, tg);
#pragma unroll
            for (int nt = 0; nt < N / 8; nt += 2) {
                P bb[2][2];
                load_b_nk2<T>(bb, &sK[nt * 8][kc * 16], D + FA_PAD);
                T::mma(s[nt], a, bb[0]);    // S = Q K^T
                T::mma(s[nt + 1], a, bb[1]);
                load_b_nk2<T>(bb, &sV[nt * 8][kc * 16], D + FA_PAD);
                T::mma(dp[nt], b, bb[0]);   // dP = dO V^T
                T::mma(dp[nt + 1], b, bb[1]);
            }
        }
#pragma unroll
        for (int nt = 0; nt < N / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int i = row0 + g + 8 * (e >> 1), j = n0 + nt * 8 + 2 * t + (e & 1);
                const float p = fa_allowed(i, j, Tk, off, causal, mrow) ? exp2f(s[nt][e] * scale_log2 - L[e >> 1]) : 0.f;
                s[nt][e] = p * (dp[nt][e] - Dl[e >> 1]);   // dS (times sqrt(D) at the end)
            }
#pragma unroll
        for (int kc = 0; kc < N / 16; ++kc) {
            P sa[4];
            c_to_a<T>(sa, s[2 * kc], s[2 * kc + 1]);
#pragma unroll
            for (int nt = 0; nt < D / 8; nt += 2) {
                P bb[2][2];
                load_b_kn2<T>(bb, &sK[kc * 16][nt * 8], D + FA_PAD);
                T::mma(acc[nt], sa, bb[0]);   // dQ += dS K
                T::mma(acc[nt + 1], sa, bb[1]);
            }
        }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int i = row0 + g + 8 * h;
        if (i >= Tq) continue;
#pragma unroll
        for (int nt = 0; nt < D / 8; ++nt)
#pragma unroll
            for (int c = 0; c < 2; ++c)
                dq[fa_head(bh, H, dsb, dsh) + (long long)i * dst + nt * 8 + 2 * t + c] = T::fromf(acc[nt][2 * h + c] * scale);
    }
}
"""
