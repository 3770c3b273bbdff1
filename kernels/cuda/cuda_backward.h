// Transitional (issue #12): the "cuda" backward is part of the "cuda" backend (cuda_backend.h).
#pragma once

#include "kernels/cuda/cuda_backend.h"  // IWYU pragma: export
