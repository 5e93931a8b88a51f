"""Nearest-neighbour video retrieval (spec 10): `iicrepro retrieve`.

Protocol. The gallery is the train subset and the queries the test subset of the manifest split
``retrieval.split`` of one dataset (HMDB51 is queried with the UCF101-pretrained model, spec 2.3).
Each video gives ``clips.eval_clips`` centre-cropped clips (spec 10.2); a clip's feature is the
conv5 map max-pooled and flattened (``retrieval.features: conv``, spec 10.3) or the pooled 512-d
vector (``pool``); a video's feature is the plain mean of its clip features (spec 10.4). Modalities:
``rgb`` (the RGB clip), the view alone (residual in its retrieval scaling (x_t - x_{t-1} + 1)/2, or
flow u / v) and ``joint`` = the concatenation [rgb, view] of raw features (upstream ``--merge``,
spec 12), plus ``joint_l2``, the same with each part L2-normalised first. Distance is cosine; a
query is a hit at k if its class is among those of its k nearest gallery videos (spec 10.6). Ties
in distance keep gallery order (stable sort); k beyond the gallery size uses the whole gallery.

Every video that decodes counts. Upstream's ``drop_last=True`` silently dropped the last partial
batch of videos (spec 10.2, 14.15); ``retrieval.drop_last: true`` reproduces that as a named option.

Outputs in the retrieval folder: ``metrics.json`` ({"rows": [{modality, metric, value}], counts,
checkpoint, bn, provenance, ...}), ``topk.csv`` (long form) and ``features/*.npz``, a cache keyed by
the checkpoint's sha256 and every setting that changes features, so re-evaluation is cheap.

Random-init baselines (synthetic recipe): ``--bn recalibrate`` recomputes BatchNorm running
statistics in one pass over training clips of both modalities (weights untouched) before
evaluating; the default ``as-initialised`` uses the checkpoint as it is.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from iicrepro import io, layout, steps, track
from iicrepro.errors import UserError

VIEWS = ("rgb", "residual", "u", "v")
BN_MODES = ("as-initialised", "recalibrate")
RECALIBRATION_SEED = 0  # clip starts and crops of the one BN recalibration pass


# --------------------------------------------------------------------------- metric


def _to_numpy(x, dtype) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length; all-zero rows stay zero (cosine similarity 0 to everything)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms == 0, 1.0, norms)


def topk_accuracy(
    query_feats, query_labels, gallery_feats, gallery_labels, ks, *, chunk: int = 1024
) -> dict[int, float]:
    """Top-k retrieval accuracy (%) for every k in `ks` under cosine distance (spec 10.5-10.6).

    Gallery videos at equal distance keep their gallery order (stable sort), so results do not
    depend on the sort algorithm; k larger than the gallery is clipped to the gallery size.
    """
    q = l2_normalize(_to_numpy(query_feats, np.float64))
    g = l2_normalize(_to_numpy(gallery_feats, np.float64))
    ql = _to_numpy(query_labels, np.int64).reshape(-1)
    gl = _to_numpy(gallery_labels, np.int64).reshape(-1)
    if q.ndim != 2 or g.ndim != 2 or q.shape[1] != g.shape[1]:
        raise ValueError(f"feature shapes do not match: queries {q.shape}, gallery {g.shape}")
    if len(q) != len(ql) or len(g) != len(gl):
        raise ValueError("each feature row needs exactly one label")
    if len(q) == 0 or len(g) == 0:
        raise ValueError("retrieval needs at least one query and one gallery video")
    ks = [int(k) for k in ks]
    if min(ks) < 1:
        raise ValueError(f"k must be >= 1, got {ks}")
    depth = min(max(ks), len(g))
    hits = dict.fromkeys(ks, 0)
    for start in range(0, len(q), chunk):
        dist = 1.0 - q[start : start + chunk] @ g.T
        order = np.argsort(dist, axis=1, kind="stable")[:, :depth]
        found = np.logical_or.accumulate(gl[order] == ql[start : start + chunk, None], axis=1)
        for k in ks:
            hits[k] += int(found[:, min(k, depth) - 1].sum())
    return {k: 100.0 * hits[k] / len(q) for k in ks}


def joint(rgb: np.ndarray, view: np.ndarray, *, l2: bool = False) -> np.ndarray:
    """Joint retrieval feature [rgb, view] (spec 12); `l2` normalises each part first."""
    if l2:
        rgb, view = l2_normalize(rgb), l2_normalize(view)
    return np.concatenate([rgb, view], axis=1)


# --------------------------------------------------------------------------- data and model


def load_backbone(checkpoint: Path, device):
    """The backbone of one of our checkpoints, loaded strictly (spec 10.1), in eval mode."""
    from iicrepro.checkpoint import load_backbone as load_strict
    from iicrepro.checkpoint import load_model_checkpoint
    from iicrepro.models import build_backbone

    ckpt = load_model_checkpoint(checkpoint)
    kwargs = {k: v for k, v in (ckpt.get("model_kwargs") or {}).items() if k != "num_classes"}
    model = build_backbone(ckpt["backbone"], **kwargs)
    load_strict(model, checkpoint)
    return model.to(device).eval(), ckpt


def embed(model, x, features: str, conv_pool: bool):
    """One clip feature per row of `x`: flattened conv5 map (spec 10.3) or the pooled vector."""
    if features == "conv":
        return model.retrieval_features(x, conv_pool=conv_pool)
    return model(x)


def extract(model, loader, modalities, *, features: str, conv_pool: bool, device) -> dict:
    """Video features per modality (mean of clip features, spec 10.4), labels and indices."""
    import torch

    from iicrepro.method.views import make_view, to_unit

    out = {m: [] for m in modalities}
    labels, index = [], []
    with torch.no_grad():
        for batch in loader:
            video = batch["video"]
            b, n = video.shape[:2]
            rgb = to_unit(video.flatten(0, 1).to(device, non_blocking=True))
            flow = batch.get("flow")
            if flow is not None:
                flow = to_unit(flow.flatten(0, 1).to(device, non_blocking=True))
            for m in modalities:
                x = make_view(rgb, m, flow=flow, residual_scaled=True)
                f = embed(model, x, features, conv_pool).float().reshape(b, n, -1).mean(dim=1)
                out[m].append(f.cpu().numpy())
            labels.append(np.asarray(batch["label"]))
            index.append(np.asarray(batch["index"]))
    result = {m: np.concatenate(v).astype(np.float32) for m, v in out.items()}
    result["labels"] = np.concatenate(labels).astype(np.int64)
    result["index"] = np.concatenate(index).astype(np.int64)
    return result


def recalibrate_bn(model, loader, views, device) -> int:
    """Recompute BatchNorm running statistics in one train-mode pass, weights untouched.

    ``momentum=None`` makes the running statistics a cumulative average over the batches; every
    view is a separate forward, as in pretraining (spec 15). Returns the number of clips seen.
    """
    import torch

    from iicrepro.method.views import make_view, to_unit

    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    seen = 0
    with torch.no_grad():
        for batch in loader:
            rgb = to_unit(batch["video"].to(device, non_blocking=True))
            flow = batch.get("flow")
            if flow is not None:
                flow = to_unit(flow.to(device, non_blocking=True))
            for v in views:
                model(make_view(rgb, v, flow=flow, residual_scaled=True))
            seen += len(rgb)
    for m, momentum in zip(bns, momenta, strict=True):
        m.momentum = momentum
    model.eval()
    return seen


# --------------------------------------------------------------------------- feature cache


def feature_key(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def _cache_path(out: Path, fields: dict) -> Path:
    name = f"{fields['dataset']}-split{fields['split']}-{fields['subset']}-{fields['modality']}"
    return out / "features" / f"{name}-{feature_key(fields)}.npz"


def _read_cache(path: Path, videos: list[str]):
    """Cached features of `videos` (any subset of the cached ones), else None."""
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as z:
        row = {str(v): i for i, v in enumerate(z["videos"])}
        if not all(v in row for v in videos):  # other videos (the frame store changed): recompute
            return None
        rows = [row[v] for v in videos]
        return {
            "feats": z["feats"][rows],
            "labels": z["labels"][rows],
            "index": np.arange(len(rows)),
        }


def _write_cache(path: Path, feats, labels, index, videos: list[str], fields: dict) -> None:
    with io.atomic_path(path, suffix=".npz") as tmp, open(tmp, "wb") as f:
        np.savez(
            f,
            feats=feats,
            labels=labels,
            index=index,
            videos=np.asarray(videos),
            fields=np.asarray(json.dumps(fields, sort_keys=True)),
        )


# --------------------------------------------------------------------------- the step


def _loader(dataset, batch_size, workers, device, *, shuffle=False, seed=0):
    import torch

    from iicrepro.devices import pin_memory

    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
        generator=torch.Generator().manual_seed(seed), pin_memory=pin_memory(device),
    )  # fmt: skip


def _recalibration_pass(settings, model, view, device) -> dict:
    """BN recalibration on the pretraining dataset's training clips, both modalities."""
    from iicrepro.data.datasets import recalibration_set
    from iicrepro.seeding import seed_everything

    clips = recalibration_set(settings, view)
    seed_everything(RECALIBRATION_SEED)
    loader = _loader(
        clips, settings["pretrain"]["batch_size"], settings["retrieval"]["workers"], device,
        shuffle=True, seed=RECALIBRATION_SEED,
    )  # fmt: skip
    seen = recalibrate_bn(model, loader, list(dict.fromkeys(["rgb", view])), device)
    p = settings["pretrain"]
    return {"dataset": p["dataset"], "split": p["split"], "subset": "train", "clips": seen,
            "batch_size": p["batch_size"], "seed": RECALIBRATION_SEED}  # fmt: skip


def _subset_features(settings, model, out, base, store, flows, kept, view, device) -> dict:
    """Video features of one subset per modality, from the cache or extracted (and cached)."""
    from iicrepro.data.datasets import evaluation_clips

    r = settings["retrieval"]
    modalities = list(dict.fromkeys(["rgb", view]))
    videos = [str(v) for v in kept["video"]]
    paths = {m: _cache_path(out, {**base, "modality": m}) for m in modalities}
    found = {m: _read_cache(paths[m], videos) for m in modalities}
    missing = [m for m in modalities if found[m] is None]
    if missing:
        clips = evaluation_clips(settings, kept, store, flows if view in missing else None)
        got = extract(
            model, _loader(clips, r["batch_size"], r["workers"], device), missing,
            features=r["features"], conv_pool=r["conv_pool"], device=device,
        )  # fmt: skip
        for m in missing:
            found[m] = {"feats": got[m], "labels": got["labels"], "index": got["index"]}
            _write_cache(paths[m], **found[m], videos=videos, fields={**base, "modality": m})
    feats = {m: found[m]["feats"] for m in modalities}
    if view != "rgb":
        feats["joint"] = joint(feats["rgb"], feats[view])
        feats["joint_l2"] = joint(feats["rgb"], feats[view], l2=True)
    return {"feats": feats, "labels": found["rgb"]["labels"]}


def retrieve(
    settings: Any,
    checkpoint: str | Path,
    dataset: str,
    view: str,
    *,
    out: str | Path | None = None,
    bn: str = "as-initialised",
    device: str | None = None,
) -> Path:
    """Evaluate one checkpoint by retrieval on `dataset`; returns the output folder."""
    from iicrepro.data.datasets import flow_stores, frame_store, load_manifest, usable_subset
    from iicrepro.devices import pick_device

    if view not in VIEWS:
        raise UserError(f"unknown view {view!r}; choose one of {', '.join(VIEWS)}")
    if bn not in BN_MODES:
        raise UserError(f"unknown --bn {bn!r}; choose one of {', '.join(BN_MODES)}")
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise UserError(f"checkpoint {checkpoint} not found: run `iicrepro pretrain` first")
    r = settings["retrieval"]
    out = (
        Path(out)
        if out
        else layout.retrieval_dir(settings, dataset, layout.retrieval_run(checkpoint, bn))
    )
    device = pick_device(device)
    sha = io.sha256_file(checkpoint)
    model, ckpt = load_backbone(checkpoint, device)
    recal = _recalibration_pass(settings, model, view, device) if bn == "recalibrate" else None

    store = frame_store(settings, dataset)
    flows = flow_stores(settings, dataset, view)
    manifest = load_manifest(settings, dataset, r["split"])
    decided = steps.Bnrecal if bn == "recalibrate" else steps.Retrieve
    base = {  # the cache key: the model, the step's settings and the frame store's
        "checkpoint_sha256": sha, "dataset": dataset, "split": r["split"], "bn": bn,
        "bn_recalibration": recal,
        "settings": decided.from_settings(settings, dataset=dataset).as_dict(),
        "frames": steps.Frames.from_settings(settings).as_dict(), "residual": "scaled",
    }  # fmt: skip
    name = layout.retrieval_run(checkpoint, bn)
    ident = {**(layout.parse_run_name(name) or {}), "dataset": dataset, "split": r["split"],
             "view": view, "variant": None}  # fmt: skip
    run = track.start_run(
        settings, "retrieval", out, name=name, identity=ident, params={**base, "topk": r["topk"]},
        lineage={"sha256": sha, "file": checkpoint.name},
    )  # fmt: skip
    data, counts = {}, {}
    for subset, role in (("train", "gallery"), ("test", "query")):
        kept, counts[role] = usable_subset(
            settings, manifest, store, subset, flows=flows, batch_size=r["batch_size"],
            drop_last=r["drop_last"],
        )  # fmt: skip
        data[role] = _subset_features(
            settings, model, out, {**base, "subset": subset}, store, flows, kept, view, device
        )
        counts[role]["feature_dim"] = int(data[role]["feats"]["rgb"].shape[1])

    rows = []
    for modality, query in data["query"]["feats"].items():
        gallery = data["gallery"]["feats"][modality]
        acc = topk_accuracy(
            query, data["query"]["labels"], gallery, data["gallery"]["labels"], r["topk"]
        )
        rows += [{"modality": modality, "metric": f"top{k}", "value": v} for k, v in acc.items()]
    result = {
        "rows": rows, "dataset": dataset, "split": r["split"], "view": view,
        "features": r["features"], "conv_pool": r["conv_pool"], "drop_last": r["drop_last"],
        "bn": bn, "bn_recalibration": recal, "counts": counts,
        "checkpoint": {"path": str(checkpoint), "sha256": sha, "backbone": ckpt["backbone"],
                       "model_kwargs": ckpt.get("model_kwargs")},
        "ties": "equal distances keep gallery order (stable sort)",
        "provenance": io.provenance(
            settings, [checkpoint, layout.manifest(settings, dataset, r["split"])], step="retrieve"
        ),
    }  # fmt: skip
    lines = ["modality,metric,k,value"]
    lines += [f"{x['modality']},{x['metric']},{x['metric'][3:]},{x['value']:.4f}" for x in rows]
    io.write_text(out / "topk.csv", "\n".join(lines) + "\n")
    io.write_json(out / "metrics.json", result)
    run.finish(files=("metrics.json", "topk.csv"))
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint.pt (or a seed's init.pt)")
    parser.add_argument("--dataset", required=True, help="ucf101, hmdb51 or synthetic")
    parser.add_argument("--view", required=True, choices=VIEWS, help="second modality")
    parser.add_argument("--out", default=None, help="output folder (default: layout)")
    parser.add_argument(
        "--bn",
        default="as-initialised",
        choices=BN_MODES,
        help="BatchNorm statistics: as in the checkpoint, or recalibrated on training clips "
        "(the stronger random-init baseline)",
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if present)")


def main(args: argparse.Namespace) -> int:
    from iicrepro.cli import settings_from_args

    settings = settings_from_args(args)
    out = retrieve(
        settings,
        args.checkpoint,
        args.dataset,
        args.view,
        out=args.out,
        bn=args.bn,
        device=args.device,
    )
    metrics = io.read_json(out / "metrics.json")
    for row in metrics["rows"]:
        if row["metric"] == "top1":
            print(f"{row['modality']:>9} top1 {row['value']:6.2f}")
    print(f"wrote {out / 'metrics.json'}")
    return 0
