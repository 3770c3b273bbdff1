#!/usr/bin/env python3
"""Compiles the Hopper forward kernel (kernels/cuda/flash_fwd_hopper.cu) as the build does, with
-Xptxas -v, and fails when ptxas serialized a wgmma (C7512), ignored setmaxnreg (C7508), or
spilled in a plain kernel (no score mods): the register facts its speed rests on
(docs/kernels.md, "The Hopper forward"). Exit 77 (ctest: skipped) for a build without CUDA.
Usage: check_hopper_ptxas.py BUILD_DIR
"""
import json
import os
import re
import subprocess
import sys
import tempfile


def main():
    build = sys.argv[1] if len(sys.argv) > 1 else "build"
    with open(os.path.join(build, "compile_commands.json")) as f:
        commands = [c for c in json.load(f) if c["file"].endswith("flash_fwd_hopper.cu")]
    if not commands:
        print("flash_fwd_hopper.cu is not in this build (no CUDA): skipped")
        return 77
    c = commands[0]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = re.sub(r" -o \S+", " -o " + os.path.join(tmp, "probe.o"), c["command"])
        r = subprocess.run(cmd + " -Xptxas -v", shell=True, cwd=c["directory"],
                           capture_output=True, text=True)
    if r.returncode != 0:
        print(r.stderr[-4000:])
        return 1
    failures, kernels, kernel = [], 0, None
    for line in r.stderr.splitlines():
        m = re.search(r"Compiling entry function '(\S+)'", line)
        if m:
            kernel = m.group(1)
            kernels += "FlashFwdHopperKernel" in kernel
            continue
        if kernel is None or "FlashFwdHopperKernel" not in kernel:
            continue
        plain = re.search(r"ELb0EEEvNS_15AttentionParams", kernel) is not None
        if "C7512" in line or "C7508" in line:
            failures.append(f"{kernel}: {line.strip()}")
        m = re.search(r"(\d+) bytes spill stores", line)
        if m and plain and int(m.group(1)) > 0:
            failures.append(f"{kernel} (plain) spills: {line.strip()}")
    print(f"{kernels} Hopper forward kernels compiled")
    for f in failures:
        print("FAIL", f)
    if kernels == 0:
        print("FAIL no Hopper kernel in ptxas's output")
        return 1
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
