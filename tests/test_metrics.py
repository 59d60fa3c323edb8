"""FID, CLIP score and CMMD against independent references; eval_mjhq.py end to end on a fake MJHQ layout."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from metrics.clip_score import ClipEmbedder, clip_score
from metrics.cmmd import cmmd
from metrics.fid import (
    InceptionFeatures,
    feature_stats,
    find_inception_weights,
    frechet_distance,
    load_stats,
    save_stats,
)
from tests.helpers import StandInInception, load_script

TINY_CLIP = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    import open_clip
    folder = tmp_path_factory.mktemp("clipcfg")
    (folder / "star-tiny-clip.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(folder)
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("star-tiny-clip", pretrained=None)
    return ClipEmbedder("star-tiny-clip", model=model, preprocess=preprocess)


def test_fid_equals_pytorch_fid_and_is_zero_on_itself():
    from pytorch_fid.fid_score import calculate_frechet_distance
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 16)), rng.normal(0.3, 1.5, size=(200, 16)) @ rng.normal(size=(16, 16))
    sa, sb = feature_stats(a), feature_stats(b)
    ours, theirs = frechet_distance(*sa, *sb), calculate_frechet_distance(*sa, *sb)
    assert ours == pytest.approx(theirs, rel=1e-8)
    assert abs(frechet_distance(*sa, *sa)) < 1e-8


def test_fid_closed_forms():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    v1, v2 = rng.uniform(0.5, 2, size=5), rng.uniform(0.5, 2, size=5)
    expected = ((mu1 - mu2) ** 2).sum() + (v1 + v2 - 2 * np.sqrt(v1 * v2)).sum()  # diagonal covariances
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-10)
    a = rng.normal(size=(5, 5))
    s = a @ a.T  # S2 = c S1: Tr(S1 + c S1 - 2 sqrt(c) S1) = (1 - sqrt(c))^2 Tr S1
    assert frechet_distance(mu1, s, mu1, 4 * s) == pytest.approx(np.trace(s), rel=1e-8)


def test_stats_round_trip_and_missing_weights_message(tmp_path):
    mu, sigma = feature_stats(np.random.default_rng(2).normal(size=(10, 3)))
    save_stats(tmp_path / "s.npz", mu, sigma)
    mu2, sigma2 = load_stats(tmp_path / "s.npz")
    assert np.array_equal(mu, mu2) and np.array_equal(sigma, sigma2)
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05"):
        find_inception_weights(tmp_path / "absent.pth")
    with pytest.raises(FileNotFoundError, match="does not download"):
        InceptionFeatures(tmp_path / "absent.pth")


def test_clip_score_equals_naive_reference(tiny_clip):
    rng = np.random.default_rng(3)
    images = [Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)) for _ in range(4)]
    prompts = ["a red circle", "a blue square", "two cats " * 200, "x"]  # the long one is truncated, not an error
    img, txt = tiny_clip.images(images), tiny_clip.texts(prompts)
    naive = []
    with torch.no_grad():
        for im, p in zip(images, prompts):
            a = tiny_clip.model.encode_image(tiny_clip.preprocess(im)[None])[0].double()
            tokens = tiny_clip.tokenizer([p])
            b = tiny_clip.model.encode_text(tokens)[0].double()
            naive.append(float(a @ b) / float(a.norm() * b.norm()))
    assert clip_score(img, txt) == pytest.approx(sum(naive) / len(naive), abs=1e-6)


def test_cmmd_equals_naive_reference_and_grows_with_shift(tiny_clip):
    g = torch.Generator().manual_seed(4)
    x = F.normalize(torch.randn(7, 8, generator=g, dtype=torch.float64), dim=-1)
    y = F.normalize(torch.randn(5, 8, generator=g, dtype=torch.float64), dim=-1)

    def k(a, b):
        return float(torch.exp(-((a - b) ** 2).sum() / (2 * 10.0 ** 2)))

    def mean_k(a, b):
        return sum(k(p, q) for p in a for q in b) / (len(a) * len(b))

    naive = 1000 * (mean_k(x, x) + mean_k(y, y) - 2 * mean_k(x, y))
    assert cmmd(x, y) == pytest.approx(naive, rel=1e-9)
    assert cmmd(x, x) == 0.0
    shifts = [cmmd(x, x + s) for s in (0.0, 0.1, 0.3, 1.0)]
    assert shifts[0] == 0 and all(a < b for a, b in zip(shifts, shifts[1:]))


def fake_mjhq_layout(root, count: int) -> list[str]:
    """MJHQ's layout (meta_data.json, <category>/<name>.jpg) with random images; eval_mjhq.py's arguments."""
    rng = np.random.default_rng(6)
    meta = {}
    for i in range(count):
        cat = ("animals", "people")[i % 2]
        name = f"img{i:03d}"
        meta[name] = {"category": cat, "prompt": f"a photo number {i} of {cat}"}
        (root / "imgs" / cat).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8)).save(root / "imgs" / cat / f"{name}.jpg")
    (root / "meta_data.json").write_text(json.dumps(meta))
    return ["--meta", str(root / "meta_data.json"), "--images", str(root / "imgs"), "--out", str(root / "out"),
            "--top-k", "0", "--top-p", "0", "--batch-size", "4"]


def test_eval_mjhq_end_to_end_on_a_fake_layout(tmp_path, tiny_clip, capsys):
    eval_mjhq = load_script("eval_mjhq")
    from models.pipeline import StarPipeline
    args = fake_mjhq_layout(tmp_path, 10)
    pipe = StarPipeline.tiny_random()
    assert eval_mjhq.main(args, pipe=pipe, extractors=(StandInInception(), tiny_clip)) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    for key in ("fid", "clip_score", "cmmd"):
        assert set(metrics[key]) == {"animals", "people", "overall"}
        assert all(np.isfinite(v) for v in metrics[key].values())
    assert metrics["count"] == {"animals": 5, "people": 5, "overall": 10}
    assert len(list((tmp_path / "out" / "generated").rglob("*.png"))) == 10
    assert (tmp_path / "out" / "radar.png").stat().st_size > 10_000
    assert metrics["cmmd"]["overall"] > 0 and metrics["fid"]["overall"] > 0
    assert metrics["generation"]["cfg"] == 4.0 and metrics["generation"]["guidance"] == "linear"
    # Other settings into the same --out: refused (the old images were scored as if made with them)
    from utils import cli
    before = {p: p.read_bytes() for p in (tmp_path / "out" / "generated").rglob("*.png")}
    assert cli.run(lambda: eval_mjhq.main(args + ["--cfg", "2"], pipe=pipe,
                                          extractors=(StandInInception(), tiny_clip))) == 2
    assert "holds images generated otherwise (cfg 4.0 -> 2.0)" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in before} == before
    # The same settings resume (nothing left to generate); scoring alone reports the recorded settings
    assert eval_mjhq.main(args, pipe=pipe, extractors=(StandInInception(), tiny_clip)) == 0
    assert '"generated": 0' in capsys.readouterr().out
    assert eval_mjhq.main(args + ["--skip-generation", "--cfg", "2"], extractors=(StandInInception(), tiny_clip)) == 0
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["generation"]["cfg"] == 4.0


def test_eval_mjhq_checks_what_scoring_reads_before_generating(tmp_path, capsys):
    """Missing Inception or CLIP weights, or reference images, used to surface after the whole generation."""
    from models.pipeline import StarPipeline
    from utils import cli
    eval_mjhq = load_script("eval_mjhq")
    args = fake_mjhq_layout(tmp_path, 4)
    (tmp_path / "imgs" / "people" / "img003.jpg").unlink()
    weights = {"--inception-weights": tmp_path / "inception.pth", "--clip-weights": tmp_path / "clip.pt"}
    args += [str(x) for flag, path in weights.items() for x in (flag, path)]
    for missing, message in (("--inception-weights", "FID Inception weights not found"),
                             ("--clip-weights", "CLIP weights not found"),
                             (None, "1 of 4 reference images are missing under")):
        if missing is not None:
            weights[missing].unlink(missing_ok=True)
        assert cli.run(lambda: eval_mjhq.main(args, pipe=StarPipeline.tiny_random())) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "out" / "generated").exists()
        for path in weights.values():
            path.write_bytes(b"stand-in")


def test_eval_mjhq_uses_the_papers_guidance_and_checks_settings_first(tmp_path, tiny_clip, capsys, monkeypatch):
    """The pipeline's recorded guidance (a shapes pipeline: constant) is not the paper's protocol: --guidance
    (default linear) is passed to every batch; a bad schedule or missing generated images stop before any work."""
    from models.pipeline import StarPipeline
    from utils import cli
    eval_mjhq = load_script("eval_mjhq")
    args = fake_mjhq_layout(tmp_path, 4)
    pipe = StarPipeline.tiny_random()
    pipe.generation = {**pipe.generation, "guidance_schedule": "constant"}
    assert cli.run(lambda: eval_mjhq.main(args + ["--guidance", "window:0:99"], pipe=pipe,
                                          extractors=(StandInInception(), tiny_clip))) == 2
    assert f"the window needs 0 <= i <= j <= {pipe.star.num_scales - 1}" in capsys.readouterr().err
    assert not (tmp_path / "out" / "generated").exists()
    extractors = (StandInInception(), tiny_clip)
    assert cli.run(lambda: eval_mjhq.main(args + ["--seed", str(2 ** 64 - 2)], pipe=pipe, extractors=extractors)) == 2
    assert "--seed: seed 18446744073709551617 is out of range" in capsys.readouterr().err  # the last image's
    assert cli.run(lambda: eval_mjhq.main(args + ["--skip-generation"], extractors=extractors)) == 2
    assert "--skip-generation: 4 of 4 generated images are missing" in capsys.readouterr().err
    seen = []
    original = StarPipeline.__call__
    monkeypatch.setattr(StarPipeline, "__call__", lambda self, *a, **kw: seen.append(kw["guidance_schedule"])
                        or original(self, *a, **kw))
    assert eval_mjhq.main(args, pipe=pipe, extractors=(StandInInception(), tiny_clip)) == 0
    assert seen == ["linear"]  # one batch of 4
