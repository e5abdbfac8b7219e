"""Does stopping early save time? Early-exit prediction on a run's test split at several
thresholds, against its FLOPs.

For a finished run folder, each policy predicts the whole test split (batches of
``--batch``, one torch thread): the deepest exit for every sample (threshold above 1), the
run's calibrated thresholds (``reefl calibrate``) if it has them, and single thresholds. The
policies are interleaved (every repetition times each once) and timed in process CPU time,
wall time beside it. Printed per policy: accuracy, mean MFLOPs per image, CPU ms per image,
and both as a ratio to the deepest exit: if the savings are real, the time ratio follows the
FLOPs ratio (it stays above it by the work every sample does, e.g. the per-exit checks).

    python benchmarks/early_exit_predict.py RUN_DIR [--reps 3] [--batch 256]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from reefl.anytime import ExitPolicy, load
from reefl.anytime.policy import NEVER
from reefl.anytime.predict import calibrated_policy, read_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = load(args.run)
    inputs = read_split(args.run, "test")
    policies = {"deepest exit": ExitPolicy((NEVER,) * model.num_exits)}
    calibrated = calibrated_policy(model, args.run, None)
    if calibrated is not None:
        policies["calibrated"] = calibrated
    for threshold in (0.95, 0.8, 0.0):
        policies[f"threshold {threshold:g}"] = ExitPolicy((threshold,) * model.num_exits)
    cpu: dict[str, list[float]] = {name: [] for name in policies}
    wall: dict[str, list[float]] = {name: [] for name in policies}
    results = {}
    for _ in range(args.reps):
        for name, policy in policies.items():
            start_cpu, start_wall = time.process_time(), time.perf_counter()
            results[name] = model.predict(inputs.x, policy=policy, batch_size=args.batch)
            cpu[name].append(time.process_time() - start_cpu)
            wall[name].append(time.perf_counter() - start_wall)
    n = len(inputs.names)
    base_cpu = statistics.median(cpu["deepest exit"])
    base_flops = float(results["deepest exit"].flops.double().mean())
    print(f"{args.run}: {n} test samples, {model.num_exits} exits, batch {args.batch}, "
          f"1 thread, {args.reps} interleaved reps (median)")
    print(f"{'policy':<16}{'acc %':>8}{'MFLOPs/img':>12}{'CPU ms/img':>12}{'wall ms/img':>13}"
          f"{'FLOPs ratio':>13}{'CPU ratio':>11}")
    for name in policies:
        result = results[name]
        accuracy = 100.0 * float((result.labels == inputs.labels).double().mean())
        flops = float(result.flops.double().mean())
        med_cpu, med_wall = statistics.median(cpu[name]), statistics.median(wall[name])
        print(f"{name:<16}{accuracy:>8.2f}{flops / 1e6:>12.3f}{1e3 * med_cpu / n:>12.4f}"
              f"{1e3 * med_wall / n:>13.4f}{flops / base_flops:>13.2f}"
              f"{med_cpu / base_cpu:>11.2f}")


if __name__ == "__main__":
    main()
