"""Curated mutation check: every bug listed in ``tools/mutants.toml`` must make its tests fail.

Each mutant names a file, an exact snippet of it (``old``, found exactly once), its replacement
(``new``), the tests that must catch it and a short description. The check copies the repository
(tracked and untracked, non-ignored files) to temporary folders, never touching the working tree;
runs the named tests once on the clean copy (they must pass, or a "caught" would mean nothing);
then, one mutant at a time, writes the mutated file into a copy, runs its tests
(``pytest -x -q``) and restores the file. A mutant is *caught* when pytest reports failing tests;
*missed* when they pass; *not found* when its snippet is not in the file exactly once (the code
moved: re-point the snippet); *error* for anything else (the mutated file does not compile,
collection errors, a timeout).

Usage::

    python tools/mutants.py                 # every mutant, two at a time
    python tools/mutants.py --list          # ids and descriptions
    python tools/mutants.py --only ID ...   # a subset
    make mutants MUTANTS_ARGS="--only ID"   # the same through make

Exit status 0 only when every selected mutant is caught.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import os
import pathlib
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = ROOT / "tools" / "mutants.toml"
IGNORED = (".git", ".venv", "__pycache__", ".pytest_cache", ".hypothesis", "build", "out")


@dataclasses.dataclass(frozen=True)
class Mutant:
  id: str
  file: str
  old: str
  new: str
  tests: tuple[str, ...]
  description: str


@dataclasses.dataclass
class Result:
  mutant: Mutant
  status: str  # caught | missed | not found | error
  detail: str = ""
  seconds: float = 0.0


def load(path: pathlib.Path = DATA) -> list[Mutant]:
  """The mutants of the data file; raises ``ValueError`` on a malformed entry."""
  with open(path, "rb") as f:
    entries = tomllib.load(f).get("mutant", [])
  mutants, seen = [], set()
  for i, e in enumerate(entries):
    missing = {"id", "file", "old", "new", "tests", "description"} - set(e)
    if missing:
      raise ValueError(f"{path}: mutant #{i + 1} lacks {sorted(missing)}")
    if e["id"] in seen:
      raise ValueError(f"{path}: mutant id {e['id']!r} appears twice")
    if e["old"] == e["new"] or not e["tests"]:
      raise ValueError(f"{path}: mutant {e['id']!r} changes nothing or names no tests")
    seen.add(e["id"])
    mutants.append(
      Mutant(e["id"], e["file"], e["old"], e["new"], tuple(e["tests"]), e["description"])
    )
  return mutants


def locate(m: Mutant, root: pathlib.Path = ROOT) -> str | None:
  """``None`` when ``m.old`` occurs exactly once in its file, else why not."""
  path = root / m.file
  if not path.is_file():
    return f"{m.file} does not exist"
  n = path.read_text().count(m.old)
  return None if n == 1 else f"snippet found {n} times in {m.file} (need exactly once)"


def copy_repo(dest: pathlib.Path) -> None:
  """Copies the working tree's tracked and untracked, non-ignored files to ``dest``."""
  try:
    out = subprocess.run(
      ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
      cwd=ROOT,
      capture_output=True,
      check=True,
    ).stdout
    files = [f for f in out.decode().split("\0") if f and (ROOT / f).is_file()]
  except (OSError, subprocess.CalledProcessError):  # not a git checkout
    files = [
      str(p.relative_to(ROOT))
      for p in ROOT.rglob("*")
      if p.is_file() and not set(p.relative_to(ROOT).parts) & set(IGNORED)
    ]
  for f in files:
    target = dest / f
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(ROOT / f, target)


def _env(copy: pathlib.Path) -> dict:
  env = dict(os.environ)
  env["PYTHONPATH"] = str(copy)
  env["PYTHONDONTWRITEBYTECODE"] = "1"  # a mutated file must never meet a stale .pyc
  return env


def pytest(copy: pathlib.Path, tests, extra=(), timeout=None) -> subprocess.CompletedProcess:
  cmd = [sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", *extra, *tests]
  return subprocess.run(
    cmd, cwd=copy, env=_env(copy), capture_output=True, text=True, timeout=timeout
  )


def check_import(copy: pathlib.Path) -> None:
  """The copy's ``qatjax`` must be the one imported (not an installed one)."""
  out = subprocess.run(
    [sys.executable, "-c", "import qatjax; print(qatjax.__file__)"],
    cwd=copy,
    env=_env(copy),
    capture_output=True,
    text=True,
    check=True,
  ).stdout.strip()
  if not pathlib.Path(out).resolve().is_relative_to(copy.resolve()):
    raise SystemExit(f"mutants: the copy imports qatjax from {out}, not from {copy}")


FAILED = re.compile(r"^(?:FAILED|ERROR) (\S+)", re.M)


def run_mutant(m: Mutant, copy: pathlib.Path, timeout: float) -> Result:
  path = copy / m.file
  original = path.read_text()
  if original.count(m.old) != 1:
    return Result(m, "not found", f"snippet found {original.count(m.old)} times in {m.file}")
  mutated = original.replace(m.old, m.new)
  try:
    compile(mutated, str(path), "exec")
  except SyntaxError as e:
    return Result(m, "error", f"the mutated file does not compile: {e}")
  t0 = time.perf_counter()
  path.write_text(mutated)
  try:
    proc = pytest(copy, m.tests, ("-x",), timeout=timeout)
  except subprocess.TimeoutExpired:
    return Result(m, "error", f"timeout after {timeout:.0f} s", time.perf_counter() - t0)
  finally:
    path.write_text(original)
  seconds = time.perf_counter() - t0
  failed = FAILED.findall(proc.stdout)
  if proc.returncode == 0:
    return Result(m, "missed", "the tests passed", seconds)
  if proc.returncode == 1 and failed:
    return Result(m, "caught", failed[0], seconds)
  tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
  return Result(m, "error", f"pytest exit {proc.returncode}: " + " | ".join(tail), seconds)


def baseline(copy: pathlib.Path, mutants) -> None:
  """The named tests pass on the unmutated copy."""
  tests = list(dict.fromkeys(t for m in mutants for t in m.tests))
  print(f"baseline: {len(tests)} test selections on the clean copy ...", flush=True)
  t0 = time.perf_counter()
  proc = pytest(copy, tests, ("-n", "2"))
  if proc.returncode != 0:
    print(proc.stdout[-4000:] + proc.stderr[-2000:])
    raise SystemExit("mutants: the named tests fail without any mutation; fix them first")
  print(f"baseline: passed ({time.perf_counter() - t0:.0f} s)", flush=True)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--data", type=pathlib.Path, default=DATA, help="the mutants file (TOML)")
  p.add_argument("--only", nargs="+", metavar="ID", help="run these mutants only")
  p.add_argument("--list", action="store_true", help="list the mutants and exit")
  p.add_argument("--jobs", type=int, default=2, help="mutants tested at once (default 2)")
  p.add_argument("--timeout", type=float, default=900, help="seconds per mutant")
  p.add_argument("--no-baseline", action="store_true", help="skip the clean run of the tests")
  args = p.parse_args(argv)
  mutants = load(args.data)
  if args.only:
    unknown = set(args.only) - {m.id for m in mutants}
    if unknown:
      p.error(f"unknown mutant ids: {sorted(unknown)}")
    mutants = [m for m in mutants if m.id in args.only]
  if args.list:
    for m in mutants:
      print(f"{m.id:32s} {m.file}: {m.description}")
    return 0

  results = {m.id: Result(m, "not found", why) for m in mutants if (why := locate(m))}
  todo = [m for m in mutants if m.id not in results]
  with tempfile.TemporaryDirectory(prefix="qatjax-mutants-") as tmp:
    copies = [pathlib.Path(tmp) / f"copy{i}" for i in range(max(1, min(args.jobs, len(todo))))]
    for c in copies:
      copy_repo(c)
    check_import(copies[0])
    if todo and not args.no_baseline:
      baseline(copies[0], todo)
    free: queue.Queue = queue.Queue()
    for c in copies:
      free.put(c)

    def work(m):
      c = free.get()
      try:
        return run_mutant(m, c, args.timeout)
      finally:
        free.put(c)

    with concurrent.futures.ThreadPoolExecutor(len(copies)) as pool:
      for r in pool.map(work, todo):
        results[r.mutant.id] = r
        print(f"{r.status:9s} {r.mutant.id:32s} {r.seconds:6.1f} s  {r.detail}", flush=True)

  ordered = [results[m.id] for m in mutants]
  print("\n| mutant | file | status | caught by |\n|---|---|---|---|")
  for r in ordered:
    by = r.detail if r.status == "caught" else f"**{r.detail}**"
    print(f"| {r.mutant.id} | {r.mutant.file} | {r.status} | {by} |")
  counts = {s: sum(r.status == s for r in ordered) for s in ("caught", "missed", "not found")}
  errors = len(ordered) - sum(counts.values())
  print(
    f"\n{len(ordered)} mutants: {counts['caught']} caught, {counts['missed']} missed, "
    f"{counts['not found']} not found, {errors} errors"
  )
  return 0 if counts["caught"] == len(ordered) else 1


if __name__ == "__main__":
  sys.exit(main())
