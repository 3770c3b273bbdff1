#!/usr/bin/env python3
"""Checks that the deployment files use only what the ringattn binary defines.

    check_manifests.py PATH/TO/ringattn [DEPLOY_DIR]

Finds every ringattn command line in deploy/ -- `args:`/`command:` lists in the Kubernetes YAML
(block lists and [flow, lists]) and the Dockerfile's ENTRYPOINT/CMD -- and fails (exit 1, naming
the file, line and flag) when one uses a --flag that `ringattn --helpfull` does not list, or a
subcommand that the binary's usage text does not list. Standard library only (no PyYAML).
"""
import json
import os
import re
import subprocess
import sys

FLAG_RE = re.compile(r"^--(?:no)?([A-Za-z_][A-Za-z0-9_]*)(?:=.*)?$")


def binary_info(binary):
    """Returns (flag names, subcommands) that the binary defines."""
    help_text = subprocess.run([binary, "--helpfull"], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, timeout=60).stdout.decode("utf-8", "replace")
    usage = subprocess.run([binary], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           timeout=60).stdout.decode("utf-8", "replace")
    flags = set(re.findall(r"^\s+--([A-Za-z_][A-Za-z0-9_]*) \(", help_text, re.M))
    commands = set()
    in_commands = False
    for line in usage.splitlines():
        if line.strip() == "commands:":
            in_commands = True
            continue
        if in_commands:
            m = re.match(r"^  ([a-z][a-z_]*)\s", line)
            if m:
                commands.add(m.group(1))
    if not flags:
        sys.exit(f"check_manifests: `{binary} --helpfull` listed no flags:\n{help_text[:2000]}")
    if not commands:
        sys.exit(f"check_manifests: `{binary}` printed no command list:\n{usage[:2000]}")
    return flags, commands


def unquote(item):
    item = item.strip()
    if item.startswith("- "):
        item = item[2:].strip()
    if item.startswith("#"):
        return None
    # Drop a trailing comment outside quotes.
    if item[:1] in "\"'":
        q = item[0]
        end = item.find(q, 1)
        return item[1:end] if end > 0 else item[1:]
    return re.sub(r"\s+#.*$", "", item).strip()


def yaml_argvs(path):
    """Yields (line number, key, [tokens]) for each args:/command: list in a YAML file."""
    lines = open(path, encoding="utf-8").read().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        m = re.match(r"^(\s*)(?:-\s+)?(args|command):\s*(.*)$", line)
        if not m:
            i += 1
            continue
        start = i + 1
        rest = m.group(3).strip()
        tokens = []
        if rest.startswith("["):  # flow list, possibly over several lines
            text = rest
            while "]" not in text and i + 1 < len(lines):
                i += 1
                text += " " + lines[i].strip()
            body = text[1:text.index("]")]
            tokens = [unquote(t) for t in re.findall(r'"[^"]*"|\'[^\']*\'|[^,]+', body)]
        elif rest and not rest.startswith("#"):
            tokens = unquote(rest).split()
        else:  # block list: the following "- item" lines at a deeper or equal indent
            key_indent = len(m.group(1))
            j = i + 1
            while j < len(lines):
                item = lines[j]
                if not item.strip() or item.strip().startswith("#"):
                    j += 1
                    continue
                im = re.match(r"^(\s*)- (.*)$", item)
                if not im or len(im.group(1)) < key_indent:
                    break
                tokens.append(unquote(im.group(2)))
                j += 1
            i = j - 1
        yield start, m.group(2), [t for t in tokens if t]
        i += 1


def dockerfile_argvs(path):
    for n, line in enumerate(open(path, encoding="utf-8").read().splitlines(), 1):
        m = re.match(r"^\s*(ENTRYPOINT|CMD)\s+(\[.*\])\s*$", line)
        if m:
            yield n, m.group(1), json.loads(m.group(2))


def ringattn_commands(key, argv):
    """The [subcommand, args...] that argv runs ringattn with, or None.

    Every container in deploy/ runs the ringattn image, whose ENTRYPOINT is ringattn: an
    `args:` list (and the Dockerfile's CMD) is ringattn's arguments. A `command:` list, a shell
    line or an ENTRYPOINT counts when it names the ringattn binary."""
    for k, tok in enumerate(argv):
        words = tok.split()
        for j, w in enumerate(words):
            if os.path.basename(w) == "ringattn":
                return [" ".join(words[j + 1:])] + argv[k + 1:]
    if key in ("args", "CMD"):
        return argv
    return None


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    binary = sys.argv[1]
    deploy = sys.argv[2] if len(sys.argv) > 2 else os.path.dirname(os.path.abspath(__file__))
    flags, commands = binary_info(binary)

    sources = []
    for root, _, files in os.walk(deploy):
        for f in sorted(files):
            p = os.path.join(root, f)
            if f.endswith((".yaml", ".yml")):
                sources.extend((p, n, k, a) for n, k, a in yaml_argvs(p))
            elif f == "Dockerfile" or f.endswith(".Dockerfile"):
                sources.extend((p, n, k, a) for n, k, a in dockerfile_argvs(p))

    errors, checked = [], 0
    for path, line, key, argv in sources:
        cmd = ringattn_commands(key, argv)
        if cmd is None:
            continue
        where = f"{os.path.relpath(path, deploy)}:{line}"
        checked += 1
        words = " ".join(cmd).split()  # a shell line may pack several tokens into one
        if words and not words[0].startswith("--"):
            if words[0] not in commands:
                errors.append(f"{where}: subcommand '{words[0]}' is not one of the binary's "
                              f"commands ({', '.join(sorted(commands))})")
            words = words[1:]
        for w in words:
            if not w.startswith("--"):
                continue
            m = FLAG_RE.match(w)
            name = m.group(1) if m else w
            plain = w[2:].split("=", 1)[0]
            if plain not in flags and name not in flags:
                errors.append(f"{where}: flag --{plain} is not defined by {binary}")
    if checked == 0:
        errors.append(f"no ringattn command lines found under {deploy}")
    for e in errors:
        print("check_manifests: " + e, file=sys.stderr)
    if errors:
        return 1
    print(f"check_manifests: {checked} ringattn command lines, all flags and subcommands known")
    return 0


if __name__ == "__main__":
    sys.exit(main())
