// RingBackwardTensors and the backward step: declared with the forward's in ring_step.h.
#pragma once

#include "ring/ring_step.h"
