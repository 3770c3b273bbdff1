// The backward kernel for head_dim 128, fp16 inputs: this build's tilings of that head dim.
#include "kernels/cuda/flash_bwd_launch.cuh"

RA_FLASH_BWD_INSTANTIATE(128, ringattn::DType::kF16);
