// RingFlashAttnBackwardDevice and DeviceRingBackwardWorkspace: declared with the forward's in
// device_ring.h.
#pragma once

#include "ring/device_ring.h"
