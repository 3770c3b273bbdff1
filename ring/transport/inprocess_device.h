// InProcessDeviceGroup lives in inprocess.h, beside the host group it shares its mailbox with.
#pragma once

#include "ring/transport/device_communicator.h"
#include "ring/transport/inprocess.h"
