#!/usr/bin/env python3
"""Commands shown in the Markdown docs, for the CI checks that they still run.

  doc_commands.py vectord FILE.md...
      Prints, one per line, the `$ vectord …` commands of every fenced block that follows a
      `<!-- readme-check` marker line, each followed by a line holding the JSON list of the
      first words of the output lines the doc shows for it (the output's shape: `index`,
      `imported`, `winner:`, … — the numbers may differ from run to run).

  doc_commands.py grpcurl SCRIPT FILE.md...
      Checks that every `$ grpcurl …` command in the fenced blocks of FILE.md is one that
      SCRIPT (examples/grpcurl-tour.sh) runs: the same method and, where the doc shows the
      whole JSON body, the same JSON. Exits 1 naming each command that is not.
"""

import json
import re
import shlex
import sys


def fenced_blocks(path):
    """(marked, lines) for every fenced block of the file; marked when a `<!-- readme-check`
    line comes before it with only blank lines between."""
    blocks, cur, marked, pending = [], None, False, False
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if cur is None:
                if line.strip().startswith("```"):
                    cur, marked = [], pending
                elif line.strip().startswith("<!-- readme-check"):
                    pending = True
                elif line.strip():
                    pending = False
            elif line.strip().startswith("```"):
                blocks.append((marked, cur))
                cur, pending = None, False
            else:
                cur.append(line)
    return blocks


def commands(lines):
    """[(command, [output lines])] of the `$ ` lines of a block, with continuation lines."""
    out, i = [], 0
    while i < len(lines):
        line = lines[i]
        if not line.startswith("$ "):
            i += 1
            continue
        cmd = line[2:]
        # A command goes on after a trailing backslash, or inside an open single quote.
        while (cmd.endswith("\\") or cmd.count("'") % 2) and i + 1 < len(lines):
            i += 1
            cmd = cmd.removesuffix("\\").rstrip() + " " + lines[i].strip()
        i += 1
        shown = []
        while i < len(lines) and not lines[i].startswith("$ "):
            shown.append(lines[i])
            i += 1
        out.append((cmd, shown))
    return out


def first_words(lines):
    """The first word of each line that starts (after spaces) with a letter."""
    words = []
    for line in lines:
        parts = line.split()
        if parts and parts[0][0].isalpha():
            words.append(parts[0])
    return words


def vectord_main(paths):
    n = 0
    for path in paths:
        for marked, lines in fenced_blocks(path):
            if not marked:
                continue
            for cmd, shown in commands(lines):
                if not cmd.startswith("vectord "):
                    sys.exit(f"{path}: a checked block runs something else than vectord: {cmd}")
                print(cmd)
                print(json.dumps(first_words(shown)))
                n += 1
    if n == 0:
        sys.exit(f"no `$ vectord` commands in a block marked <!-- readme-check in {paths}")


def tour_calls(script):
    """(method, json body or None) of every grpcurl call the tour script makes."""
    calls = [("list", None)]
    with open(script, encoding="utf-8") as f:
        for line in f:
            m = re.match(r"^g (\S+) '(.*)'\s*$", line)
            if m:
                calls.append((m.group(1), json.loads(m.group(2))))
            elif re.search(r'grpcurl -plaintext -d "\$POINTS" "\$ADDR" (\S+)', line):
                method = re.search(r'"\$ADDR" (\S+)', line).group(1)
                calls.append((method, None))
    return calls


def grpcurl_main(script, paths):
    calls = tour_calls(script)
    bad, n = [], 0
    for path in paths:
        for _, lines in fenced_blocks(path):
            for cmd, _ in commands(lines):
                if not cmd.startswith("grpcurl"):
                    continue
                n += 1
                whole = "…" not in cmd
                try:
                    tokens = shlex.split(cmd, comments=True)
                except ValueError:
                    tokens, whole = cmd.split(), False
                method = next((t for t in reversed(tokens) if "/" in t or t == "list"), None)
                if method is None and not whole:
                    # An abbreviated call (`grpcurl … RunTrial '{…}'`): a bare method name.
                    names = {m.split("/")[-1] for m, _ in calls}
                    method = next((t for t in tokens if t in names), None)
                if method is None:
                    bad.append(f"{path}: no method in: {cmd}")
                    continue
                body = None
                if whole and "-d" in tokens:
                    body = json.loads(tokens[tokens.index("-d") + 1])
                ok = any(
                    (m == method if whole else m.endswith(method.split("/")[-1]))
                    and (body is None or b == body)
                    for m, b in calls
                )
                if not ok:
                    bad.append(f"{path}: not run by {script}: {cmd}")
    if n == 0:
        bad.append(f"no `$ grpcurl` commands in {paths}")
    for b in bad:
        print(b, file=sys.stderr)
    if bad:
        sys.exit(1)
    print(f"{n} grpcurl commands in {', '.join(paths)} are run by {script}")


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "vectord":
        vectord_main(sys.argv[2:])
    elif len(sys.argv) >= 4 and sys.argv[1] == "grpcurl":
        grpcurl_main(sys.argv[2], sys.argv[3:])
    else:
        sys.exit(__doc__)
