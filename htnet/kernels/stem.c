#include <stdint.h>
/* Channels-last maps: z[b][p][c], p = h * W + w. Max-pool 3x3, stride 3, padding 1; int32 argmax
   p within the (H, W) plane, the first maximum in scan order wins (as PyTorch's). */
void stem_forward(float *restrict z, int64_t b0, int64_t b1, int64_t H, int64_t W, int64_t C,
                  float *restrict s1, float *restrict s2, float *restrict pmax, int32_t *restrict idx) {
    const int64_t Ho = (H + 2 - 3) / 3 + 1, Wo = (W + 2 - 3) / 3 + 1;
    for (int64_t b = b0; b < b1; b++) {
        float *restrict zb = z + b * H * W * C;
        float *restrict a1 = s1 + b * C;
        float *restrict a2 = s2 + b * C;
        for (int64_t c = 0; c < C; c++) { a1[c] = 0.f; a2[c] = 0.f; }
        /* one pass: ReLU, sums and max over each window; positions no window covers after */
        for (int64_t i = 0; i < Ho; i++) {
            int64_t h0 = 3 * i - 1, h1 = h0 + 3; if (h0 < 0) h0 = 0; if (h1 > H) h1 = H;
            for (int64_t j = 0; j < Wo; j++) {
                int64_t w0 = 3 * j - 1, w1 = w0 + 3; if (w0 < 0) w0 = 0; if (w1 > W) w1 = W;
                float *restrict pm = pmax + ((b * Ho + i) * Wo + j) * C;
                int32_t *restrict ix = idx + ((b * Ho + i) * Wo + j) * C;
                int started = 0;
                for (int64_t h = h0; h < h1; h++)
                    for (int64_t w = w0; w < w1; w++) {
                        const int32_t p = (int32_t)(h * W + w);
                        float *restrict zp = zb + (int64_t)p * C;
                        if (!started) {
                            for (int64_t c = 0; c < C; c++) {
                                const float v = zp[c] > 0.f ? zp[c] : 0.f;
                                zp[c] = v; a1[c] += v; a2[c] += v * v;
                                pm[c] = v; ix[c] = p;
                            }
                            started = 1;
                            continue;
                        }
                        for (int64_t c = 0; c < C; c++) {
                            const float v = zp[c] > 0.f ? zp[c] : 0.f;
                            zp[c] = v; a1[c] += v; a2[c] += v * v;
                            const int gt = v > pm[c];
                            pm[c] = gt ? v : pm[c];
                            ix[c] = gt ? p : ix[c];
                        }
                    }
            }
        }
        for (int64_t h = 0; h < H; h++)
            for (int64_t w = 0; w < W; w++) {
                if (h <= 3 * Ho - 2 && w <= 3 * Wo - 2) continue;   /* covered by a window */
                float *restrict zp = zb + (h * W + w) * C;
                for (int64_t c = 0; c < C; c++) {
                    const float v = zp[c] > 0.f ? zp[c] : 0.f;
                    zp[c] = v; a1[c] += v; a2[c] += v * v;
                }
            }
    }
}

/* dz = z > 0 ? ds1 + 2 z ds2 + (max-pool gradient at its argmax) : 0. */
void stem_backward(const float *restrict z, const int32_t *restrict idx, const float *restrict dp,
                   const float *restrict ds1, const float *restrict ds2, float *restrict dz,
                   int64_t b0, int64_t b1, int64_t H, int64_t W, int64_t C) {
    const int64_t Ho = (H + 2 - 3) / 3 + 1, Wo = (W + 2 - 3) / 3 + 1;
    for (int64_t b = b0; b < b1; b++) {
        const float *restrict zb = z + b * H * W * C;
        float *restrict db = dz + b * H * W * C;
        const float *restrict d1 = ds1 + b * C;
        const float *restrict d2 = ds2 + b * C;
        for (int64_t p = 0; p < H * W; p++) {
            const float *restrict zp = zb + p * C;
            float *restrict dq = db + p * C;
            for (int64_t c = 0; c < C; c++) {
                const float v = zp[c];
                dq[c] = v > 0.f ? d1[c] + 2.f * v * d2[c] : 0.f;
            }
        }
        for (int64_t o = 0; o < Ho * Wo; o++) {
            const int32_t *restrict ix = idx + (b * Ho * Wo + o) * C;
            const float *restrict g = dp + (b * Ho * Wo + o) * C;
            for (int64_t c = 0; c < C; c++) {
                const int64_t off = (int64_t)ix[c] * C + c;
                if (zb[off] > 0.f) db[off] += g[c];
            }
        }
    }
}
