// The CUDA kernels of kernels/preprocess.cu, built for the host: one C entry point per kernel taking the
// launch shape first, then the kernel's own arguments (tests/kernels/test_host_kernel.py calls them).
#include "host_emulation.h"
#include "preprocess.cu"

#define I2P_HOST_ENTRY(kernel, Out)                                                                      \
    extern "C" void host_##kernel(const int* grid, const int* block, const unsigned char* src,            \
                                  const ImageDesc* images, const int* tables, Out* out, int size,         \
                                  float mean_r, float mean_g, float mean_b, float std_r, float std_g,    \
                                  float std_b) {                                                         \
        i2p_host_launch({grid[0], grid[1], grid[2]}, {block[0], block[1], block[2]}, [&] {               \
            kernel(src, images, tables, out, size, mean_r, mean_g, mean_b, std_r, std_g, std_b);         \
        });                                                                                              \
    }

I2P_HOST_ENTRY(i2p_preprocess_f32, float)
I2P_HOST_ENTRY(i2p_preprocess_f16, unsigned short)
