"""Run laplace-torch's own test suite with laplace-rs's backends added.

laplace-torch's wheel has no tests: pass its source tree's ``tests/``
directory (a checkout of github.com/aleximmer/Laplace at the release that is
installed). The tests are copied into a scratch directory and rewritten:

* outside the per-backend unit tests (``test_curv_backends_*.py``), every
  literal list of laplace-torch backends (``[AsdlEF, AsdlGGN, ...]``, in
  ``parametrize`` decorators or module-level ``backends = [...]``) gains
  our counterparts: ``RustGGN`` where it holds a GGN backend, ``RustEF``
  where it holds an EF one, ``RustHessian`` where it holds a Hessian one;
* ``test_curv_backends_rust.py`` is ``test_curv_backends_curvlinops.py``
  with the backends under test (its parametrized ``CurvlinopsEF`` /
  ``CurvlinopsGGN`` lists) swapped for ``RustEF`` / ``RustGGN``; its
  references (BackPACK, ASDL) stay.

Then pytest runs twice in the same environment, unmodified and rewritten, and
the script reports: tests run with one of our backends (passed / failed /
skipped), and every failure of the rewritten suite that the unmodified suite
does not share::

    venv/bin/python python/tests/laplace_torch_suite.py /path/to/Laplace/tests [-k EXPR] [-n]

``-n``: only write the rewritten copy and print its path (to run pytest on it
by hand).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET

BACKEND = re.compile(r"^(Asdl|BackPack|Curvlinops|Asdfghjkl)(GGN|EF|Hessian)$")
INTERFACE = re.compile(r"^(GGN|EF|Curvature)Interface$")  # may appear in such a list
LIST = re.compile(r"\[([\s\w,]*?)\]")
IMPORT = "from laplace_rs.torch import RustEF, RustGGN, RustHessian  # added by laplace_torch_suite.py\n"


def add_rust(source: str) -> tuple[str, int]:
    """Append RustGGN / RustEF / RustHessian to every literal list of laplace-torch backends."""
    count = 0

    def repl(m):
        nonlocal count
        items = [t.strip() for t in m.group(1).split(",") if t.strip()]
        if not items or not all(BACKEND.match(t) or INTERFACE.match(t) for t in items) \
                or not any(BACKEND.match(t) for t in items):
            return m.group(0)
        kinds = {BACKEND.match(t).group(2) for t in items if BACKEND.match(t)}
        extra = [f"Rust{k}" for k in ("GGN", "EF", "Hessian") if k in kinds]
        count += 1
        return "[" + ", ".join(items + extra) + "]"

    return LIST.sub(repl, source), count


def swap_to_rust(source: str) -> str:
    """The curvlinops backend test file with the backends under test replaced by ours."""

    def repl(m):
        items = [t.strip() for t in m.group(1).split(",") if t.strip()]
        if items and all(t in ("CurvlinopsEF", "CurvlinopsGGN") for t in items):
            return "[" + ", ".join(t.replace("Curvlinops", "Rust") for t in items) + "]"
        return m.group(0)

    return LIST.sub(repl, source)


def with_import(source: str) -> str:
    """Insert our import after the module's first block of imports (keeps `from __future__` first)."""
    lines = source.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.startswith(("import ", "from ")) and "__future__" not in line:
            return "".join(lines[:i]) + IMPORT + "".join(lines[i:])
    return IMPORT + source


def rewrite(src_tests: str, dst: str) -> dict:
    """Copy laplace-torch's tests to ``dst/tests`` with our backends added; lists rewritten per file."""
    out = os.path.join(dst, "tests")
    shutil.copytree(src_tests, out)
    counts = {}
    for name in sorted(os.listdir(out)):
        if not name.endswith(".py"):
            continue
        if name.startswith("test_curv_backends_"):
            continue  # one backend's own unit tests; ours get the curvlinops file's copy below
        path = os.path.join(out, name)
        s = open(path).read()
        s2, n = add_rust(s)
        if n:
            counts[name] = n
            open(path, "w").write(with_import(s2))
    cl = os.path.join(src_tests, "test_curv_backends_curvlinops.py")
    if os.path.exists(cl):
        s = swap_to_rust(open(cl).read())
        open(os.path.join(out, "test_curv_backends_rust.py"), "w").write(with_import(s))
        counts["test_curv_backends_rust.py"] = "new"
    return counts


def run(tests_dir: str, xml: str, k: str | None) -> None:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
           f"--junitxml={xml}", tests_dir]
    if k:
        cmd += ["-k", k]
    # the tests import `tests.utils`: run from the directory above tests/
    subprocess.run(cmd, cwd=os.path.dirname(tests_dir), check=False)


def results(xml: str) -> dict[str, str]:
    out = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        status = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                status = "failed"
            elif child.tag == "skipped":
                status = "skipped"
        out[name] = status
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tests", help="laplace-torch's tests/ directory")
    ap.add_argument("-k", default=None, help="pytest -k expression (both runs)")
    ap.add_argument("-n", action="store_true", help="only write the rewritten copy")
    args = ap.parse_args()
    src = os.path.abspath(args.tests)
    work = tempfile.mkdtemp(prefix="laplace_torch_suite_")
    counts = rewrite(src, work)
    print("rewritten:", counts)
    if args.n:
        print(os.path.join(work, "tests"))
        return
    base_dir = os.path.join(work, "base")
    shutil.copytree(src, os.path.join(base_dir, "tests"))
    run(os.path.join(base_dir, "tests"), os.path.join(work, "base.xml"), args.k)
    run(os.path.join(work, "tests"), os.path.join(work, "rust.xml"), args.k)
    base, ours = results(os.path.join(work, "base.xml")), results(os.path.join(work, "rust.xml"))
    rust = {n: s for n, s in ours.items() if "Rust" in n}
    tally = lambda d: {s: sum(1 for v in d.values() if v == s) for s in ("passed", "failed", "skipped")}  # noqa: E731
    print(f"\nunmodified suite: {tally(base)}")
    print(f"with laplace-rs backends: {tally(ours)}")
    print(f"tests run with a laplace-rs backend: {tally(rust)}")
    new = sorted(n for n, s in ours.items() if s == "failed" and base.get(n) != "failed")
    print(f"failures not in the unmodified suite ({len(new)}):")
    for n in new:
        print("  ", n)
    print("junit XML:", work)


if __name__ == "__main__":
    main()
