"""Where benchmark results go: ``NAME.json`` (the data) and ``NAME.md`` (the README table).

``update_readme.py`` pastes the ``.md`` files into the README; the JSON keeps every number.
"""

from __future__ import annotations

import json
import pathlib


def write_results(out_dir, name: str, data, md: str) -> None:
  """Writes ``out_dir/name.json`` and ``out_dir/name.md`` (creating ``out_dir``) and says so."""
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  (out / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
  (out / f"{name}.md").write_text(md.rstrip("\n") + "\n")
  print(f"wrote {out / f'{name}.json'} and {out / f'{name}.md'}")


def cpu_name() -> str:
  """The CPU's model name (``/proc/cpuinfo``; ``platform`` elsewhere), for the results' headers:
  time ratios, between libraries too, differ from one CPU model to another."""
  import platform

  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()
