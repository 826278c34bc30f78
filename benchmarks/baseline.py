"""Record the quick-mode baselines from several benchmark runs: the minimum of each gated ratio.

Each run writes its ratios with ``STEMFAST_BENCH_RECORD=FILE`` (see conftest.py); a run may have
failed gates (its ratios are recorded all the same). Usage, from the repository root::

    for i in 1 2 3; do
        STEMFAST_BENCH_UPDATE=1 STEMFAST_BENCH_RECORD=/tmp/run$i.json PYTHONPATH=python python -m pytest -q benchmarks
    done
    python -c "while True: pass" & BUSY=$!      # one core busy
    STEMFAST_BENCH_UPDATE=1 STEMFAST_BENCH_RECORD=/tmp/run4.json PYTHONPATH=python python -m pytest -q benchmarks
    kill $BUSY
    python benchmarks/baseline.py /tmp/run*.json            # prints the table
    python benchmarks/baseline.py /tmp/run*.json --write    # rewrites benchmarks/baseline.json (quick mode)

(``STEMFAST_BENCH_UPDATE=1`` keeps a run from failing on entries it has no baseline for yet.)
Why the minimum, and the floor ``0.7 x baseline``: DEVNOTES.md, "Speed gates".

The minimum is also taken over what other machines of the kind measured: the ``observed`` section of
baseline.json (``{"<where and when>": {"<gate>": ratio, ...}}``, e.g. the attempts a CI run printed
when a gate failed there) and, with ``--keep``, the baselines committed now (so a new recording
on one machine does not raise a baseline that another machine needed). Add an observation with
``--observe "ci 2026-12-02" gather_resampled_numba_vs_numpy=2.78``.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

BASELINE = Path(__file__).with_name("baseline.json")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="JSON files written by STEMFAST_BENCH_RECORD")
    ap.add_argument("--write", action="store_true", help="rewrite the quick-mode entries of baseline.json")
    ap.add_argument("--keep", action="store_true", help="the committed baselines count as one more run")
    ap.add_argument("--observe", nargs="+", metavar=("SOURCE", "GATE=RATIO"),
                    help="add ratios measured elsewhere to the observed section (and to the minimum)")
    args = ap.parse_args(argv)
    runs = [json.loads(p.read_text()) for p in args.runs]
    if any(r["mode"] != "quick" or r.get("slowdown") for r in runs):
        raise SystemExit("baselines come from quick-mode runs without STEMFAST_BENCH_SLOWDOWN")
    old = json.loads(BASELINE.read_text()) if BASELINE.exists() else {}
    observed = dict(old.get("observed", {}))
    if args.observe:
        source, pairs = args.observe[0], args.observe[1:]
        if not pairs or any("=" not in p for p in pairs):
            raise SystemExit("--observe SOURCE GATE=RATIO [GATE=RATIO ...]")
        observed[source] = {**observed.get(source, {}),
                            **{k: float(v) for k, v in (p.split("=", 1) for p in pairs)}}
    labels = [p.stem[:9] for p in args.runs]
    gated = [r["gated"] for r in runs]
    if args.keep:
        labels.append("committed")
        gated.append(old.get("quick", {}))
    for source, vals in observed.items():
        labels.append(source[:9])
        gated.append(vals)
    # the gates of the runs (and, with --keep, the committed ones: a run of some benchmark files only
    # leaves the other baselines as they are)
    names = sorted(set().union(*gated[:len(runs) + int(args.keep)]))
    new = {}
    print(f"{'gate':45s} " + " ".join(f"{lab:>9s}" for lab in labels) + "   baseline  floor  (old)")
    for name in names:
        vals = [g.get(name, math.nan) for g in gated]
        got = [v for v in vals if v == v]
        new[name] = round(min(got), 4)
        prev = old.get("quick", {}).get(name)
        print(f"{name:45s} " + " ".join(f"{v:9.3g}" for v in vals)
              + f"   {new[name]:8.3g} {0.7 * new[name]:6.3g}" + (f"  ({prev:.3g})" if prev else "  (new)"))
    if args.write:
        old["quick"] = new
        if observed:
            old["observed"] = observed
        BASELINE.write_text(json.dumps(old, indent=2, sort_keys=True) + "\n")
        print(f"wrote {BASELINE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
