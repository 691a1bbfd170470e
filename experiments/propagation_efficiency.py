"""One mark, many images, end to end in the simulation (docs/propagation.md, efficiency).

A simulated clinician marks the artifact by hand on k images of the feedback pool (k = 1, 5,
25; a seeded choice among the pool's artifact images), ``feedbackcam propagate``'s concept
scorer (on the model's own explanation layer, as ``propagate --model`` runs) chooses the images
and where, a pixel model (colour and local texture by default, ``--outline-features``) outlines
the artifact there (``--scorer outlined``), proposing a mask
on every other image, and a reviewer accepts the proposals that overlap the true artifact (IoU >=
0.5 with it; a proposal on an image without the artifact is rejected). The model is fine-tuned
with the project's default objective (``FeedbackConfig()``: Jaccard + surroundings on the keep
masks, invariance_balanced on the ignore masks, lambda 0.9) on the pool with the hand masks and
the accepted *proposed* masks, and compared with the same fine-tuning on every true mask (the
full-mask gain) and on the k hand masks alone.

Clicks: one per hand mark, one "accept all above the threshold", one per rejected proposal
(the app's review screen).

    python experiments/propagation_efficiency.py --confounders patch --seeds 0 1 2 \\
        --json docs/propagation/efficiency_patch.json
    python experiments/propagation_efficiency.py --confounders ruler --seeds 0 1 2 3 4 --ks 5 \\
        --outline-features colour appearance --tune-seeds 0 1 2 --threads 2 \\
        --json docs/propagation/efficiency_outline_ruler.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from feedbackcam.fileio import write_json
from feedbackcam.propagate import (
    DEFAULT_THRESHOLD,
    LITE0_EXPAND_AT,
    LITE0_THRESHOLD,
    MAX_MARKS,
    OUTLINE_FEATURES,
    iou,
    offline_features,
    review_rounds,
)
from feedbackcam.self_explaining import layer_activations
from feedbackcam.shortcuts.bench import EpochChoice, baseline, evaluate_row, fine_tune
from feedbackcam.shortcuts.config import BenchConfig
from feedbackcam.shortcuts.data import isic_data, synth_data

METHOD = "jaccard+surroundings+invariance_balanced"  # FeedbackConfig()'s terms
LAM = 0.9
ACCEPT_IOU = 0.5
KS = (1, 5, 25)
KEYS = ("flip_rate", "acc", "acc_clean", "avg_sens")
OFFLINE_SIZE = 256  # the offline network's side (the app's, where its threshold was chosen)


def _scores(row: dict) -> dict:
    return {k: row[k] for k in KEYS}


def _propagated(
    images, features, true, has, hand, outline, threshold, expand_at, rounds, seed, chains=1
):
    """A simulated clinician's review (:func:`propagate.review_rounds`, the app's "Find more like
    these") from the hand marks ``hand`` (pool indices): the reviewer accepts a proposal with IoU
    >= 0.5 with the true artifact. ``chains`` > 1: after a round whose proposals carried the
    artifact but none was accepted (found, outlined wrong), the clinician paints the surest of
    them by hand and starts a new chain from it."""
    ious = []

    def accept(i, m) -> bool:
        overlap = iou(m, true[i]) if has[i] else 0.0
        if has[i]:
            ious.append(overlap)
        return overlap >= ACCEPT_IOU

    def paint(proposed):
        found = [i for i in proposed if has[i]]
        return (found[0], true[found[0]]) if found else None

    review = review_rounds(
        features, images, {int(i): true[i] for i in hand}, accept, threshold=threshold,
        expand_at=expand_at, rounds=rounds, seed=seed, outline=outline, paint=paint,
        chains=chains,
    )  # fmt: skip
    per_round = review.per_round(has, "with_artifact", chain=True)
    proposed = sum(p["proposed"] for p in per_round)
    accepted = review.accepted
    marked = len(hand) + len(review.painted) + len(accepted)
    return {
        "rounds": per_round,
        "chains": review.rounds[-1][0] + 1,
        "painted": review.painted,
        "proposed": proposed,
        "proposed_with_artifact": sum(p.get("with_artifact", 0) for p in per_round),
        "accepted": len(accepted),
        "rejected": proposed - len(accepted),
        "mean_iou_proposed_with_artifact": float(np.mean(ious)) if ious else None,
        "marked": marked,
        "recall_of_artifact_images": marked / int(has.sum()),
        "clicks": review.clicks,
        "accepted_masks": accepted,
    }


def run(
    confounder: str,
    seed: int,
    cache: Path,
    ks,
    hand_only,
    outlines=(OUTLINE_FEATURES,),
    tune_seeds=None,
    concept_on: str = "own",
    full_from: Path | None = None,
    rounds: int = 1,
    isic_root: str | None = None,
    tune: bool = True,
    chains: int = 1,
    select_epoch: bool = False,
    class_weighted: bool = False,
) -> list[dict]:
    """The rows of one data seed. ``tune_seeds``: fine-tune every configuration once per seed
    (default: the data seed alone) and report the means, each seed's scores beside them.
    ``concept_on``: ``"own"``, the baseline's explanation layer (``propagate --model``); or
    ``"offline"``, the offline ImageNet EfficientNet-Lite0 on the images enlarged to 256 px
    (nearest neighbour, as the app's ``serve --propose-with offline`` reads them), with that
    network's threshold and query expansion. ``full_from``: the all-true-masks row of this
    confounder and data seed read from that earlier output (run with the same fine-tuning seeds;
    fine-tuning on this CPU is deterministic) instead of fine-tuned again. ``rounds``: at most
    this many rounds of review (:func:`_propagated`). ``confounder`` ``"bandaid"``: the
    benchmark's ISIC 2017 with pasted band-aids (``isic-bandaid``, from ``isic_root``) instead of
    SynthDerm. ``tune=False``: the proposals and the review alone (offline concept only; no
    model is trained or fine-tuned). ``chains``: see :func:`_propagated`. ``select_epoch``: every
    fine-tuning keeps the epoch the per-class guard chooses (``simulate``'s rule,
    :class:`~feedbackcam.shortcuts.bench.EpochChoice`) instead of its last. ``class_weighted``:
    its cross-entropies weighted by the pool's inverse class frequencies, as ``simulate``
    fine-tunes by default."""
    tune_seeds = [seed] if tune_seeds is None else list(tune_seeds)
    if confounder == "bandaid":
        cfg = BenchConfig(datasets=("isic-bandaid",), isic_root=isic_root)
        sched = cfg.isic
        d = isic_data(seed, cfg, cache / "isic")
    else:
        cfg = BenchConfig()
        sched = cfg.synth
        d = synth_data(seed, confounder, cfg.synth_n)
    pool = d.pool
    n = len(pool)
    true = pool.ignore
    has = true.reshape(n, -1).any(1)
    common = {"confounder": confounder, "seed": seed, "pool": n, "with_artifact": int(has.sum())}
    if not tune and concept_on != "offline":
        raise SystemExit("--no-tune needs --concept offline (the own layer is the baseline's)")
    base = baseline(cache / f"base_{confounder}_{seed}.pt", d, sched, seed) if tune else None
    rows = [{**common, "run": "baseline", **_scores(evaluate_row(base, d))}] if tune else []

    def tuned(ignore: np.ndarray) -> dict:
        given = ignore.reshape(n, -1).any(1)
        data = replace(pool, ignore=ignore.astype(np.uint8), has_ignore=given)
        started = time.perf_counter()
        each, epochs = [], []
        for s in tune_seeds:
            choice = EpochChoice(d.val, cfg.acc_tolerance) if select_epoch else None
            model, _ = fine_tune(
                base, data, sched, METHOD, LAM, s, choice=choice, class_weighted=class_weighted
            )
            each.append(_scores(evaluate_row(model, d)))
            epochs.append({"epoch": choice.epoch, "epochs": choice.history} if choice else {})
        mean = {k: float(np.mean([e[k] for e in each])) for k in KEYS}
        seconds = round((time.perf_counter() - started) / len(tune_seeds))
        extra = {"tune_seeds": tune_seeds, "per_tune_seed": each} if len(each) > 1 else {}
        chosen = {"chosen": epochs} if select_epoch else {}
        weighted = {"weighted": True} if class_weighted else {}
        return {**mean, "seconds": seconds, **extra, **chosen, **weighted}

    if tune and full_from is None:
        rows.append({**common, "run": "full", "marked": int(has.sum()), **tuned(true)})
    elif tune:
        full = [
            r
            for r in json.loads(full_from.read_text())["rows"]
            if r["run"] == "full" and (r["confounder"], r["seed"]) == (confounder, seed)
        ]
        if not full:
            raise SystemExit(f"{full_from}: no full-mask row for {confounder} seed {seed}")
        if full[0].get("tune_seeds", [seed]) != tune_seeds:
            raise SystemExit(f"{full_from}: its full-mask row used other fine-tuning seeds")
        how = ("chosen" in full[0], full[0].get("weighted", False))
        if how != (select_epoch, class_weighted):
            raise SystemExit(f"{full_from}: its full-mask row was fine-tuned otherwise")
        rows.append({**full[0], "read_from": str(full_from)})
    if rows:
        print(json.dumps(rows[-1]), flush=True)
    threshold, expand_at = DEFAULT_THRESHOLD, None
    if concept_on == "offline":
        factor = OFFLINE_SIZE // pool.size
        big = np.repeat(np.repeat(pool.images, factor, 1), factor, 2)
        features = offline_features(big, cache / f"offline_{confounder}_{seed}.pt")
        threshold, expand_at = LITE0_THRESHOLD, LITE0_EXPAND_AT
    else:
        features = layer_activations(base, pool.images)
    order = np.random.default_rng([seed, 19]).permutation(np.flatnonzero(has))
    for k in ks:
        hand = order[:k]
        for outline in outlines:
            row = _propagated(
                pool.images, features, true, has, hand, outline, threshold, expand_at, rounds,
                seed, chains,
            )  # fmt: skip
            ignore = np.zeros_like(true)
            ignore[hand] = true[hand]
            ignore[row["painted"]] = true[row["painted"]]
            for i, m in row.pop("accepted_masks").items():
                ignore[i] = m
            scores = tuned(ignore) if tune else {}
            row = {**common, "run": "propagated", "k": k, "outline": outline,
                   "concept_on": concept_on, **row, **scores}  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
        if k in hand_only and tune:
            only = np.zeros_like(true)
            only[hand] = true[hand]
            rows.append({**common, "run": "hand only", "k": k, "marked": k, "clicks": k,
                         **tuned(only)})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    if not tune:
        return rows
    base_flip, full_flip = rows[0]["flip_rate"], rows[1]["flip_rate"]
    base_acc, full_acc = rows[0]["acc"], rows[1]["acc"]
    for r in rows[2:]:  # None where the full masks gained nothing (no share of it to take)
        r["flip_gain_share"] = _share(base_flip - r["flip_rate"], base_flip - full_flip)
        r["acc_gain_share"] = _share(r["acc"] - base_acc, full_acc - base_acc)
    return rows


def _share(gain: float, full: float) -> float | None:
    return gain / full if full > 0 else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--cache", type=Path, default=Path("/tmp/discovery"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument(
        "--confounders",
        nargs="+",
        default=["patch", "ruler"],
        choices=["patch", "ruler", "bandaid"],
        help="SynthDerm's patch and ruler; bandaid: ISIC 2017 with pasted band-aids (--isic-root)",
    )
    p.add_argument("--isic-root", default=None, help="ISIC 2017 folder (for bandaid)")
    p.add_argument("--ks", type=int, nargs="+", default=list(KS))
    p.add_argument("--hand-only", type=int, nargs="*", default=[5])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--outline-features",
        nargs="+",
        default=[OUTLINE_FEATURES],
        choices=["colour", "appearance"],
        help="what the proposals are outlined with (propagate.pixel_features); several: a run "
        "each on the same proposals",
    )
    p.add_argument(
        "--concept",
        choices=["own", "offline"],
        default="own",
        help="the concept scorer's activations: the baseline's explanation layer, or the offline "
        "ImageNet EfficientNet-Lite0 at 256 px with its threshold and expansion",
    )
    p.add_argument(
        "--full-from",
        type=Path,
        default=None,
        help="read the all-true-masks rows from this earlier output instead of fine-tuning again",
    )
    p.add_argument(
        "--tune-seeds",
        type=int,
        nargs="+",
        default=None,
        help="fine-tune each configuration once per seed and report the means (default: the "
        "data seed once)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="at most this many rounds of review, each fitted on the hand marks and the newest "
        "accepted proposals ('Find more like these'); the clinician stops after a round that "
        "accepts nothing",
    )
    p.add_argument(
        "--chains",
        type=int,
        default=1,
        help="at most this many chains: after a round that found the artifact but outlined it "
        "wrong, the clinician paints one of those by hand and starts again from it",
    )
    p.add_argument(
        "--no-tune",
        action="store_true",
        help="the proposals and the review alone: no model trained or fine-tuned (--concept "
        "offline)",
    )
    p.add_argument(
        "--select-epoch",
        action="store_true",
        help="keep the epoch the per-class guard chooses, as simulate does (default: the last)",
    )
    p.add_argument(
        "--class-weighted",
        action="store_true",
        help="weight the fine-tuning's cross-entropies by the pool's inverse class frequencies, "
        "as simulate does (default: the data set's schedule)",
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    args.cache.mkdir(parents=True, exist_ok=True)
    rows = []
    for confounder in args.confounders:
        for seed in args.seeds:
            rows += run(
                confounder,
                seed,
                args.cache,
                args.ks,
                set(args.hand_only),
                args.outline_features,
                args.tune_seeds,
                args.concept,
                args.full_from,
                args.rounds,
                args.isic_root,
                not args.no_tune,
                args.chains,
                args.select_epoch,
                args.class_weighted,
            )
            meta = {
                "rows": rows,
                "method": METHOD,
                "lam": LAM,
                "accept_iou": ACCEPT_IOU,
                "threshold": DEFAULT_THRESHOLD if args.concept == "own" else LITE0_THRESHOLD,
                "concept": args.concept,
                "scorer": "outlined",
                "outline_features": args.outline_features,
                "tune_seeds": args.tune_seeds,
                "rounds": args.rounds,
                "chains": args.chains,
                "epoch": "chosen by the per-class guard" if args.select_epoch else "last",
                "class_weighted": args.class_weighted,
                "max_marks": MAX_MARKS,
                "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                f"{torch.get_num_threads()} torch thread(s)",
            }
            write_json(args.json, meta)


if __name__ == "__main__":
    main()
