#!/usr/bin/env bash
# Prints ptxas registers, stack and spills of every flash kernel instantiation (plain and with
# options) by recompiling each flash_{fwd,bwd}_hdim*_*.cu of a configured build with
# -Xptxas -v (objects discarded): the check that options cost the plain kernels nothing.
# Usage: scripts/ptxas_usage.sh [build_dir] [source_root]
#   source_root: another checkout to compile instead (a git worktree at an older commit), with
#   this build's flags; default this repository.
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
BUILD=$(cd "${1:-$HERE/build}" && pwd)
ROOT=$(cd "${2:-$HERE}" && pwd)
export PATH="/usr/local/cuda/bin:$PATH"
HERE=$HERE BUILD=$BUILD ROOT=$ROOT python3 - <<'PY'
import json, os, re, subprocess
here, build, root = os.environ['HERE'], os.environ['BUILD'], os.environ['ROOT']
for c in json.load(open(os.path.join(build, 'compile_commands.json'))):
    f = c['file']
    if not re.search(r'flash_(fwd|bwd)_hdim\d+_(bf16|fp16)\.cu$', f):
        continue
    cmd = re.sub(r' -o \S+', ' -o /tmp/ptxas_probe_%d.o' % os.getpid(), c['command'])
    cmd = cmd.replace('-I%s ' % here, '-I%s ' % root).replace(f, f.replace(here, root))
    r = subprocess.run(cmd + ' -Xptxas -v', shell=True, cwd=c['directory'], capture_output=True,
                       text=True)
    fn, stack = None, None
    for line in r.stderr.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            fn = m.group(1)
        m = re.search(r'(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads',
                      line)
        if m and fn:
            stack = '/'.join(m.groups())
        m = re.search(r'Used (\d+) registers', line)
        if m and fn:
            kind = 'options' if re.search(r'Lb1E', fn) else 'plain'
            print(f"{os.path.basename(f)} {kind} regs={m.group(1)} stack/spill_st/spill_ld={stack}")
            fn = None
PY
