"""Re-identification: Market-1501 metrics against a plain per-query port of the devkit, and models."""
from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch

from pipeline.config import BuiltinDataConfig, ConfigError, PrepareConfig
from pipeline.data import build_loader
from pipeline.data.prepare import prepare
from pipeline.models import NoahHead, build_model, build_reid_model
from pipeline.training.ranking import market1501_metrics, pairwise_distance
from pipeline.training.record import save_checkpoint
from pipeline.training.tasks import evaluate_reid, extract, load_backbone


def brute_force(dist, q_pids, g_pids, q_cams, g_cams, max_rank=10):
    """A literal per-query port of the Market-1501 devkit (evaluation.m, compute_AP.m) on lists."""
    cmc_sum, ap_sum, valid = [0.0] * max_rank, 0.0, 0
    for i in range(len(q_pids)):
        order = sorted(range(len(g_pids)), key=lambda j: dist[i][j])
        junk = {j for j in order if g_pids[j] == -1 or (g_pids[j] == q_pids[i] and g_cams[j] == q_cams[i])}
        good = {j for j in order if j not in junk and g_pids[j] == q_pids[i] and g_pids[j] != 0}
        if not good:
            continue
        valid += 1
        ranked = [j for j in order if j not in junk]
        first = next(n for n, j in enumerate(ranked) if j in good)
        for k in range(first, max_rank):
            cmc_sum[k] += 1
        ap, hits, old_recall, old_precision = 0.0, 0, 0.0, 1.0
        for n, j in enumerate(ranked):
            hits += j in good
            recall, precision = hits / len(good), hits / (n + 1)
            ap += (recall - old_recall) * (old_precision + precision) / 2
            old_recall, old_precision = recall, precision
        ap_sum += ap
    return [c / valid for c in cmc_sum], ap_sum / valid, valid


# The hand-checked case. Gallery (pid, camera):
#   g0 (1, c1)  g1 (1, c2)  g2 (0, c3) distractor  g3 (-1, c1) junk
#   g4 (2, c1)  g5 (2, c2)  g6 (1, c3)  g7 (3, c1)
# Query A = (1, c1): by distance g0 g3 g2 g1 g4 g6 g5 g7. g0 (same id, same camera) and g3 (junk) go;
#   ranking g2 g1 g4 g6 g5 g7: true matches at ranks 2 and 4 -> rank-1 miss, rank-5 hit.
#   AP (devkit trapezoid) = 1/2 [ (0/1 + 1/2)/2 + (1/3 + 2/4)/2 ] = 1/2 (1/4 + 5/12) = 1/3.
#   (torchreid's un-interpolated AP would be 1/2 (1/2 + 2/4) = 1/2.)
# Query B = (2, c2): by distance g5 g3 g4 ...: g5 (same camera) and g3 (junk) go, g4 is rank 1: AP 1.
# Query C = (3, c1): its only gallery image g7 is from its own camera -> no true match, skipped.
# So rank-1 = (0 + 1)/2 = 1/2, rank-5 = 1, mAP = (1/3 + 1)/2 = 2/3 over 2 valid queries.
HAND_G_PIDS = [1, 1, 0, -1, 2, 2, 1, 3]
HAND_G_CAMS = [1, 2, 3, 1, 1, 2, 3, 1]
HAND_Q_PIDS, HAND_Q_CAMS = [1, 2, 3], [1, 2, 1]
HAND_DIST = [
    [0.1, 0.4, 0.3, 0.2, 0.5, 0.7, 0.6, 0.8],
    [0.6, 0.7, 0.5, 0.15, 0.2, 0.1, 0.4, 0.3],
    [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.1],
]


def test_hand_computed_case():
    out = market1501_metrics(torch.tensor(HAND_DIST), HAND_Q_PIDS, HAND_G_PIDS, HAND_Q_CAMS, HAND_G_CAMS,
                             max_rank=8)
    assert out["num_valid_queries"] == 2
    assert out["rank1"] == pytest.approx(0.5)
    assert out["rank5"] == pytest.approx(1.0)
    assert out["map"] == pytest.approx(2 / 3)
    assert out["cmc"].tolist() == pytest.approx([0.5] + [1.0] * 7)
    cmc, m_ap, valid = brute_force(HAND_DIST, HAND_Q_PIDS, HAND_G_PIDS, HAND_Q_CAMS, HAND_G_CAMS, 8)
    assert (cmc, m_ap, valid) == (pytest.approx(out["cmc"].tolist()), pytest.approx(2 / 3), 2)


def test_rules_change_the_result():
    """Each rule matters: relabel one image and the numbers move as worked out by hand."""
    # g0 no longer from A's camera: A's first ranked image is a true match -> rank-1 = 1, and
    # A's ranking g0 g2 g1 g4 g6 has hits at 1, 3, 5: AP = 1/3 [1 + (1/2 + 2/3)/2 + (2/4 + 3/5)/2].
    cams = list(HAND_G_CAMS)
    cams[0] = 4
    out = market1501_metrics(torch.tensor(HAND_DIST), HAND_Q_PIDS, HAND_G_PIDS, HAND_Q_CAMS, cams, max_rank=8)
    ap_a = (1 + (1 / 2 + 2 / 3) / 2 + (2 / 4 + 3 / 5) / 2) / 3
    assert out["rank1"] == pytest.approx(1.0)
    assert out["map"] == pytest.approx((ap_a + 1) / 2)
    # g3 no longer junk but a distractor: it becomes B's rank-1 negative -> B's AP = (0 + 1/2)/2, and
    # A's ranking g3 g2 g1 g4 g6 has hits at 3 and 5: AP = 1/2 [(0/2 + 1/3)/2 + (1/4 + 2/5)/2].
    pids = list(HAND_G_PIDS)
    pids[3] = 0
    out = market1501_metrics(torch.tensor(HAND_DIST), HAND_Q_PIDS, pids, HAND_Q_CAMS, HAND_G_CAMS, max_rank=8)
    ap_a = ((0 + 1 / 3) / 2 + (1 / 4 + 2 / 5) / 2) / 2
    assert out["rank1"] == pytest.approx(0.0)
    assert out["map"] == pytest.approx((ap_a + 0.25) / 2)


def _random_case(rng: random.Random, num_q: int, num_g: int, num_ids: int, ties: bool):
    pids = [-1, 0] + list(range(1, num_ids + 1))
    g_pids = [rng.choice(pids) for _ in range(num_g)]
    g_cams = [rng.randint(1, 3) for _ in range(num_g)]
    q_pids = [rng.randint(1, num_ids) for _ in range(num_q)]
    q_cams = [rng.randint(1, 3) for _ in range(num_q)]
    dist = [[float(rng.randint(0, 4)) if ties else rng.random() for _ in range(num_g)] for _ in range(num_q)]
    return dist, q_pids, g_pids, q_cams, g_cams


@pytest.mark.parametrize("seed,ties", [(0, False), (1, False), (2, True), (3, True)])
def test_matches_brute_force(seed, ties):
    dist, q_pids, g_pids, q_cams, g_cams = _random_case(random.Random(seed), 40, 60, 6, ties)
    cmc, m_ap, valid = brute_force(dist, q_pids, g_pids, q_cams, g_cams, max_rank=10)
    for chunk in (1, 7, 256):
        out = market1501_metrics(torch.tensor(dist), q_pids, g_pids, q_cams, g_cams, max_rank=10, chunk_size=chunk)
        assert out["num_valid_queries"] == valid
        assert out["cmc"].tolist() == pytest.approx(cmc)
        assert out["rank1"] == pytest.approx(cmc[0])
        assert out["map"] == pytest.approx(m_ap)


def test_euclidean_distance():
    gen = torch.Generator().manual_seed(0)
    q, g = torch.randn(5, 16, generator=gen), torch.randn(7, 16, generator=gen)
    d = pairwise_distance(q, g)
    for i in range(5):
        for j in range(7):
            assert d[i, j].item() == pytest.approx(math.dist(q[i].tolist(), g[j].tolist()), rel=1e-4)


def test_bad_input():
    with pytest.raises(ValueError, match="no query has a true match"):
        market1501_metrics(torch.zeros(1, 2), [1], [1, -1], [1], [1, 2])
    with pytest.raises(ValueError, match="3 gallery pids"):
        market1501_metrics(torch.zeros(1, 2), [1], [1, 2, 3], [1], [1, 2])
    with pytest.raises(ValueError, match="max_rank"):
        market1501_metrics(torch.zeros(1, 2), [1], [1, 2], [1], [2, 2], max_rank=3)


# ---- models (built once per module: ResNet50 construction dominates these tests)

IMG = 64
KINDS = ("baseline", "noah")


@pytest.fixture(scope="module")
def reid_models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {kind: build_reid_model("resnet50", {"kind": kind}, num_ids=7, img_size=IMG) for kind in KINDS}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, tuple[torch.nn.Module, Path]]:
    """Classification models of each head and their trainer-style checkpoints."""
    torch.manual_seed(1)
    folder = tmp_path_factory.mktemp("checkpoints")
    out = {}
    for kind in KINDS:
        classifier = build_model("resnet50", {"kind": kind}, 5, IMG)
        path = folder / f"{kind}.pt"
        save_checkpoint(path, {"epoch": 3, "history": [{"top1": 50.0}], "model": classifier.state_dict()})
        out[kind] = (classifier, path)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_model_shapes(reid_models, kind):
    model = reid_models[kind]
    if kind == "noah":
        assert isinstance(model.embedding, NoahHead)
        assert (model.embedding.num_classes, model.embedding.cfg.N, model.embedding.cfg.r) == (512, 4, 0.125)
    else:
        assert model.embedding.fc.weight.shape == (512, 2048)
    assert not any(k.startswith("backbone.backbone.fc") for k in model.state_dict())
    x = torch.randn(3, 3, IMG, IMG)
    model.train()
    assert model(x).shape == (3, 7)
    model.eval()
    with torch.no_grad():
        emb = model.embed(x)
        assert torch.allclose(model.classifier(emb), model(x))
    assert emb.shape == (3, 512) and (emb >= 0).all()  # after BN + ReLU


def test_model_rejects_bad_options():
    with pytest.raises(ConfigError, match="head.kind"):
        build_reid_model("resnet50", {"kind": "gap"}, 7, IMG)
    with pytest.raises(ConfigError, match="num_ids"):
        build_reid_model("resnet50", {"kind": "baseline"}, 1, IMG)


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_finetune_loads_the_classification_backbone(reid_models, checkpoints, kind):
    model, (classifier, path) = reid_models[kind], checkpoints[kind]
    fresh_head = {k: v.clone() for k, v in model.embedding.state_dict().items()}
    skipped = load_backbone(model, path)
    assert skipped == (["head.key_bias", "head.key_weight", "head.value_bias", "head.value_weight"]
                       if kind == "noah" else ["backbone.fc.bias", "backbone.fc.weight"])
    source = classifier.state_dict()
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, source[k]), k
    for k, v in model.embedding.state_dict().items():
        assert torch.equal(v, fresh_head[k]), k
    # after loading, the reid backbone computes what the classifier's backbone computes
    x = torch.randn(2, 3, IMG, IMG)
    classifier.eval(), model.eval()
    with torch.no_grad():
        assert torch.allclose(model.backbone.forward_features(x), classifier.forward_features(x))


@pytest.mark.slow
def test_finetune_rejects_other_checkpoints(reid_models, checkpoints, tmp_path: Path):
    with pytest.raises(ConfigError, match="noah head like this reid model's"):
        load_backbone(reid_models["noah"], checkpoints["baseline"][1])
    with pytest.raises(ConfigError, match="baseline head like this reid model's"):
        load_backbone(reid_models["baseline"], checkpoints["noah"][1])
    other = tmp_path / "resnet18.pt"
    save_checkpoint(other, {"model": build_model("resnet18", {"kind": "baseline"}, 5, IMG).state_dict()})
    with pytest.raises(ConfigError, match="a checkpoint of this backbone"):
        load_backbone(reid_models["baseline"], other)
    with pytest.raises(ConfigError, match="init_from"):
        load_backbone(reid_models["baseline"], tmp_path / "none.pt")


# ---- evaluation on a prepared Market-layout dataset

SMALL_REID = BuiltinDataConfig(train_ids=4, test_ids=4, cameras=3, images_per_id=3, distractors=2, junk=2,
                               image_size=32)


def test_evaluate_reid_on_prepared_data(tmp_path: Path):
    data = tmp_path / "reid"
    prepare(PrepareConfig(source="builtin_reid", out=str(data), resize=32, builtin=SMALL_REID), workers=1)
    torch.manual_seed(3)
    model = build_reid_model("resnet18", {"kind": "noah", "N": 4, "r": 0.5}, 4, IMG)
    query, gallery = (build_loader(data, split, IMG, 8, train=False) for split in ("query", "gallery"))
    metrics = evaluate_reid(model, query, gallery)
    assert set(metrics) == {"rank1", "rank5", "map"}
    # the same numbers from the embeddings through the plain per-query devkit port
    q, q_pids, q_cams = extract(model, query)
    g, g_pids, g_cams = extract(model, gallery)
    assert (g_pids == -1).sum() == 2 and (g_pids == 0).sum() == 2
    dist = [[math.dist(a, b) for b in g.tolist()] for a in q.tolist()]
    cmc, m_ap, _ = brute_force(dist, q_pids.tolist(), g_pids.tolist(), q_cams.tolist(), g_cams.tolist())
    assert metrics["rank1"] == pytest.approx(100 * cmc[0])
    assert metrics["rank5"] == pytest.approx(100 * cmc[4])
    assert metrics["map"] == pytest.approx(100 * m_ap, rel=1e-4)
