#!/usr/bin/env python3
"""Fails if the engine's top-level modules import each other in a cycle.

Reads every file under engine/src/<module>(.rs|/) and records which other top-level modules
it names (`crate::<other>` in code, `use` lines included; comments and doc comments ignored,
and `#[cfg(test)]` test modules too: a test may reach anywhere). Prints the edges and any
cycle, one line each, and exits 1 on a cycle.
"""
import os
import re
import sys

ROOT = os.path.join(os.path.dirname(__file__), "..", "engine", "src")


def modules():
    for name in sorted(os.listdir(ROOT)):
        path = os.path.join(ROOT, name)
        if name.endswith(".rs") and name not in ("lib.rs", "main.rs"):
            yield name[:-3], [path]
        elif os.path.isdir(path):
            files = []
            for d, _, fs in os.walk(path):
                files += [os.path.join(d, f) for f in fs if f.endswith(".rs")]
            yield name, sorted(files)


def code_of(text):
    """The text without comments and without `#[cfg(test)]` items (brace-matched)."""
    text = re.sub(r"//[^\n]*", "", text)
    out, i = [], 0
    while True:
        j = text.find("#[cfg(test)]", i)
        if j < 0:
            out.append(text[i:])
            return "".join(out)
        out.append(text[i:j])
        k = text.find("{", j)
        semi = text.find(";", j)
        if k < 0 or (0 <= semi < k):
            i = semi + 1
            continue
        depth, p = 0, k
        while p < len(text):
            depth += {"{": 1, "}": -1}.get(text[p], 0)
            p += 1
            if depth == 0:
                break
        i = p


def main():
    mods = dict(modules())
    # Test-only files (a module declared under #[cfg(test)]) are left out whole.
    test_only = {"sim.rs", "tests.rs", "fuzz.rs", "testdata.rs"}
    edges = {m: set() for m in mods}
    for m, files in mods.items():
        for f in files:
            if os.path.basename(f) in test_only or os.sep + "tests" + os.sep in f:
                continue
            code = code_of(open(f, encoding="utf-8").read())
            for other in re.findall(r"\bcrate::([a-z_]+)", code):
                if other != m and other in mods:
                    edges[m].add(other)
    for m in sorted(edges):
        print(f"{m} -> {', '.join(sorted(edges[m])) or '(nothing)'}")
    cycles, seen = [], set()

    def walk(node, stack):
        for nxt in sorted(edges[node]):
            if nxt in stack:
                cyc = stack[stack.index(nxt):] + [nxt]
                key = frozenset(cyc)
                if key not in seen:
                    seen.add(key)
                    cycles.append(cyc)
            elif len(stack) < len(edges):
                walk(nxt, stack + [nxt])

    for m in sorted(edges):
        walk(m, [m])
    for c in cycles:
        print("cycle: " + " -> ".join(c))
    if cycles:
        print(f"{len(cycles)} module cycle(s): break them (see ARCHITECTURE.md, 'Seams')")
        return 1
    print("no module cycles")
    return 0


if __name__ == "__main__":
    sys.exit(main())
