"""Train the default model shipped with stemfast (one command, seeded, ~5-10 min on 2 cores).

::

    PYTHONPATH=python python -m stemfast.model.train_default            # writes the package data
    PYTHONPATH=python python -m stemfast.model.train_default -o /tmp/m  # somewhere else

Training data: synthetic 2H monolayers rendered by :func:`stemfast.synthetic.make_mos2` -- MoS2, WS2,
MoSe2 and WSe2 (lattice constant and Z-contrast of each), site spacing 5-25 px (log-uniform),
random orientation, dose 20-3000 counts per metal column, probe (column) width, Z-contrast
exponent, read noise, film background and texture, contamination, holes, scan glitches, hot
pixels, strain, scan distortion and defect rates drawn per image (:func:`draw_image_settings`
lists the ranges). Every image goes through :func:`stemfast.frontend.prepare` -- the patch path
of inference, site finding included -- and contributes up to ``--patches-per-image`` non-edge
patches, so each magnification weighs the same. One :class:`~stemfast.model.RVAE` is trained on
the pool with the default :class:`~stemfast.model.RVAEConfig` (patches are cut relative to each
image's spacing, so the model stores no fixed patch size).

Outputs: ``default_rvae.pt`` (the model; ``extra`` holds the name / version tag, the input
contract of :mod:`stemfast.model.shipped` and the training settings), ``default_rvae.npz`` (the same
weights as plain arrays, for the compiled engine) and ``default_rvae.json`` (the manifest: name,
version, SHA-256s, sizes, training summary, the stemfast version and git commit that trained it).

What is reproducible: the command is seeded, and two runs of the same code give the same weights
(``arrays.sha256`` of the manifest); the ``.pt`` and the manifest also record the run's timings, so
their bytes differ. The shipped file (model 1.2) was trained by the code of commit 771f999
(2026-12-02). Site finding and the synthetic generator have changed since, so today's code renders a
slightly different training set and gives close, not identical, weights (round 44 of
docs/RESULTS.md: best validation loss 5.75 against 5.99; on two synthetic test images classes ARI
1.0 / 0.9965 and the same flagged sites as the shipped file). Retraining with today's code makes a
new model: give it its own version before shipping it.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import sys
import time
import warnings
from dataclasses import asdict, fields, replace
from pathlib import Path

import numpy as np

from .. import __version__
from . import shipped

__all__ = ["MODEL_NAME", "MODEL_VERSION", "MATERIAL_Z", "draw_image_settings", "render_training_patches",
           "train_default_model", "main"]

log = logging.getLogger("stemfast.model.train_default")

MODEL_NAME = "stemfast-2h-rvae"
#: version tag of the shipped model; bump when the training recipe (data, ranges, settings) changes
MODEL_VERSION = "1.2"  # 1.2: input_size 24 (1.1: 32)
#: (metal Z, chalcogen Z, lattice constant in Angstrom) of the four 2H monolayers
MATERIAL_Z = {"mos2": (42, 16, 3.160), "ws2": (74, 16, 3.153), "mose2": (42, 34, 3.288), "wse2": (74, 34, 3.282)}


#: an image whose spacing the front end finds off by more than this fraction is left out of training
SPACING_TOLERANCE = 0.1


def _loguniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def draw_image_settings(rng: np.random.Generator, index: int, *, spacing_range=(5.0, 25.0)) -> dict:
    """Random settings of one training image: material, Z exponent and ``SynthConfig`` fields.

    Ranges (per image): material uniform over MoS2 / WS2 / MoSe2 / WSe2; site spacing log-uniform
    in ``spacing_range`` px; rotation uniform; column sigma 0.22-0.55 A; Z exponent 1.5-1.9; dose
    20-3000 counts (log-uniform); read noise 0-6 %; background 0-0.6, texture 0-0.06 of the metal
    peak; contamination 0-3 patches (half the images), holes 0-1, scan glitches 0-4, hot pixels
    0-12; strain and scan distortion up to ~2-3 %; defect rates 0.5-3x the defaults.
    """
    material = ("mos2", "ws2", "mose2", "wse2")[index % 4]
    zm, zx, a = MATERIAL_Z[material]
    nn = _loguniform(rng, *spacing_range)
    pixel_size_A = a / math.sqrt(3.0) / nn
    side = int(np.clip(round(26 * nn), 192, 512))
    base_rates = np.array([0.03, 0.01, 0.005, 0.005])
    cfg = {
        "shape": (side, side), "pixel_size_A": pixel_size_A, "a_A": a,
        "rotation_deg": float(rng.uniform(0, 360)),
        "strain": tuple(float(v) for v in rng.normal(0.0, 0.01, 3)),
        "scan_distortion": (float(rng.uniform(-0.03, 0.03)), float(rng.uniform(-0.03, 0.03))),
        "rates": tuple(float(v) for v in base_rates * rng.uniform(0.5, 3.0)),
        "column_sigma_A": float(rng.uniform(0.22, 0.55)),
        "position_jitter_A": float(rng.uniform(0.01, 0.06)),
        "dose": _loguniform(rng, 20.0, 3000.0),
        "gaussian_noise": float(rng.uniform(0.0, 6.0)),
        "background": float(rng.uniform(0.0, 0.6)),
        "texture": float(rng.uniform(0.0, 0.06)),
        "contamination": int(rng.integers(0, 4)) if rng.random() < 0.5 else 0,
        "contamination_level": float(rng.uniform(0.2, 0.9)),
        "holes": int(rng.random() < 0.2),
        "scan_glitches": int(rng.integers(0, 5)) if rng.random() < 0.4 else 0,
        "hot_pixels": int(rng.integers(0, 13)) if rng.random() < 0.3 else 0,
        "seed": int(rng.integers(0, 2**31 - 1)),
    }
    return {"material": material, "z_metal": zm, "z_chalcogen": zx, "z_exponent": float(rng.uniform(1.5, 1.9)),
            "nn_px": nn, "synth": cfg}


@contextlib.contextmanager
def _contrast(z_metal: int, z_chalcogen: int, z_exponent: float):
    """Render with another material's Z contrast.

    :func:`stemfast.synthetic.make_mos2` reads the module constants ``Z_MO``, ``Z_S`` and
    ``Z_EXPONENT`` when it computes column amplitudes; they are set for the block and restored.
    (When ``SynthConfig`` grows material / contrast fields, use those instead.)
    """
    from ..synthetic import image as synth

    saved = (synth.Z_MO, synth.Z_S, synth.Z_EXPONENT)
    synth.Z_MO, synth.Z_S, synth.Z_EXPONENT = z_metal, z_chalcogen, z_exponent
    try:
        yield
    finally:
        synth.Z_MO, synth.Z_S, synth.Z_EXPONENT = saved


def render_training_patches(n_images: int, *, seed: int = 0, patches_per_image: int = 500, config=None,
                            spacing_range=(5.0, 25.0)) -> tuple[np.ndarray, list[dict]]:
    """Render ``n_images`` synthetic images and cut their patches with :func:`stemfast.frontend.prepare`.

    Returns the pooled float32 patches ``[N, S, S]`` (S = the model's input size) and one record per
    image (settings, sites found, patches used, spacing found).
    """
    from ..config import PipelineConfig
    from ..frontend import prepare
    from ..synthetic import SynthConfig, make_mos2

    config = config or PipelineConfig()
    rng = np.random.default_rng(seed)
    pools, records = [], []
    names = {f.name for f in fields(SynthConfig)}
    for i in range(n_images):
        s = draw_image_settings(rng, i, spacing_range=spacing_range)
        cfg = SynthConfig(**{k: v for k, v in s["synth"].items() if k in names})
        with _contrast(s["z_metal"], s["z_chalcogen"], s["z_exponent"]):
            img = make_mos2(cfg).image
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                prep = prepare(img, config=config)
            except ValueError as exc:
                log.info("image %d (%s, %.1f px) left out: %s", i, s["material"], s["nn_px"], exc)
                records.append({**s, "n_sites": 0, "n_used": 0, "error": str(exc)})
                continue
        found = float(prep.sites.meta.get("spacing_px") or np.nan)
        if not abs(found / s["nn_px"] - 1.0) <= SPACING_TOLERANCE:
            # the front end misread this image's lattice (e.g. the metal lattice of WS2, whose S2
            # columns are faint): its patches are not what the model should learn normal sites from
            log.info("image %d (%s, %.1f px) left out: spacing found %.2f px", i, s["material"], s["nn_px"], found)
            records.append({**s, "n_sites": int(len(prep.sites)), "n_used": 0, "spacing_found_px": found,
                            "error": "spacing misread"})
            continue
        good = np.flatnonzero(~np.asarray(prep.edge, bool))
        sub = np.random.default_rng([seed, i])
        if len(good) > patches_per_image:
            good = np.sort(sub.choice(good, patches_per_image, replace=False))
        if len(good):
            pools.append(np.ascontiguousarray(np.asarray(prep.patches[good], np.float32)))
        records.append({**s, "n_sites": int(len(prep.sites)), "n_used": int(len(good)),
                        "spacing_found_px": prep.sites.meta.get("spacing_px"), "patch_size": prep.patch_size})
        log.info("image %d/%d: %s, spacing %.1f px (found %s), %d sites, %d patches used", i + 1, n_images,
                 s["material"], s["nn_px"], prep.sites.meta.get("spacing_px"), len(prep.sites), len(good))
    if not pools:
        raise RuntimeError("no training patches: no synthetic image gave a lattice")
    return np.concatenate(pools), records


def _git_commit() -> str | None:
    """The commit of the stemfast checkout this module runs from (None outside a git checkout)."""
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True,
                             timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


#: defaults of the shipped model's recipe (the module docs say what the command reproduces)
DEFAULT_IMAGES = 48
DEFAULT_PATCHES_PER_IMAGE = 300
DEFAULT_EPOCHS = 15
DEFAULT_STN_EPOCHS = 6


def train_default_model(out_dir: str | Path = shipped.DATA_DIR, *, n_images: int = DEFAULT_IMAGES, seed: int = 0,
                        patches_per_image: int = DEFAULT_PATCHES_PER_IMAGE, epochs: int = DEFAULT_EPOCHS,
                        stn_epochs: int = DEFAULT_STN_EPOCHS, model_config=None) -> dict:
    """Render the training set, train the model, write ``default_rvae.pt`` + ``default_rvae.json``.

    Returns the manifest.
    """
    import torch

    from ..config import PipelineConfig
    from .api import RVAE
    from .training import RVAEConfig

    t0 = time.perf_counter()
    mcfg = model_config or RVAEConfig()
    over = {"seed": seed, "max_train_patches": None, "progress": False, "epochs": int(epochs),
            "stn_epochs": int(stn_epochs)}
    mcfg = replace(mcfg, **over)
    pcfg = PipelineConfig(model=mcfg)
    patches, records = render_training_patches(n_images, seed=seed, patches_per_image=patches_per_image,
                                               config=pcfg)
    t_data = time.perf_counter() - t0
    log.info("training set: %d patches from %d images in %.1f s", len(patches), n_images, t_data)
    t1 = time.perf_counter()
    model = RVAE.fit(patches, mcfg)
    t_fit = time.perf_counter() - t1
    model.extra.pop("patch_size", None)  # patches are cut per image from its spacing
    contract = shipped.input_contract(mcfg.input_size)
    spacings = [r["nn_px"] for r in records if r.get("n_used")]
    left_out = [{"index": j, "material": r["material"], "nn_px": round(r["nn_px"], 2), "reason": r.get("error")}
                for j, r in enumerate(records) if not r.get("n_used")]
    training = {"script": "python -m stemfast.model.train_default", "seed": seed, "n_images": n_images,
                "patches_per_image": patches_per_image, "n_patches": int(len(patches)),
                "materials": sorted({r["material"] for r in records}),
                "spacing_px_range": [float(min(spacings)), float(max(spacings))] if spacings else None,
                "images_used": n_images - len(left_out), "images_left_out": left_out,
                "torch_threads": torch.get_num_threads(), "data_seconds": round(t_data, 1), "fit_seconds": round(t_fit, 1),
                "torch_version": str(torch.__version__), "stemfast_version": __version__,
                "git_commit": _git_commit(),
                "stn_epochs_run": len(model.history.get("stn", {}).get("train", [])),
                "vae_epochs_run": len(model.history.get("vae", {}).get("train", [])),
                "best_val": float(min(model.history["vae"]["val"])) if model.history.get("vae") else None}
    model.extra.update({"shipped": {"name": MODEL_NAME, "version": MODEL_VERSION}, "contract": contract,
                        "training": training, "norm": {"kind": "per-image PatchNorm.from_image"}})
    model.history = {}  # the training curves are in the manifest's summary; keep the wheel small
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = model.save(out_dir / shipped.MODEL_PATH.name)
    arrays = shipped.write_arrays({k: v.detach().cpu().numpy() for k, v in model.network.state_dict().items()},
                                  out_dir / shipped.ARRAYS_PATH.name)
    man = {"name": MODEL_NAME, "version": MODEL_VERSION, "file": path.name, "sha256": shipped._sha256(path),
           "bytes": path.stat().st_size, "arrays": arrays, "config": json.loads(json.dumps(asdict(mcfg), default=str)),
           "contract": contract, "training": training}
    from ..atomic import write_json

    write_json(out_dir / shipped.MANIFEST_PATH.name, man)
    log.info("wrote %s (%d bytes, sha256 %s) in %.1f s", path, man["bytes"], man["sha256"][:12],
             time.perf_counter() - t0)
    return man


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m stemfast.model.train_default",
                                 description="Train the default model shipped with stemfast on synthetic 2H "
                                             "monolayers (seeded: the same code gives the same weights; the module "
                                             "docs say how the shipped file was made).")
    ap.add_argument("-o", "--output", default=str(shipped.DATA_DIR),
                    help=f"folder for default_rvae.pt / .npz / .json (default: the package data, {shipped.DATA_DIR})")
    ap.add_argument("--images", type=int, default=DEFAULT_IMAGES, help=f"synthetic images (default {DEFAULT_IMAGES})")
    ap.add_argument("--patches-per-image", type=int, default=DEFAULT_PATCHES_PER_IMAGE,
                    help=f"patches used per image (default {DEFAULT_PATCHES_PER_IMAGE})")
    ap.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help=f"maximal VAE epochs (default {DEFAULT_EPOCHS})")
    ap.add_argument("--stn-epochs", type=int, default=DEFAULT_STN_EPOCHS,
                    help=f"maximal STN pretraining epochs (default {DEFAULT_STN_EPOCHS})")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's; 1 is faster on a machine busy with other work)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-v", "--verbose", action="count", default=1)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose > 1 else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    man = train_default_model(args.output, n_images=args.images, seed=args.seed,
                              patches_per_image=args.patches_per_image, epochs=args.epochs,
                              stn_epochs=args.stn_epochs)
    print(json.dumps({k: man[k] for k in ("name", "version", "sha256", "bytes", "training")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
