"""Retrieval (spec 10): top-k on hand-made features, joint features, counting, the step."""

from pathlib import Path

import evaluation_data as data
import numpy as np
import pandas as pd
import pytest
import torch

from iicrepro import cli, io, layout
from iicrepro.errors import UserError
from iicrepro.evaluate.retrieval import joint, retrieve, topk_accuracy

E = np.eye(3)


def hand_made():
    # gallery: g0 = e1 (class 0), g1 = 3*e1 (class 1, same direction: tied with g0), g2 = e2
    # (class 2), g3 = e1 + e2 (class 3).
    gallery = np.stack([E[0], 3 * E[0], E[1], E[0] + E[1]])
    g_labels = [0, 1, 2, 3]
    queries = np.stack([E[0], E[1], E[2], -E[0], E[1], E[0]])
    # q0 class 1: g0/g1 tie at distance 0, g0 first -> first hit at k=2
    # q1 class 3: g2 (0), g3 (0.29) -> k=2
    # q2 class 2: orthogonal to everything, all tie -> gallery order, g2 third -> k=3
    # q3 class 0: g2 (1), g3 (1.71), g0 (2) -> k=3
    # q4 class 2: g2 first -> k=1
    # q5 class 7: absent from the gallery -> never
    q_labels = [1, 3, 2, 0, 2, 7]
    return queries, q_labels, gallery, g_labels


def test_topk_on_known_neighbours_with_ties_and_k_beyond_gallery():
    q, ql, g, gl = hand_made()
    acc = topk_accuracy(q, ql, g, gl, [1, 2, 3, 10])
    assert acc == pytest.approx({1: 100 / 6, 2: 300 / 6, 3: 500 / 6, 10: 500 / 6})


def test_ties_follow_gallery_order():
    q, ql, g, gl = hand_made()
    # Swap g0 and g1: q0 (class 1) now finds its tied class-1 neighbour first.
    acc = topk_accuracy(q[:1], ql[:1], g[[1, 0, 2, 3]], [gl[i] for i in (1, 0, 2, 3)], [1])
    assert acc[1] == 100.0
    assert topk_accuracy(q[:1], ql[:1], g, gl, [1])[1] == 0.0


def brute_force(q, ql, g, gl, k):
    hits = 0
    for x, y in zip(q, ql, strict=True):
        sims = [np.dot(x, z) / np.linalg.norm(x) / np.linalg.norm(z) for z in g]
        order = sorted(range(len(g)), key=lambda i: (1 - sims[i], i))
        hits += y in [gl[i] for i in order[:k]]
    return 100 * hits / len(q)


def test_topk_matches_brute_force_in_chunks_and_accepts_torch():
    rng = np.random.default_rng(0)
    q, g = rng.normal(size=(23, 7)), rng.normal(size=(31, 7))
    ql, gl = rng.integers(0, 5, 23), rng.integers(0, 5, 31)
    acc = topk_accuracy(torch.from_numpy(q), torch.from_numpy(ql), g, gl, [1, 5, 50], chunk=4)
    for k in (1, 5, 50):
        assert acc[k] == pytest.approx(brute_force(q, ql, g, gl, k))
    assert acc[50] == 100.0 * np.isin(ql, gl).mean()


def test_joint_is_concatenation():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(4, 3)), rng.normal(size=(4, 5)) * 100
    np.testing.assert_array_equal(joint(a, b), np.concatenate([a, b], axis=1))
    j = joint(a, b, l2=True)
    np.testing.assert_allclose(np.linalg.norm(j[:, :3], axis=1), 1.0)
    np.testing.assert_allclose(np.linalg.norm(j[:, 3:], axis=1), 1.0)
    np.testing.assert_allclose(j[:, 3:], b / np.linalg.norm(b, axis=1, keepdims=True))


# --------------------------------------------------------------------------- the step, end to end


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny store + checkpoint, and one retrieval run through the CLI."""
    tmp = tmp_path_factory.mktemp("retrieval")
    s = data.settings(tmp)
    data.build_dataset(s)
    run_dir = data.write_checkpoints(s)
    out = tmp / "ret"
    argv = ["retrieve", "--params", str(data.PARAMS), "--preset", "demo"]
    for item in data.overrides(tmp):
        argv += ["--set", item]
    argv += ["--checkpoint", str(run_dir / "checkpoint.pt"), "--dataset", data.DATASET]
    argv += ["--view", "residual", "--out", str(out), "--device", "cpu"]  # exact comparisons
    assert cli.main(argv) == 0
    return {"tmp": tmp, "settings": s, "run_dir": run_dir, "out": out}


def cached(out, subset, modality):
    (path,) = (out / "features").glob(f"synthetic-split1-{subset}-{modality}-*.npz")
    with np.load(path) as z:
        return {k: z[k] for k in ("feats", "labels", "videos")}, path


def test_retrieve_writes_every_modality_and_counts_every_video(tiny):
    m = io.read_json(tiny["out"] / "metrics.json")
    ks = [1, 5, 10, 20, 50]
    assert [(r["modality"], r["metric"]) for r in m["rows"]] == [
        (mod, f"top{k}") for mod in ("rgb", "residual", "joint", "joint_l2") for k in ks
    ]
    for mod in ("rgb", "residual", "joint", "joint_l2"):
        values = [r["value"] for r in m["rows"] if r["modality"] == mod]
        assert values == sorted(values)  # top-k never falls with k
        assert values[-1] == 100.0  # k = 50 > 12 gallery videos: the whole gallery
    # 13 training videos listed, one never decoded; 12 is not a multiple of the batch size 5.
    g, q = m["counts"]["gallery"], m["counts"]["query"]
    assert (g["listed"], g["used"], g["excluded_decode"], g["dropped_last_batch"]) == (13, 12, 1, 0)
    assert g["excluded_videos"] == [data.MISSING]
    assert g["excluded_by_reason"] == {"missing": 1} and q["excluded_by_reason"] == {}
    assert (q["listed"], q["used"], q["excluded_decode"], q["dropped_last_batch"]) == (6, 6, 0, 0)
    assert m["bn"] == "as-initialised" and m["view"] == "residual"
    assert m["checkpoint"]["sha256"] == io.sha256_file(tiny["run_dir"] / "checkpoint.pt")
    assert "code_version" in m["provenance"]
    topk = (tiny["out"] / "topk.csv").read_text().splitlines()
    assert topk[0] == "modality,metric,k,value" and len(topk) == 1 + 20


def test_joint_rows_are_the_concatenated_cached_features(tiny):
    m = io.read_json(tiny["out"] / "metrics.json")
    f = {(sub, mod): cached(tiny["out"], sub, mod)[0] for sub in ("train", "test")
         for mod in ("rgb", "residual")}  # fmt: skip
    assert (
        len(f["train", "rgb"]["videos"]) == 12 and data.MISSING not in f["train", "rgb"]["videos"]
    )
    for name, l2 in (("joint", False), ("joint_l2", True)):
        acc = topk_accuracy(
            joint(f["test", "rgb"]["feats"], f["test", "residual"]["feats"], l2=l2),
            f["test", "rgb"]["labels"],
            joint(f["train", "rgb"]["feats"], f["train", "residual"]["feats"], l2=l2),
            f["train", "rgb"]["labels"],
            [1, 5, 10, 20, 50],
        )
        got = {int(r["metric"][3:]): r["value"] for r in m["rows"] if r["modality"] == name}
        assert got == pytest.approx(acc)


def test_video_feature_is_the_mean_of_its_clip_features(tiny):
    from iicrepro.data.clips import EvalClips
    from iicrepro.data.frames import FrameStore, usable
    from iicrepro.evaluate.retrieval import load_backbone
    from iicrepro.method.views import to_unit

    s = tiny["settings"]
    store = FrameStore(layout.frame_store(s, data.DATASET))
    manifest = pd.read_csv(layout.manifest(s, data.DATASET, 1))
    kept, _ = usable(manifest[manifest.subset == "test"], store, 9)
    clips = EvalClips(kept, store, clip_len=8, crop=40, num_clips=2)[3]["video"]
    model, _ = load_backbone(tiny["run_dir"] / "checkpoint.pt", "cpu")
    x = to_unit(clips)
    with torch.no_grad():  # demo preset: conv features without the (1,2,2) max-pool
        rgb = model.retrieval_features(x, conv_pool=False).mean(0)
        res = model.retrieval_features((x - x.roll(1, dims=2) + 1) / 2, conv_pool=False).mean(0)
    assert rgb.shape == (64 * 1 * 2 * 2,)  # width 0.125: 64 channels x 1 x 2 x 2 map
    np.testing.assert_allclose(cached(tiny["out"], "test", "rgb")[0]["feats"][3], rgb, rtol=1e-5)
    np.testing.assert_allclose(
        cached(tiny["out"], "test", "residual")[0]["feats"][3], res, rtol=1e-5, atol=1e-7
    )


def test_reevaluation_reuses_the_feature_cache(tiny):
    paths = sorted((tiny["out"] / "features").glob("*.npz"))
    assert len(paths) == 4  # {train, test} x {rgb, residual}
    before = {p: p.stat().st_mtime_ns for p in paths}
    first = io.read_json(tiny["out"] / "metrics.json")["rows"]
    retrieve(tiny["settings"], tiny["run_dir"] / "checkpoint.pt", data.DATASET, "residual",
             out=tiny["out"], device="cpu")  # fmt: skip
    assert {p: p.stat().st_mtime_ns for p in paths} == before
    assert io.read_json(tiny["out"] / "metrics.json")["rows"] == first


def test_drop_last_reproduces_the_upstream_count(tiny):
    s = data.settings(tiny["tmp"], **{"retrieval.drop_last": "true"})
    out = retrieve(
        s,
        tiny["run_dir"] / "checkpoint.pt",
        data.DATASET,
        "rgb",
        out=tiny["tmp"] / "dl",
        device="cpu",
    )
    m = io.read_json(out / "metrics.json")
    g, q = m["counts"]["gallery"], m["counts"]["query"]
    assert (g["used"], g["dropped_last_batch"], g["excluded_decode"]) == (10, 2, 1)
    assert (q["used"], q["dropped_last_batch"]) == (5, 1)
    assert {r["modality"] for r in m["rows"]} == {"rgb"}  # view rgb: no second modality, no joint


def test_flow_view_excludes_and_counts_videos_without_flow(tiny):
    s = tiny["settings"]
    manifest = pd.read_csv(layout.manifest(s, data.DATASET, 1))
    no_flow = manifest[manifest.subset == "test"]["video"].iloc[0]
    data.build_flow(s, "u", skip=no_flow)
    out = retrieve(
        s, tiny["run_dir"] / "checkpoint.pt", data.DATASET, "u", out=tiny["tmp"] / "u", device="cpu"
    )
    m = io.read_json(out / "metrics.json")
    q = m["counts"]["query"]
    assert (q["listed"], q["used"], q["excluded_decode"], q["excluded_flow"]) == (6, 5, 0, 1)
    assert q["excluded_videos"] == [no_flow]
    assert {r["modality"] for r in m["rows"]} == {"rgb", "u", "joint", "joint_l2"}
    u = cached(out, "test", "u")[0]
    assert len(u["videos"]) == 5 and no_flow not in u["videos"]
    assert not np.allclose(u["feats"], cached(out, "test", "rgb")[0]["feats"])


def test_bn_recalibration_changes_statistics_only(tiny):

    run_dir, s = tiny["run_dir"], tiny["settings"]
    out = retrieve(s, run_dir / "init.pt", data.DATASET, "residual", bn="recalibrate", device="cpu")
    assert out == layout.retrieval_dir(s, data.DATASET, "r3d-residual-random-s0-bnrecal")
    m = io.read_json(out / "metrics.json")
    assert m["bn"] == "recalibrate"
    assert m["bn_recalibration"]["clips"] == 12 and m["bn_recalibration"]["dataset"] == "synthetic"
    recal = cached(out, "test", "rgb")[0]["feats"]
    plain = cached(tiny["out"], "test", "rgb")[0]["feats"]
    assert not np.allclose(recal, plain)  # as-initialised BN (mean 0, var 1) differs


def test_recalibrate_bn_is_a_cumulative_average_of_batch_statistics():
    from iicrepro.evaluate.retrieval import recalibrate_bn
    from iicrepro.models import build_backbone

    torch.manual_seed(0)
    model = build_backbone("r3d", width=0.125, small_input=True)
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k}
    seen = []
    model.bn1.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].mean((0, 2, 3, 4))))
    gen = torch.Generator().manual_seed(1)
    batches = [{"video": torch.randint(0, 256, (n, 3, 8, 40, 40), generator=gen, dtype=torch.uint8)}
               for n in (3, 2, 4)]  # fmt: skip
    assert recalibrate_bn(model, batches, ["rgb", "residual"], "cpu") == 9
    assert len(seen) == 6  # one forward per batch and view
    torch.testing.assert_close(model.bn1.running_mean, torch.stack(seen).mean(0))
    assert model.bn1.momentum == 0.1 and not model.training  # restored, eval mode
    after = model.state_dict()
    for k, v in weights.items():
        if "num_batches_tracked" not in k:
            torch.testing.assert_close(after[k], v)  # weights untouched


def test_default_run_names():
    assert (
        layout.retrieval_run(
            Path("r/pretrain/s/r3d-residual-repeat-s1/checkpoint.pt"), "as-initialised"
        )
        == "r3d-residual-repeat-s1"
    )
    assert (
        layout.retrieval_run(Path("r/pretrain/s/r3d-u-shuffle-s2/init.pt"), "recalibrate")
        == "r3d-u-random-s2-bnrecal"
    )


def test_missing_backbone_entry_is_named(tiny, tmp_path):
    from iicrepro.checkpoint import load_checkpoint, save_checkpoint
    from iicrepro.evaluate.retrieval import load_backbone

    state = load_checkpoint(tiny["run_dir"] / "checkpoint.pt")
    del state["model"]["conv3.block1.bn2.running_var"]
    save_checkpoint(tmp_path / "bad.pt", state)
    with pytest.raises(UserError, match=r"conv3\.block1\.bn2\.running_var"):
        load_backbone(tmp_path / "bad.pt", "cpu")
