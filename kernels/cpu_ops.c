/* The CPU path of the kernels: plain C99, built on first use by kernels/cpu.py.
 *
 * Every function works on a range of blocks (or elements) so that the caller can split
 * one tensor over threads; ranges handed to different threads never share a byte of
 * packed output, because blocks start on a byte (the caller checks).
 * Built with -ffp-contract=off (no fused multiply-add) and -fno-trapping-math (lets the
 * selects vectorize; results are unchanged), so the products and sums that the
 * torch twins compute element by element are bitwise the same here. Sums over a block
 * use 16 interleaved partial sums (vectorizable), so they differ from torch's in
 * rounding only.
 */
#include <math.h>
#include <stdint.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define LANES 16

static float tree16(const float *a) {
    float b[8];
    for (int j = 0; j < 8; ++j) b[j] = a[j] + a[j + 8];
    for (int j = 0; j < 4; ++j) b[j] = b[j] + b[j + 4];
    return (b[0] + b[2]) + (b[1] + b[3]);
}

static inline uint32_t mix32(uint32_t h) {
    h ^= h >> 16;
    h *= 0x7FEB352Du;
    h ^= h >> 15;
    h *= 0x846CA68Bu;
    h ^= h >> 16;
    return h;
}

static inline float uniform_at(uint64_t i, uint32_t k0, uint32_t k1) {
    uint32_t h = mix32((uint32_t)i * 0x9E3779B9u + k0);
    h = mix32(h ^ k1);
    return (float)(h >> 8) * (1.0f / 16777216.0f);
}

/* v = x + e (e may be NULL); per block: scale = sum|v| / len, sq = sum v^2; bit = v >= 0;
 * r (may be NULL, may alias x or e) = v - (bit ? scale : -scale). */
void lc_sign_ef(const float *x, const float *e, float *r, float *scales, float *sq, uint8_t *packed,
                int64_t n, int64_t block, int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
        const int64_t start = b * block;
        const int64_t len = (n - start < block) ? n - start : block;
        const float *xb = x + start;
        const float *eb = e ? e + start : 0;
        float acc[LANES] = {0}, acc2[LANES] = {0};
        int64_t i = 0;
#ifdef __AVX2__
        {
            /* The same 16 partial sums as the scalar loop, in two 8-lane registers. */
            const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
            __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
            __m256 q0 = _mm256_setzero_ps(), q1 = _mm256_setzero_ps();
            for (; i + LANES <= len; i += LANES) {
                __m256 v0 = _mm256_loadu_ps(xb + i), v1 = _mm256_loadu_ps(xb + i + 8);
                if (eb) {
                    v0 = _mm256_add_ps(v0, _mm256_loadu_ps(eb + i));
                    v1 = _mm256_add_ps(v1, _mm256_loadu_ps(eb + i + 8));
                }
                a0 = _mm256_add_ps(a0, _mm256_and_ps(v0, absmask));
                a1 = _mm256_add_ps(a1, _mm256_and_ps(v1, absmask));
                q0 = _mm256_add_ps(q0, _mm256_mul_ps(v0, v0));
                q1 = _mm256_add_ps(q1, _mm256_mul_ps(v1, v1));
            }
            _mm256_storeu_ps(acc, a0);
            _mm256_storeu_ps(acc + 8, a1);
            _mm256_storeu_ps(acc2, q0);
            _mm256_storeu_ps(acc2 + 8, q1);
        }
#endif
        if (eb) {
            for (; i + LANES <= len; i += LANES)
                for (int j = 0; j < LANES; ++j) {
                    float v = xb[i + j] + eb[i + j];
                    acc[j] += fabsf(v);
                    acc2[j] += v * v;
                }
        } else {
            for (; i + LANES <= len; i += LANES)
                for (int j = 0; j < LANES; ++j) {
                    float v = xb[i + j];
                    acc[j] += fabsf(v);
                    acc2[j] += v * v;
                }
        }
        for (int j = 0; i < len; ++i, ++j) {
            float v = eb ? xb[i] + eb[i] : xb[i];
            acc[j] += fabsf(v);
            acc2[j] += v * v;
        }
        const float s = tree16(acc) / (float)len;
        scales[b] = s;
        sq[b] = tree16(acc2);
        uint8_t *pb = packed + start / 8;
        float *rb = r ? r + start : 0;
        int64_t g = 0;
#ifdef __AVX2__
        const __m256 pos = _mm256_set1_ps(s), neg = _mm256_set1_ps(-s), zero = _mm256_setzero_ps();
        for (; g + 8 <= len; g += 8) {
            __m256 v = _mm256_loadu_ps(xb + g);
            if (eb) v = _mm256_add_ps(v, _mm256_loadu_ps(eb + g));
            const __m256 ge = _mm256_cmp_ps(v, zero, _CMP_GE_OQ); /* NaN: false */
            pb[g / 8] = (uint8_t)_mm256_movemask_ps(ge);
            if (rb) _mm256_storeu_ps(rb + g, _mm256_sub_ps(v, _mm256_blendv_ps(neg, pos, ge)));
        }
#endif
        for (; g < len; g += 8) {
            const int64_t m = (len - g < 8) ? len - g : 8;
            unsigned byte = 0;
            for (int64_t j = 0; j < m; ++j) {
                float v = eb ? xb[g + j] + eb[g + j] : xb[g + j];
                unsigned bit = v >= 0.0f;
                byte |= bit << j;
                if (rb) rb[g + j] = v - (bit ? s : -s);
            }
            pb[g / 8] = (uint8_t)byte;
        }
    }
}

/* out += sum_r (bit ? scale_r : -scale_r), payloads added one after the other. */
void lc_sign_decode_add(const float *const *scales, const uint8_t *const *packed, int64_t R, float *out,
                        int64_t n, int64_t block, int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
        const int64_t start = b * block;
        const int64_t len = (n - start < block) ? n - start : block;
        float *ob = out + start;
        for (int64_t r = 0; r < R; ++r) {
            const float s = scales[r][b];
            const uint8_t *pb = packed[r] + start / 8;
            int64_t i = 0;
#ifdef __AVX2__
            const __m256 pos = _mm256_set1_ps(s), neg = _mm256_set1_ps(-s);
            const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
            for (; i + 8 <= len; i += 8) {
                const __m256i byte = _mm256_set1_epi32(pb[i >> 3]);
                const __m256 set = _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(byte, lane_bit), lane_bit));
                _mm256_storeu_ps(ob + i, _mm256_add_ps(_mm256_loadu_ps(ob + i), _mm256_blendv_ps(neg, pos, set)));
            }
#endif
            for (; i < len; ++i) {
                unsigned bit = (pb[i >> 3] >> (i & 7)) & 1u;
                ob[i] += bit ? s : -s;
            }
        }
    }
}

/* QSGD: see kernels/qsgd.py for the meaning. */
void lc_qsgd_encode(const float *x, float *norms, uint8_t *signs, uint8_t *codes, int64_t n, int64_t block,
                    int64_t bits, uint32_t k0, uint32_t k1, int64_t b0, int64_t b1) {
    const float levels = (float)((1 << bits) - 1);
    const int per_byte = (int)(8 / bits);
    for (int64_t b = b0; b < b1; ++b) {
        const int64_t start = b * block;
        const int64_t len = (n - start < block) ? n - start : block;
        const float *xb = x + start;
        float pk[LANES] = {0};
        int nan_lane[LANES] = {0};
        int64_t p = 0;
        for (; p + LANES <= len; p += LANES)
            for (int j = 0; j < LANES; ++j) {
                float a = fabsf(xb[p + j]);
                pk[j] = a > pk[j] ? a : pk[j];
                nan_lane[j] |= a != a;
            }
        for (int j = 0; p < len; ++p, ++j) {
            float a = fabsf(xb[p]);
            pk[j] = a > pk[j] ? a : pk[j];
            nan_lane[j] |= a != a;
        }
        float peak = 0.0f;
        int has_nan = 0;
        for (int j = 0; j < LANES; ++j) {
            peak = pk[j] > peak ? pk[j] : peak; /* max is exact in any order */
            has_nan |= nan_lane[j];
        }
        if (has_nan) peak = NAN;
        const float psafe = peak > 0.0f ? peak : 1.0f;
        float acc[LANES] = {0};
        int64_t i = 0;
        for (; i + LANES <= len; i += LANES)
            for (int j = 0; j < LANES; ++j) {
                float u = fabsf(xb[i + j]) / psafe;
                acc[j] += u * u;
            }
        for (int j = 0; i < len; ++i, ++j) {
            float u = fabsf(xb[i]) / psafe;
            acc[j] += u * u;
        }
        const float unorm = sqrtf(tree16(acc));
        norms[b] = unorm * peak;
        const float usafe = unorm > 0.0f ? unorm : 1.0f;
        uint8_t *sb = signs + start / 8;
        uint8_t *cb = codes + start * bits / 8;
        for (int64_t g = 0; g < len; g += 8) {
            const int64_t m = (len - g < 8) ? len - g : 8;
            unsigned byte = 0;
            for (int64_t j = 0; j < m; ++j) byte |= (unsigned)(xb[g + j] >= 0.0f) << j;
            sb[g / 8] = (uint8_t)byte;
        }
        /* Levels for up to 256 elements at a time (a vectorizable loop), then packed. */
        for (int64_t c0 = 0; c0 < len; c0 += 256) {
            const int64_t m = (len - c0 < 256) ? len - c0 : 256;
            int32_t lv[256];
            const uint32_t base = (uint32_t)(start + c0);
            for (int j = 0; j < (int)m; ++j) {
                uint32_t h = mix32((base + (uint32_t)j) * 0x9E3779B9u + k0);
                h = mix32(h ^ k1);
                const float u = (float)(int32_t)(h >> 8) * (1.0f / 16777216.0f); /* = uniform_at */
                float unit = fabsf(xb[c0 + j]) / psafe;
                float scaled = (unit / usafe) * levels;
                float f = floorf(scaled + u);
                f = (f >= 0.0f) ? f : 0.0f; /* NaN: 0 */
                f = (f > levels) ? levels : f;
                lv[j] = (int32_t)f;
            }
            for (int64_t g = 0; g < m; g += per_byte) {
                unsigned byte = 0;
                for (int j = 0; j < per_byte && g + j < m; ++j) byte |= (unsigned)lv[g + j] << (j * bits);
                cb[(c0 + g) / per_byte] = (uint8_t)byte;
            }
        }
    }
}

/* out += sum_r norm_r * sign * level / levels, payloads added one after the other. */
void lc_qsgd_decode_add(const float *const *norms, const uint8_t *const *signs, const uint8_t *const *codes,
                        int64_t R, float *out, int64_t n, int64_t block, int64_t bits, int64_t b0, int64_t b1) {
    const float levels = (float)((1 << bits) - 1);
    const unsigned mask = (1u << bits) - 1u;
    const int per_byte = (int)(8 / bits);
    const int shift = bits == 1 ? 3 : bits == 2 ? 2 : bits == 4 ? 1 : 0; /* log2(per_byte) */
    float lut[2][256]; /* the twin's (level * sign) / levels, for every sign and level */
    for (unsigned l = 0; l <= mask; ++l) {
        lut[0][l] = ((float)l * -1.0f) / levels;
        lut[1][l] = ((float)l * 1.0f) / levels;
    }
    for (int64_t b = b0; b < b1; ++b) {
        const int64_t start = b * block;
        const int64_t len = (n - start < block) ? n - start : block;
        float *ob = out + start;
        for (int64_t r = 0; r < R; ++r) {
            const float nb = norms[r][b];
            const uint8_t *sb = signs[r] + start / 8;
            const uint8_t *cb = codes[r] + start * bits / 8;
            for (int64_t i = 0; i < len; ++i) {
                unsigned sign = (sb[i >> 3] >> (i & 7)) & 1u;
                unsigned level = (cb[i >> shift] >> ((i & (per_byte - 1)) * bits)) & mask;
                ob[i] += lut[sign][level] * nb;
            }
        }
    }
}

/* v = x + e over elements [i0, i1). */
void lc_add(const float *x, const float *e, float *v, int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) v[i] = x[i] + e[i];
}

/* Over elements [i0, i1): the number of |v| >= t and the sum of v^2 (into *count, *sq);
 * with idx non-NULL, also write those indices in ascending order. */
void lc_select(const float *v, float t, int64_t i0, int64_t i1, int64_t *idx, int64_t *count, float *sq) {
    float acc[LANES] = {0};
    int64_t c = 0, i = i0;
    if (idx) {
#ifdef __AVX2__
        /* Eight at a time; most groups hold no candidate and cost one compare. */
        const __m256 tv = _mm256_set1_ps(t);
        const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
        for (; i + 8 <= i1; i += 8) {
            const __m256 a = _mm256_and_ps(_mm256_loadu_ps(v + i), absmask);
            unsigned m = (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(a, tv, _CMP_GE_OQ)); /* NaN: no */
            while (m) {
                idx[c++] = i + __builtin_ctz(m);
                m &= m - 1;
            }
        }
#endif
        for (; i < i1; ++i)
            if (fabsf(v[i]) >= t) idx[c++] = i;
    } else {
        for (; i + LANES <= i1; i += LANES)
            for (int j = 0; j < LANES; ++j) {
                float a = v[i + j];
                acc[j] += a * a;
                c += fabsf(a) >= t;
            }
        for (int j = 0; i < i1; ++i, ++j) {
            acc[j] += v[i] * v[i];
            c += fabsf(v[i]) >= t;
        }
        if (sq) *sq = tree16(acc);
    }
    *count = c;
}

/* Two-pass server step, block by block while the block is in cache:
 * w = err_in + sum_r decode_r (into err_out), then encode w and leave w - C(w) in err_out. */
void lc_sign_server(const float *const *scales, const uint8_t *const *packed, int64_t R, const float *err_in,
                    float *err_out, float *scales_out, float *sq_out, uint8_t *packed_out, int64_t n, int64_t block,
                    int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
        const int64_t start = b * block;
        const int64_t len = (n - start < block) ? n - start : block;
        for (int64_t i = 0; i < len; ++i) err_out[start + i] = err_in[start + i];
        lc_sign_decode_add(scales, packed, R, err_out, n, block, b, b + 1);
        lc_sign_ef(err_out, 0, err_out, scales_out, sq_out, packed_out, n, block, b, b + 1);
    }
}

/* 1 if every element of x[i0, i1) is finite (exponent bits not all ones), else 0. */
int64_t lc_all_finite(const float *x, int64_t i0, int64_t i1) {
    const uint32_t *u = (const uint32_t *)x;
    uint32_t bad = 0;
    int64_t i = i0;
    for (; i + 16 <= i1; i += 16) {
        uint32_t any = 0;
        for (int j = 0; j < 16; ++j) any |= ((u[i + j] & 0x7F800000u) == 0x7F800000u);
        bad |= any;
        if (bad) return 0;
    }
    for (; i < i1; ++i) bad |= ((u[i] & 0x7F800000u) == 0x7F800000u);
    return bad ? 0 : 1;
}
