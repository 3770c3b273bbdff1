// DeviceInProcessRing and RunDeviceRingInProcess live in inprocess_ranks.h, the one in-process
// rank harness; this header adds what their callers use beside them.
#pragma once

#include "ring/device_ring.h"
#include "ring/testing/inprocess_ranks.h"
#include "ring/transport/device_communicator.h"
