// Host emulation of the few CUDA constructs kernels/preprocess.cu uses, so that g++ compiles the unchanged
// kernel file for the CPU (tests/kernels/test_host_kernel.py). The grid is walked sequentially: every
// (block, thread) pair runs once with blockIdx/threadIdx/blockDim set as on the device.
#pragma once
#include <algorithm>
#include <cstring>

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(n)

struct I2pDim3 {
    int x, y, z;
};
static I2pDim3 blockIdx, threadIdx, blockDim, gridDim;

using std::max;
using std::min;

inline unsigned int __float_as_uint(float f) {
    unsigned int u;
    std::memcpy(&u, &f, sizeof u);
    return u;
}

// Run `body` once per thread of a grid x block launch, in block then thread order.
template <typename Body>
void i2p_host_launch(I2pDim3 grid, I2pDim3 block, Body body) {
    gridDim = grid;
    blockDim = block;
    for (blockIdx.z = 0; blockIdx.z < grid.z; ++blockIdx.z)
        for (blockIdx.y = 0; blockIdx.y < grid.y; ++blockIdx.y)
            for (blockIdx.x = 0; blockIdx.x < grid.x; ++blockIdx.x)
                for (threadIdx.z = 0; threadIdx.z < block.z; ++threadIdx.z)
                    for (threadIdx.y = 0; threadIdx.y < block.y; ++threadIdx.y)
                        for (threadIdx.x = 0; threadIdx.x < block.x; ++threadIdx.x) body();
}
