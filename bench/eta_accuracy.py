"""How honest the overall ETA is, from any run's eta.jsonl (pystream-bench writes it into every run directory): at
25/50/75% of the run's time, the ETA against the time that really remained.

    pystream-bench --lengths 4k,1M --out RUN && python bench/eta_accuracy.py RUN   # the default run
    python bench/eta_accuracy.py RUN [--session N] [--json]

Three rows per point in the run:
  logged    what the bar showed when the item running at that point started (from the log: exact, at that moment)
  replayed  the same plan and durations run again on a fake clock with this version's cost model, read at exactly
            that point (the logged parts: what this version's rates and borrowing make of them)
  replanned as replayed, with the plan built again from the logged spec by this version's rules (its parts too)
beside the count-based estimate (time so far / items done x items left) for comparison. A resumed run has one
session per start; the last complete one is read by default.
"""

import argparse
import json
import sys
from pathlib import Path

from pystream.measure.eta import PlanSpec, logged_items, prior_rates, read_log, replan, replay, replay_items

SHARES = (0.25, 0.5, 0.75)


def logged(session, shares=SHARES):
    """At each share of the session's time: the ETA logged at the start of the item then running, the time that
    really remained from that start, and the count-based estimate at that start."""
    entries = session["items"]
    end = entries[-1]["elapsed_s"]
    total = len(entries)
    out = []
    for share in shares:
        at = share * end
        done, entry = next((n, e) for n, e in enumerate(entries) if e["elapsed_s"] >= at)
        started = entry["elapsed_s"] - entry["actual_s"]
        left = end - started
        counted = started / done * (total - done) if done else float("nan")
        eta = entry["eta_at_start_s"]
        out.append({"share": share, "elapsed_s": started, "actual_left_s": left, "eta_s": eta,
                    "error": (eta - left) / left, "count_eta_s": counted, "count_error": (counted - left) / left})
    return out


def accuracy(path: Path, session: int = -1) -> dict:
    sessions = read_log(path)
    complete = [s for s in sessions if s["items"] and s["items"][-1]["pending"] == 0]
    if not sessions:
        raise SystemExit(f"{path}: no ETA log in it")
    chosen = (complete or sessions)[session] if session == -1 else sessions[session]
    header = chosen["header"]
    if not chosen["items"]:
        raise SystemExit(f"{path}: no item of that session has finished yet")
    result = {"items": len(chosen["items"]), "seconds": chosen["items"][-1]["elapsed_s"] if chosen["items"] else 0,
              "complete": chosen["items"][-1]["pending"] == 0 if chosen["items"] else False,
              "logged": logged(chosen),
              "replayed": replay(logged_items(header), chosen["items"], header["priors"])}
    if header.get("spec"):  # this version's plan and priors
        spec = PlanSpec.from_dict(header["spec"])
        priors = prior_rates(spec.parameters, spec.layers, spec.device)
        result["replanned"] = replay(replan(header), chosen["items"], priors)
        result["per_item"] = replay_items(replan(header), chosen["items"], priors)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a run directory (or its eta.jsonl)")
    parser.add_argument("--session", type=int, default=-1, help="which session of a resumed run (default: the last "
                        "complete one)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--items", action="store_true", help="also each item's predicted seconds (replanned) against "
                        "what it took")
    args = parser.parse_args(argv)
    path = args.run / "eta.jsonl" if args.run.is_dir() else args.run
    result = accuracy(path, args.session)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{path}: {result['items']} items in {result['seconds']:.1f} s"
          + ("" if result["complete"] else " (session not complete: over its finished items only)"))
    print(f"{'at':>4} {'how':>10} {'elapsed_s':>9} {'actual_left_s':>13} {'eta_s':>9} {'error':>7}")
    for n, share in enumerate(SHARES):
        row = result["logged"][n]
        at = f"{share:4.0%}"
        if result["complete"]:  # an unfinished session's logged ETA counts items that never ran
            print(f"{at} {'logged':>10} {row['elapsed_s']:9.1f} {row['actual_left_s']:13.1f} "
                  f"{row['eta_s']:9.1f} {row['error']:+7.0%}")
            at = ""
        print(f"{at:>4} {'counted':>10} {row['elapsed_s']:9.1f} "
              f"{row['actual_left_s']:13.1f} {row['count_eta_s']:9.1f} {row['count_error']:+7.0%}")
        for how in ("replayed", "replanned"):
            if how in result:
                r = result[how][n]
                print(f"{'':4} {how:>10} {r['elapsed_s']:9.1f} {r['actual_left_s']:13.1f} {r['eta_s']:9.1f} "
                      f"{r['error']:+7.0%}")
    if args.items and "per_item" in result:
        print(f"\n{'item':40} {'predicted_s':>11} {'actual_s':>9} {'error':>7}")
        for row in result["per_item"]:
            error = (row["predicted_s"] - row["actual_s"]) / row["actual_s"] if row["actual_s"] > 0 else 0.0
            print(f"{row['label']:40} {row['predicted_s']:11.1f} {row['actual_s']:9.1f} {error:+7.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
