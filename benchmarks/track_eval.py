"""Defect tracking through a synthetic series, end to end: ``stemfast batch`` on a drifting MoS2 series
with hopping, appearing and vanishing sulfur vacancies, scored against the generator's history.

Run (from the repository root; a few minutes on 2 cores)::

    PYTHONPATH=python python benchmarks/track_eval.py [--model m.pt] [--frames 20] [--size 384]
        [--scheduler local:2] [--out DIR] [--json FILE]

Metrics (a detection matches a true defect of its frame within ``0.5`` column spacings,
one-to-one, Hungarian):

* ``followed``: of the true defects present in >= 3 frames, the fraction whose matched
  detections carry one track id in >= 80 % of the frames the defect is present (target >= 0.9);
* ``extra_ids_per_defect``: mean over true defects with a tracked detection of (distinct track
  ids - 1) (target <= 0.2);
* ``false_track_fraction``: tracks (``tracks.csv``) whose detections match a true defect in less
  than half of their frames (target <= 0.1);
* ``ap_mean``: per-frame defect average precision of ``anomaly_score`` over all sites, true
  defects without a site counted as missed (recall-capped), averaged over frames (target >= 0.85);
* hops and lifetimes: true hops vs hops of the tracks that follow them, exact first/last frames.

Re-linking without detecting again (the detection is the expensive part): ``--relink DIR`` takes
the ``sites.csv`` and frame drifts of a run kept with ``--out DIR`` and links them again with the
current linker (``stemfast.tracking.DefectLinker``, the settings of the batch: config defaults,
the tracker's score scale ``tracking.cutoff``, image centre), then scores as above; ``--diagnose`` prints, for every true
defect seen in >= 3 frames that is not followed, each frame's score, flag and track id, and the true
events of it and its neighbours where its track id changes::

    PYTHONPATH=python python benchmarks/track_eval.py --seed 4 --model m.pt --out /tmp/te4
    PYTHONPATH=python python benchmarks/track_eval.py --relink /tmp/te4 --diagnose

The bound set by the series itself (no detection, ~2 s a seed): ``--bound N`` prints, for N seeds from
``--seed`` on, "followed" on perfect detections (the generator's true positions) linked by the linker
and by the MAP linking under the generator's own probabilities (:func:`bound`)::

    PYTHONPATH=python python benchmarks/track_eval.py --bound 100 --seed 0

Exit status 0 when every target is met, 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

TINY = {"model.epochs": 2, "model.stn_epochs": 1, "model.max_train_patches": 800, "model.batch_size": 64,
        "model.input_size": 16, "model.channels": [8, 8, 8], "model.stn_channels": [4, 8], "model.patience": 2,
        "model.device": "cpu"}
#: Defect dynamics of the series (per frame): hop to a free neighbouring S2 column, new V_S per free S2
#: column, V_S refilled.
DYNAMICS = {"hop_prob": 0.15, "birth_rate": 0.002, "death_prob": 0.03}
TARGETS = {"followed": (">=", 0.9), "extra_ids_per_defect": ("<=", 0.2), "false_track_fraction": ("<=", 0.1),
           "ap_mean": (">=", 0.85)}


def make_data(folder: Path, *, frames: int, size: int, seed: int, pixel_size_A: float = 0.12, dose: float = 500.0,
              v_s: float = 0.05):
    from stemfast.synthetic import SeriesConfig, make_series

    s = make_series(SeriesConfig(n_frames=frames, v_s=v_s, seed=seed, **DYNAMICS),
                    shape=(size, size), pixel_size_A=pixel_size_A, dose=dose, drift_px_per_frame=(0.25, 0.17),
                    seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    s.save(folder / "series.tif", truth_path=folder.parent / "series.series.npz")
    return s


def evaluate(sites, tracks, truth: np.ndarray, events: list, nn_px: float, n_frames: int) -> dict:
    """The metrics of the module docstring from ``sites.csv``/``tracks.csv`` (pandas) and the truth."""
    from scipy.optimize import linear_sum_assignment
    from scipy.spatial import cKDTree
    from sklearn.metrics import average_precision_score

    tol = 0.5 * nn_px
    aps = []
    present: dict[int, int] = Counter()
    tids_of: dict[int, list[int]] = {}
    frames_of: dict[int, list[int]] = {}
    det_match: dict[int, list[bool]] = {}  # track id -> matched per detection
    det_truth: dict[int, list[int]] = {}
    n_det = n_det_matched = 0
    for k in range(n_frames):
        S = sites[sites["frame"] == k]
        T = truth[truth[:, 0] == k]
        for tid in T[:, 1].astype(int):
            present[tid] += 1
        sxy = S[["x", "y"]].to_numpy(float)
        if len(T) and len(S):
            d, j = cKDTree(sxy).query(T[:, 2:4])
            pos = np.unique(j[d < tol])
            y = np.zeros(len(S), bool)
            y[pos] = True
            if y.any():
                aps.append(float(average_precision_score(y, S["anomaly_score"].to_numpy(float)))
                           * len(pos) / len(T))
            else:
                aps.append(0.0)
        # the tracker's defects: flagged sites and the sites below the cutoff that continue a track
        D = S[S["is_defect"].astype(bool) | (S["track_id"] >= 0 if "track_id" in S else False)]
        dxy = D[["x", "y"]].to_numpy(float)
        dtid = D["track_id"].to_numpy(int) if "track_id" in D else np.full(len(D), -1)
        n_det += len(D)
        matched = np.zeros(len(D), bool)
        mt = np.full(len(D), -1)
        if len(T) and len(D):
            C = np.hypot(*(dxy[None, :, :] - T[:, None, 2:4]).transpose(2, 0, 1))
            C = np.where(C < tol, C, 1e6)
            r, c = linear_sum_assignment(C)
            for a, b in zip(r, c):
                if C[a, b] < 1e6:
                    matched[b] = True
                    tid = int(T[a, 1])
                    mt[b] = tid
                    tids_of.setdefault(tid, []).append(int(dtid[b]))
                    frames_of.setdefault(tid, []).append(k)
        n_det_matched += int(matched.sum())
        for b in range(len(D)):
            if dtid[b] >= 0:
                det_match.setdefault(int(dtid[b]), []).append(bool(matched[b]))
                det_truth.setdefault(int(dtid[b]), []).append(int(mt[b]))
    # following
    elig = [t for t, n in present.items() if n >= 3]
    followed = 0
    lifetimes_ok = 0
    for t in elig:
        ids = [i for i in tids_of.get(t, []) if i >= 0]
        if ids and Counter(ids).most_common(1)[0][1] >= 0.8 * present[t]:
            followed += 1
    extra = [len(set(i for i in ids if i >= 0)) - 1 for t, ids in tids_of.items() if any(i >= 0 for i in ids)]
    # tracks
    n_tracks = len(tracks)
    false = sum(1 for tid in tracks["track_id"].astype(int) if np.mean(det_match.get(int(tid), [False])) < 0.5)
    # hops: true hops of each defect vs the hops of its dominant track
    true_hops = Counter(e["id"] for e in events if e["event"] == "hop")
    first_true = {t: int(truth[truth[:, 1] == t, 0].min()) for t in present}
    last_true = {t: int(truth[truth[:, 1] == t, 0].max()) for t in present}
    hop_ok = hop_n = 0
    tr_by_id = tracks.set_index("track_id") if n_tracks else None
    for t in elig:
        ids = [i for i in tids_of.get(t, []) if i >= 0]
        if not ids:
            continue
        dom = Counter(ids).most_common(1)[0][0]
        row = tr_by_id.loc[dom]
        hop_n += 1
        hop_ok += int(int(row["hops"]) == true_hops.get(t, 0))
        lifetimes_ok += int(int(row["first_frame"]) == first_true[t] and int(row["last_frame"]) == last_true[t])
    return {
        "n_true_defects": len(present), "n_true_seen_3": len(elig), "n_true_hops": int(sum(true_hops.values())),
        "n_tracks": int(n_tracks), "n_detections": int(n_det), "detections_matched": int(n_det_matched),
        "followed": followed / max(len(elig), 1),
        "extra_ids_per_defect": float(np.mean(extra)) if extra else 0.0,
        "false_track_fraction": false / max(n_tracks, 1),
        "ap_mean": float(np.mean(aps)) if aps else 0.0, "ap_min": float(np.min(aps)) if aps else 0.0,
        "hops_exact_fraction": hop_ok / max(hop_n, 1),
        "track_hops_total": int(tracks["hops"].sum()) if n_tracks else 0,
        "lifetime_exact_fraction": lifetimes_ok / max(hop_n, 1),
    }


def relink(work: Path, config):
    """Link the saved ``sites.csv`` of ``work`` (a ``--out`` folder) again: ``(sites, tracks)`` (pandas)."""
    import pandas as pd

    from stemfast.table import SiteTable
    from stemfast.tracking import DefectLinker, TrackSettings

    d = work / "out" / "series"
    sites = pd.read_csv(d / "sites.csv").drop(columns=["track_id"], errors="ignore")
    summ = json.loads((d / "summary.json").read_text())
    drift = {int(m["frame"]): m.get("drift_px") for m in summ["frames"]}
    shape = summ.get("input", {}).get("shape") or [None, None]
    centre = ((float(shape[-1]) - 1) / 2.0, (float(shape[-2]) - 1) / 2.0) if shape[-1] else None
    settings = getattr(config, "tracking", None) or TrackSettings()
    lk = DefectLinker(settings, centre=centre, cutoff=settings.cutoff)
    out = []
    for k, S in sites.groupby("frame", sort=True):
        out += lk.push(int(k), SiteTable({c: S[c].to_numpy() for c in S.columns}), drift=drift.get(int(k)))
    out += lk.finish()
    new = pd.concat([pd.DataFrame(t.columns) for _, t in out], ignore_index=True)
    tracks = pd.DataFrame(lk.tracks_rows, columns=["track_id", "hops", "first_frame", "last_frame"]
                          if not lk.tracks_rows else None)
    return new, tracks


def diagnose(sites, truth: np.ndarray, nn_px: float, events: list | None = None) -> list[str]:
    """Per true defect seen in >= 3 frames and not followed: each frame's site score, flag and track id;
    with ``events`` (the generator's history), also the true events of the defect and of its neighbours
    (within 3.5 column spacings) in the frames where its track id changes (hop offsets in spacings)."""
    from scipy.spatial import cKDTree

    rows: dict[int, list] = {}
    pos: dict[int, dict[int, np.ndarray]] = {}  # true defect -> frame -> position
    ids_at: dict[int, dict[int, int]] = {}  # true defect -> frame -> track id of its site
    for k in np.unique(truth[:, 0]).astype(int):
        S = sites[sites["frame"] == k]
        T = truth[truth[:, 0] == k]
        if not len(S):
            continue
        dist, j = cKDTree(S[["x", "y"]].to_numpy(float)).query(T[:, 2:4])
        for tid, dd, jj, xy in zip(T[:, 1].astype(int), dist, j, T[:, 2:4]):
            s = S.iloc[jj]
            hit = dd < 0.5 * nn_px
            pos.setdefault(tid, {})[k] = xy
            ids_at.setdefault(tid, {})[k] = int(s["track_id"]) if hit else -1
            rows.setdefault(tid, []).append(
                f"f{k}: " + (f"score {s['anomaly_score']:.2f}{' flagged' if s['is_defect'] else ''} track {int(s['track_id'])}"
                             if hit else "no site"))
    lines = []
    for tid, r in sorted(rows.items()):
        ids = [int(x.rsplit(" ", 1)[1]) for x in r if "track" in x]
        ids = [i for i in ids if i >= 0]
        if len(r) < 3 or (ids and Counter(ids).most_common(1)[0][1] >= 0.8 * len(r)):
            continue
        lines.append(f"true defect {tid} ({len(r)} frames) not followed: " + "; ".join(r))
        if events is None:
            continue
        seq = sorted(ids_at[tid].items())
        for (_, a), (k, b) in zip(seq, seq[1:]):
            if a == b:
                continue
            near = []
            for e in events:
                if not k - 1 <= int(e["frame"]) <= k:
                    continue
                at = pos.get(int(e["id"]), {})
                pts = [at.get(int(e["frame"])), at.get(int(e["frame"]) - 1), e.get("from"), e.get("to")]
                pts = [np.asarray(q, float) for q in pts if q is not None]  # a death: the last position
                if not pts or min(np.hypot(*(q - pos[tid][k])) for q in pts) > 3.5 * nn_px:
                    continue
                what = e["event"]
                if "to" in e:
                    d = (np.asarray(e["to"], float) - np.asarray(e["from"], float)) / nn_px
                    what += f" ({d[0]:+.1f}, {d[1]:+.1f})"
                near.append(f"f{int(e['frame'])} #{int(e['id'])} {what}")
            lines.append(f"    id {a} -> {b} at f{k}; true events nearby: " + (", ".join(near) or "none"))
    return lines


def _followed(labels: dict) -> float:
    """Fraction of the true defects seen in >= 3 frames whose labels carry one id in >= 80 % of their frames."""
    elig = [v for v in labels.values() if len(v) >= 3]
    ok = sum(1 for v in elig if Counter(x for x in v if x >= 0).most_common(1)
             and Counter(x for x in v if x >= 0).most_common(1)[0][1] >= 0.8 * len(v))
    return ok / max(len(elig), 1)


def bound(series, seed: int = 0) -> dict:
    """"followed" on perfect detections (the generator's true positions): the linker's (0.3 px jitter)
    and the MAP linking under the generator's own probabilities (per frame one assignment, costs
    -log p: stay, hop to one of 6 neighbours, death, birth; with every position known and memoryless
    dynamics the frame-by-frame MAP is the MAP of the whole history)."""
    import math

    from stemfast.lattice import triangular_basis
    from stemfast.table import SiteTable
    from stemfast.tracking import DefectLinker, TrackSettings

    s, sc = series, DYNAMICS
    tr, n = s.truth, int(s.truth[:, 0].max()) + 1
    rng = np.random.default_rng(seed)  # the jitter
    basis = triangular_basis(s.nn_px, 30.0)
    lk, out = DefectLinker(cutoff=TrackSettings().cutoff), []
    for k in range(n):
        f = tr[tr[:, 0] == k]
        xy = f[:, 2:4] + rng.normal(0, 0.3, (len(f), 2))
        t = SiteTable({"x": xy[:, 0], "y": xy[:, 1], "is_defect": np.ones(len(f), bool),
                       "defect_kind": np.array(["vacancy_S"] * len(f)), "sublattice": np.ones(len(f), np.int64),
                       "anomaly_score": np.full(len(f), 9.0), "true_id": f[:, 1].astype(np.int64),
                       **{c: np.full(len(f), v) for c, v in zip(("a1x", "a1y", "a2x", "a2y"), basis.ravel())}})
        out += lk.push(k, t, drift=None if k == 0 else tuple(s.drift[k] - s.drift[k - 1]))
    out += lk.finish()
    lab: dict = {}
    for _, t in out:
        for i, j in zip(t["true_id"].tolist(), t["track_id"].tolist()):
            lab.setdefault(i, []).append(j)
    cost = {"stay": -math.log(1 - sc["death_prob"] - sc["hop_prob"]), "hop": -math.log(sc["hop_prob"] / 6),
            "death": -math.log(sc["death_prob"]), "birth": -math.log(sc["birth_rate"])}
    return {"followed_perfect_linker": _followed(lab), "followed_perfect_map": _followed(_map_labels(s, cost))}


def _map_labels(s, cost: dict) -> dict:
    """True id -> per-frame labels of the MAP linking of the true positions (see :func:`bound`)."""
    from scipy.optimize import linear_sum_assignment

    a = np.sqrt(3.0) * s.nn_px
    lab: dict = {}
    prev = None
    nxt = 0
    for k in range(int(s.truth[:, 0].max()) + 1):
        f = s.truth[s.truth[:, 0] == k]
        xy = f[:, 2:4] - s.drift[k]
        if prev is None:
            cur, nxt = list(range(len(f))), len(f)
        else:
            pxy, plab = prev
            nt, nd = len(pxy), len(xy)
            C = np.full((nt + nd, nd + nt), 1e6)
            if nt and nd:
                d = np.hypot(*(xy[None] - pxy[:, None]).transpose(2, 0, 1)) / a
                C[:nt, :nd] = np.where(d < 0.3, cost["stay"], np.where(np.abs(d - 1) < 0.3, cost["hop"], 1e6))
            C[np.arange(nt), nd + np.arange(nt)] = cost["death"]
            C[nt + np.arange(nd), np.arange(nd)] = cost["birth"]
            C[nt:, nd:] = 0
            cur = [None] * nd
            for i, j in zip(*linear_sum_assignment(C)):
                if i < nt and j < nd:
                    cur[j] = plab[i]
            for j in range(nd):
                if cur[j] is None:
                    cur[j], nxt = nxt, nxt + 1
        for i, l in zip(f[:, 1].astype(int), cur):
            lab.setdefault(i, []).append(l)
        prev = (xy, cur)
    return lab


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="trained model (default: a tiny one trained on the series)")
    ap.add_argument("--frames", type=int, default=20)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--pixel-size", type=float, default=0.12, help="Angstrom (0.12: the look of the dev data)")
    ap.add_argument("--dose", type=float, default=500.0, help="counts at a Mo column peak (synth default 500)")
    ap.add_argument("--v-s", type=float, default=0.05, help="V_S per S2 column in the first frame")
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--scheduler", default=None)
    ap.add_argument("--frames-per-task", type=int, default=8)
    ap.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--json", default=None, help="write the metrics here")
    ap.add_argument("--relink", default=None, metavar="DIR",
                    help="link the sites of a run kept with --out DIR again (no detection, no batch)")
    ap.add_argument("--diagnose", action="store_true", help="print every true defect that is not followed")
    ap.add_argument("--bound", type=int, default=0, metavar="N",
                    help="no detection: 'followed' on perfect detections (the linker's and the MAP linking's) "
                         "for N seeds from --seed on, then exit")
    args = ap.parse_args(argv)
    if args.bound:
        return _run_bound(args)

    import pandas as pd

    from stemfast.batch import run_batch
    from stemfast.config import load_config
    from stemfast.synthetic import load_series_truth

    config = load_config(None, TINY)
    if args.relink:
        work = Path(args.relink)
        t0 = time.perf_counter()
        sites, tracks = relink(work, config)
        truth, _drift, meta = load_series_truth(work / "series.series.npz")
        n_frames = int(sites["frame"].max()) + 1
        res = evaluate(sites, tracks, truth, meta["events"], meta["nn_px"], n_frames)
        res.update({"relinked": str(work), "frames": n_frames, "link_s": round(time.perf_counter() - t0, 1)})
        return _report(res, args, sites=sites, truth=truth, nn_px=meta["nn_px"], events=meta["events"])
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="track_eval_"))
    t0 = time.perf_counter()
    make_data(work / "data", frames=args.frames, size=args.size, seed=args.seed, pixel_size_A=args.pixel_size,
              dose=args.dose, v_s=args.v_s)
    t_gen = time.perf_counter() - t0
    t0 = time.perf_counter()
    rep = run_batch(work / "data", work / "out", config=config, model_path=args.model, scheduler=args.scheduler,
                    frames_per_task=args.frames_per_task, show_progress=False, force=True)
    t_batch = time.perf_counter() - t0
    d = work / "out" / "series"
    sites = pd.read_csv(d / "sites.csv")
    tracks = pd.read_csv(d / "tracks.csv")
    truth, _drift, meta = load_series_truth(work / "series.series.npz")
    res = evaluate(sites, tracks, truth, meta["events"], meta["nn_px"], args.frames)
    summ = json.loads((d / "summary.json").read_text())
    res.update({"frames": args.frames, "size": args.size, "seed": args.seed, "pixel_size_A": args.pixel_size,
                "dose": args.dose, "scheduler": args.scheduler,
                "generate_s": round(t_gen, 1), "batch_s": round(t_batch, 1), "status": rep.results[0].status,
                "tracking_summary": {k: summ["tracking"][k] for k in ("n_tracks", "n_hops", "n_unconfirmed",
                                                                       "link_residual_px_median")},
                "work": str(work)})
    return _report(res, args, sites=sites, truth=truth, nn_px=meta["nn_px"], events=meta["events"])


def _run_bound(args) -> int:
    """``--bound N``: print the perfect-detection "followed" of N series (seeds from ``--seed``)."""
    import tempfile as _tf

    from stemfast.synthetic import load_series_truth

    rows = []
    for seed in range(args.seed, args.seed + args.bound):
        with _tf.TemporaryDirectory() as d:
            s = make_data(Path(d) / "data", frames=args.frames, size=args.size, seed=seed,
                          pixel_size_A=args.pixel_size, dose=args.dose, v_s=args.v_s)
        r = bound(s, seed)
        rows.append(r)
        print(json.dumps({"seed": seed, **{k: round(v, 4) for k, v in r.items()}}))
    for k in rows[0]:
        v = np.array([r[k] for r in rows])
        print(f"{k}: mean {v.mean():.3f}, worst {v.min():.3f}, below 0.9 in {int((v < 0.9).sum())} of {len(v)}")
    return 0


def _report(res: dict, args, *, sites, truth, nn_px, events=None) -> int:
    ok = True
    for k, (op, v) in TARGETS.items():
        good = res[k] >= v if op == ">=" else res[k] <= v
        ok &= good
        res.setdefault("targets", {})[k] = f"{res[k]:.3f} {op} {v}: {'ok' if good else 'MISSED'}"
    print(json.dumps(res, indent=1))
    if args.diagnose:
        print("\n".join(diagnose(sites, truth, nn_px, events)) or "every true defect seen in >= 3 frames is followed")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))
    sys.exit(main())
