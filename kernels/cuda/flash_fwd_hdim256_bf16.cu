// The forward kernel for head_dim 256, bf16 inputs: this build's tilings of that head dim.
#include "kernels/cuda/flash_fwd_launch.cuh"

RA_FLASH_FWD_INSTANTIATE(256, ringattn::DType::kBF16);
