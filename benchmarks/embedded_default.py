"""Benchmark of the embedded default (`reefl run` with no options): accuracy, time,
reproducibility across seeds, and fp32 against bf16 autocast.

Runs the real Flower app through the launcher, once per setting, and prints one markdown
table. Usage: ``python benchmarks/embedded_default.py [--output-dir DIR]``.
It takes about 15 minutes on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from reefl.launch.simulation import run_app

SETTINGS = [
    ("fp32, seed 0", 'seed=0 mixed-precision="fp32"'),
    ("fp32, seed 0 (again)", 'seed=0 mixed-precision="fp32"'),
    ("fp32, seed 1", 'seed=1 mixed-precision="fp32"'),
    ("bf16, seed 0", 'seed=0 mixed-precision="bf16"'),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="outputs/bench-embedded")
    args = parser.parse_args()
    out = Path(args.output_dir).resolve()
    rows = []
    for label, overrides in SETTINGS:
        started = time.monotonic()
        run_dir = run_app([f'{overrides} output-dir="{out}"'], quiet=True)
        final = json.loads((run_dir / "final.json").read_text())
        rows.append((label, final, time.monotonic() - started))
        print(f"done: {label} in {rows[-1][2]:.0f} s", flush=True)
    print("\n| setting | exit accuracy % | mean % | ensemble % | ServerApp s | `reefl run` s |")
    print("|---|---|---|---|---|---|")
    for label, final, total in rows:
        exits = " / ".join(f"{a:.2f}" for a in final["exit_accuracy"])
        print(f"| {label} | {exits} | {final['mean_accuracy']:.2f} | "
              f"{final['ensemble_accuracy']:.2f} | {final['wall_seconds']:.0f} | {total:.0f} |")
    (out / "summary.json").write_text(json.dumps(
        [{"setting": s, "final": f, "launcher_seconds": t} for s, f, t in rows], indent=2))


if __name__ == "__main__":
    main()
