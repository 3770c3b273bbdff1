// The exit codes of every `ringattn` command (docs/running.md, "Exit codes", lists them).
#pragma once

#include "absl/status/status.h"

namespace ringattn {

enum ExitCode : int {
  kExitOk = 0,
  // Anything not below: a file not read or written, a process or a ring that did not start.
  kExitFailure = 1,
  // The command line or an environment variable: an unknown command or flag, a flag of another
  // command, a bad value, a missing required flag.
  kExitUsage = 2,
  // A call failed UNAVAILABLE or DEADLINE_EXCEEDED (the service or its ring down, being
  // re-formed, or too slow; a worker that could not register in time): worth retrying.
  kExitUnavailable = 3,
  // A call failed with any other code: INVALID_ARGUMENT, RESOURCE_EXHAUSTED, UNAUTHENTICATED...
  kExitRpcFailed = 4,
  // --check: a result breached its tolerance against the fp64 reference.
  kExitCheckFailed = 5,
  // serve, coordinator, worker: an address could not be listened on (in use, or not this
  // host's).
  kExitCannotListen = 6,
};

// The exit code of a failed call: kExitUnavailable for UNAVAILABLE and DEADLINE_EXCEEDED,
// kExitRpcFailed for any other code; kExitOk for OK.
inline int ExitCodeOfCall(const absl::Status& status) {
  if (status.ok()) return kExitOk;
  return absl::IsUnavailable(status) || absl::IsDeadlineExceeded(status) ? kExitUnavailable
                                                                         : kExitRpcFailed;
}

}  // namespace ringattn
