// The host ring backward, RingFlashAttnBackward: declared with the forward in host_ring.h.
#pragma once

#include "ring/host_ring.h"
