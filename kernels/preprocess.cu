// Fused GPU preprocessing for the I2P detector: Pillow-exact antialiased resize, center crop,
// (x / 255 - mean) / std, written as NCHW float32 or float16 straight into the engine's input buffer.
// One launch handles a batch of images of different sizes.
//
// Every preprocessing mode a manifest may name runs through this one kernel: the mode lives in the
// host-built tables, not here. The resize mode (shorter side, or both sides "squash") and the crop
// fraction (resize to floor(size / crop_pct), then crop) set each output position's source window
// (start, count) and the crop offset; the filter (bicubic, a = -0.5, or bilinear) sets the weights
// and ksize. tests/kernels/test_host_kernel.py runs this file on the CPU for each mode.
//
// Bit-exactness: the filter weights are NOT computed here. The host builds Pillow's fixed-point
// tables (i2p.runtime.resample.crop_coefficients: double-precision weights, normalized, rounded to
// 22 fractional bits) and uploads them; this kernel does only the integer part of Pillow's
// arithmetic (int32 multiply-accumulate from 1 << 21, arithmetic shift by 22, clip to 0..255, the
// first pass rounded to uint8 before the second reads it), which has exactly one possible result.
// Normalization is one IEEE division, subtraction and division in float32 (no fast-math, nothing
// for the compiler to fuse), the same operations as numpy in i2p.runtime.preprocess.normalize.
//
// Table layout for one axis of one image (int32, at the offset given in the image descriptor):
//   start[size], count[size], weights[size * ksize]
// Output position i reads source pixels start[i] .. start[i] + count[i] - 1.
//
// Each thread computes one output pixel (all three channels). With the horizontal pass first, it
// recomputes the horizontal pass for each source row the vertical filter needs, clipping each to
// uint8 as Pillow's intermediate image does; with the vertical pass first (newer Pillow, tall
// images), the roles of rows and columns swap.

#define I2P_PRECISION_BITS 22

// One image of the batch; all fields 64-bit so the host can fill it as an int64 numpy array [B, 8].
struct ImageDesc {
    long long src_offset;      // byte offset of the image in the packed source buffer
    long long src_w;           // source width (pixels); rows are tightly packed RGB, stride 3 * src_w
    long long src_h;           // source height
    long long x_table;         // int32 offset of the column table
    long long x_ksize;         // row length of the column weights
    long long y_table;         // int32 offset of the row table
    long long y_ksize;         // row length of the row weights
    long long vertical_first;  // 1: Pillow resamples rows before columns for this image
};

__device__ __forceinline__ int clip8(int acc) {
    // Pillow: clip8_lookups[acc >> PRECISION_BITS], a table that clamps to 0..255.
    return min(max(acc >> I2P_PRECISION_BITS, 0), 255);
}

__device__ __forceinline__ void store(float* out, long long index, float value) { out[index] = value; }

// What cvt.rn.f16.f32 does, in integer arithmetic, for the host build of this file (the CPU test in
// tests/kernels compiles it with g++): float32 bits -> IEEE half bits, round to nearest, ties to even.
__device__ __forceinline__ unsigned short f16_bits_rn(float value) {
    const unsigned int f = __float_as_uint(value);
    const unsigned int sign = (f >> 16) & 0x8000u;
    const unsigned int a = f & 0x7fffffffu;
    if (a > 0x7f800000u) return (unsigned short)(sign | 0x7e00u);  // NaN
    if (a >= 0x477ff000u) return (unsigned short)(sign | 0x7c00u);  // >= 65520 rounds to infinity
    if (a >= 0x38800000u) {                                         // a normal half: rebias, round
        const unsigned int r = a + 0xfffu + ((a >> 13) & 1u);
        return (unsigned short)(sign | ((r - 0x38000000u) >> 13));
    }
    const unsigned int e = a >> 23;  // a subnormal half (units of 2^-24), or zero below 2^-25
    if (e < 102) return (unsigned short)sign;
    const unsigned int m = (a & 0x7fffffu) | 0x800000u, shift = 126 - e;
    const unsigned int q = m >> shift, rem = m & ((1u << shift) - 1u), halfway = 1u << (shift - 1);
    return (unsigned short)(sign | (q + (rem > halfway || (rem == halfway && (q & 1u)))));
}

__device__ __forceinline__ void store(unsigned short* out, long long index, float value) {
    unsigned short bits;  // IEEE half, round to nearest even (numpy's float32 -> float16 cast)
#ifdef __CUDA_ARCH__
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(bits) : "f"(value));
#else
    bits = f16_bits_rn(value);
#endif
    out[index] = bits;
}

template <typename Out>
__device__ __forceinline__ void preprocess(const unsigned char* __restrict__ src,
                                           const ImageDesc* __restrict__ images,
                                           const int* __restrict__ tables, Out* __restrict__ out, int size,
                                           float mean_r, float mean_g, float mean_b, float std_r,
                                           float std_g, float std_b) {
    const int x = blockIdx.x * blockDim.x + threadIdx.x;
    const int y = blockIdx.y * blockDim.y + threadIdx.y;
    const int b = blockIdx.z;
    if (x >= size || y >= size) return;

    const ImageDesc d = images[b];
    const unsigned char* img = src + d.src_offset;
    const long long stride = 3 * d.src_w;

    const int* xt = tables + d.x_table;
    const int x0 = xt[x];
    const int xn = xt[size + x];
    const int* xw = xt + 2 * size + (long long)x * d.x_ksize;

    const int* yt = tables + d.y_table;
    const int y0 = yt[y];
    const int yn = yt[size + y];
    const int* yw = yt + 2 * size + (long long)y * d.y_ksize;

    const int half = 1 << (I2P_PRECISION_BITS - 1);
    int r = half, g = half, bl = half;
    if (!d.vertical_first) {
        for (int j = 0; j < yn; ++j) {  // source rows of this output row
            const unsigned char* p = img + (long long)(y0 + j) * stride + 3LL * x0;
            int hr = half, hg = half, hb = half;
            for (int i = 0; i < xn; ++i, p += 3) {  // horizontal pass for (row y0 + j, column x)
                const int w = xw[i];
                hr += p[0] * w;
                hg += p[1] * w;
                hb += p[2] * w;
            }
            const int w = yw[j];
            r += clip8(hr) * w;
            g += clip8(hg) * w;
            bl += clip8(hb) * w;
        }
    } else {
        for (int i = 0; i < xn; ++i) {  // source columns of this output column
            const unsigned char* p = img + (long long)y0 * stride + 3LL * (x0 + i);
            int vr = half, vg = half, vb = half;
            for (int j = 0; j < yn; ++j, p += stride) {  // vertical pass for (row y, column x0 + i)
                const int w = yw[j];
                vr += p[0] * w;
                vg += p[1] * w;
                vb += p[2] * w;
            }
            const int w = xw[i];
            r += clip8(vr) * w;
            g += clip8(vg) * w;
            bl += clip8(vb) * w;
        }
    }

    const long long plane = (long long)size * size;
    const long long base = (long long)b * 3 * plane + (long long)y * size + x;
    store(out, base, ((float)clip8(r) / 255.0f - mean_r) / std_r);
    store(out, base + plane, ((float)clip8(g) / 255.0f - mean_g) / std_g);
    store(out, base + 2 * plane, ((float)clip8(bl) / 255.0f - mean_b) / std_b);
}

// Launch with block (32, 8, 1) and grid (ceil(size / 32), ceil(size / 8), batch).
extern "C" __global__ void __launch_bounds__(256)
    i2p_preprocess_f32(const unsigned char* __restrict__ src, const ImageDesc* __restrict__ images,
                       const int* __restrict__ tables, float* __restrict__ out, int size, float mean_r,
                       float mean_g, float mean_b, float std_r, float std_g, float std_b) {
    preprocess(src, images, tables, out, size, mean_r, mean_g, mean_b, std_r, std_g, std_b);
}

extern "C" __global__ void __launch_bounds__(256)
    i2p_preprocess_f16(const unsigned char* __restrict__ src, const ImageDesc* __restrict__ images,
                       const int* __restrict__ tables, unsigned short* __restrict__ out, int size,
                       float mean_r, float mean_g, float mean_b, float std_r, float std_g, float std_b) {
    preprocess(src, images, tables, out, size, mean_r, mean_g, mean_b, std_r, std_g, std_b);
}
