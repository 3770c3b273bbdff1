// RunRingBackwardInProcess and WholeAttentionBackward live in inprocess_ranks.h, the one
// in-process rank harness.
#pragma once

#include "ring/testing/inprocess_ranks.h"
