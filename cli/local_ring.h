// `ringattn ring`: runs the forward ring across local CPU worker processes (one per rank,
// Gloo TCP on loopback), gathers the result on rank 0, checks it against a single-device run
// on the whole sequence (and the fp64 reference when small enough), and prints the timings.
// The inputs are synthetic and addressed by position, so each rank makes only its own shard.
#pragma once

#include <cstdint>
#include <ostream>
#include <string>

#include "kernels/dtype.h"
#include "ring/host_ring.h"

namespace ringattn {

struct LocalRingOptions {
  int world = 4;
  int batch = 1;
  int64_t seqlen = 4096;
  int heads = 8;
  int heads_k = 8;
  int head_dim = 64;
  DType dtype = DType::kBF16;
  std::string layout = "auto";  // auto, contiguous, zigzag, stripe
  RingAttentionOptions attention;
  std::string backend = "cpu";  // a registered host backend (backend_registry.h)
  uint64_t seed = 1;
  bool check = true;               // compare with the single-device run (and fp64 when small)
  double timeout_seconds = 300;    // for the whole run; ranks are killed past it
  // fp64 reference only while 4 * batch * heads * seqlen^2 * head_dim stays under this.
  double reference_flop_limit = 2e10;
};

// Returns the process exit code (cli/exit_codes.h): 0 when the ring ran and (with check) met the
// tolerances, 5 when it did not, 3 when the ranks outlived the timeout.
// Forks the ranks; call before starting any thread.
int RunLocalRing(const LocalRingOptions& options, std::ostream& out);

}  // namespace ringattn
