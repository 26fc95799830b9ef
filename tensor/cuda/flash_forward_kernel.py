"""The flash-attention forward kernel (CUDA C++ text over flash_tiles.py's TILES; the algorithm and its
launch: tensor/cuda/flash_attention.py)."""

FORWARD = r"""
// ---- forward: grid (ceil(Tq / (64 MT)), B * H), 128 threads; each warp takes MT tiles of 16 query rows
// (16 MT consecutive rows), so every K and V fragment read from shared memory feeds MT products
template <class T, int D, int N, int MT>
__global__ void __launch_bounds__(128) flash_fwd(const typename T::S* __restrict__ q,
        const typename T::S* __restrict__ k, const typename T::S* __restrict__ v, const unsigned char* __restrict__ mask,
        typename T::S* __restrict__ o, float* __restrict__ lse, int H, int Tq, int Tk, int causal, int has_mask,
        float scale_log2, FA_IN_STRIDES) {
    typedef typename T::S S; typedef typename T::P P;
    // K/V tiles double-buffered (ST = 2: the next tile's cp.async in flight during this one's
    // products) where two stages fit the 48 KiB of static shared memory, else one stage
    constexpr int ST = 4 * N * (D + FA_PAD) * (int)sizeof(S) <= 48 * 1024 ? 2 : 1;
    __shared__ __align__(16) S sK[ST][N][D + FA_PAD];
    __shared__ __align__(16) S sV[ST][N][D + FA_PAD];
    const int bh = blockIdx.y, warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int m0 = blockIdx.x * 64 * MT, row0 = m0 + warp * 16 * MT, off = Tk - Tq;
    const long long qoff = fa_head(bh, H, qsb, qsh), koff = fa_head(bh, H, ksb, ksh), ooff = fa_head(bh, H, osb, osh);
    const unsigned char* mrow = has_mask ? mask + (long long)(bh / H) * Tk : nullptr;
    RowFrags<T, D> qa[MT];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) qa[mt].init(q + qoff + (long long)(row0 + 16 * mt) * qst, Tq - row0 - 16 * mt, qst);
    float acc[MT][D / 8][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < D / 8; ++nt) acc[mt][nt][0] = acc[mt][nt][1] = acc[mt][nt][2] = acc[mt][nt][3] = 0.f;
    float mrun[MT][2], lrun[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) { mrun[mt][0] = mrun[mt][1] = FA_NEG_INF; lrun[mt][0] = lrun[mt][1] = 0.f; }
    const int kend = causal ? min(Tk, m0 + 64 * MT + off) : Tk;   // later key tiles are fully masked
    for (int n0 = 0, it = 0; n0 < kend; n0 += N, ++it) {
        const int cur = ST == 2 ? (it & 1) : 0;
        if (ST == 1 || it == 0) {   // this tile, unless the previous iteration prefetched it
            load_tile_async<T, D, N, 128>(sK[cur], k + koff, n0, Tk, kst);
            load_tile_async<T, D, N, 128>(sV[cur], v + koff, n0, Tk, kst);
        }
        cp_async_commit();
        if (ST == 2 && n0 + N < kend) {   // the next tile, into the stage the last iteration finished with
            load_tile_async<T, D, N, 128>(sK[cur ^ 1], k + koff, n0 + N, Tk, kst);
            load_tile_async<T, D, N, 128>(sV[cur ^ 1], v + koff, n0 + N, Tk, kst);
        }
        cp_async_commit();
        cp_async_wait<1>();   // every group but the newest (the prefetch): this tile has landed
        __syncthreads();
        float s[MT][N / 8][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int nt = 0; nt < N / 8; ++nt) s[mt][nt][0] = s[mt][nt][1] = s[mt][nt][2] = s[mt][nt][3] = 0.f;
#pragma unroll
        for (int kc = 0; kc < D / 16; ++kc) {
            P tq[MT][4];
            const P* a[MT];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) a[mt] = qa[mt].get(kc, tq[mt]);
#pragma unroll
            for (int nt = 0; nt < N / 8; nt += 2) {
                P bb[2][2];
                load_b_nk2<T>(bb, &sK[cur][nt * 8][kc * 16], D + FA_PAD);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    T::mma(s[mt][nt], a[mt], bb[0]);
                    T::mma(s[mt][nt + 1], a[mt], bb[1]);
                }
            }
        }
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            const int r0 = row0 + 16 * mt;
            float mx[2] = {mrun[mt][0], mrun[mt][1]};   // (unscaled scores: the scale goes into the exponent's FMA)
            // every key of the tile allowed to every row of this m-tile (warp-uniform): no per-element test
            const bool full = !has_mask && n0 + N <= Tk && (!causal || n0 + N - 1 <= r0 + off);
            if (full) {
#pragma unroll
                for (int nt = 0; nt < N / 8; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) mx[e >> 1] = fmaxf(mx[e >> 1], s[mt][nt][e]);
            } else {
#pragma unroll
                for (int nt = 0; nt < N / 8; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int i = r0 + g + 8 * (e >> 1), j = n0 + nt * 8 + 2 * t + (e & 1);
                        if (!fa_allowed(i, j, Tk, off, causal, mrow)) s[mt][nt][e] = FA_NEG_INF;
                        mx[e >> 1] = fmaxf(mx[e >> 1], s[mt][nt][e]);
                    }
            }
            float base[2], corr[2];
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                mx[h] = quad_max(mx[h]);
                base[h] = mx[h] == FA_NEG_INF ? 0.f : mx[h] * scale_log2;   // a row masked so far: every p is 0
                corr[h] = fast_exp2(mrun[mt][h] * scale_log2 - base[h]);
                mrun[mt][h] = mx[h];
                lrun[mt][h] *= corr[h];
            }
#pragma unroll
            for (int nt = 0; nt < N / 8; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) {   // p = 2^(s scale_log2 - base): one FMA and one MUFU op
                    s[mt][nt][e] = fast_exp2(fmaf(s[mt][nt][e], scale_log2, -base[e >> 1]));
                    lrun[mt][e >> 1] += s[mt][nt][e];
                }
#pragma unroll
            for (int nt = 0; nt < D / 8; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) acc[mt][nt][e] *= corr[e >> 1];
        }
#pragma unroll
        for (int kc = 0; kc < N / 16; ++kc) {
            P pa[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) c_to_a<T>(pa[mt], s[mt][2 * kc], s[mt][2 * kc + 1]);
#pragma unroll
            for (int nt = 0; nt < D / 8; nt += 2) {
                P bb[2][2];
                load_b_kn2<T>(bb, &sV[cur][kc * 16][nt * 8], D + FA_PAD);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    T::mma(acc[mt][nt], pa[mt], bb[0]);
                    T::mma(acc[mt][nt + 1], pa[mt], bb[1]);
                }
            }
        }
        __syncthreads();   // every warp done with stage cur before a later iteration refills it
    }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const float l = quad_sum(lrun[mt][h]);
            const int i = row0 + 16 * mt + g + 8 * h;
            if (i >= Tq) continue;
            const float inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
            for (int nt = 0; nt < D / 8; ++nt) {
                o[ooff + (long long)i * ost + nt * 8 + 2 * t] = T::fromf(acc[mt][nt][2 * h] * inv);
                o[ooff + (long long)i * ost + nt * 8 + 2 * t + 1] = T::fromf(acc[mt][nt][2 * h + 1] * inv);
            }
            if (t == 0) lse[(long long)bh * Tq + i] = l > 0.f ? (mrun[mt][h] * scale_log2 + log2f(l)) * FA_LN2 : FA_POS_INF;
        }
}
"""
