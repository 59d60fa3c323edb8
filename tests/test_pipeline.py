"""StarPipeline, sample.py: save/load round trip, seeding, editing, prompt files, sharded resumable sampling."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import sample
from models import build_star, build_vqvae, star_config, vqvae_config
from models.checkpoint import CheckpointError
from models.pipeline import StarPipeline, keep_masks
from models.sampler import SamplerHead
from models.text_encoder import TextEncoderError, build_text_encoder
from tests.helpers import REPO
from utils import cli


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    star = build_star(star_config("star-tiny"))
    head = SamplerHead(star.cfg, sample_from=3)
    head.init_weights()
    return StarPipeline(star, build_vqvae(vqvae_config("vqvae-tiny")), build_text_encoder("tiny"), head,
                        text_config={"encoder": "tiny"})


def pixels(images):
    return np.stack([np.asarray(im) for im in images])


def test_round_trip_gives_identical_images(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "p")
    assert {f.name for f in (tmp_path / "p").iterdir()} == {"config.json", "model.safetensors",
                                                             "vqvae.safetensors", "sampler.safetensors"}
    again = StarPipeline.from_pretrained(tmp_path / "p")
    for use_sampler in (False, True):
        a = pipe(["a red circle", "two blue squares"], seed=7, top_k=0, top_p=0.0, use_sampler=use_sampler)
        b = again(["a red circle", "two blue squares"], seed=7, top_k=0, top_p=0.0, use_sampler=use_sampler)
        assert len(a) == 2 and a[0].size == (64, 64)
        assert np.array_equal(pixels(a), pixels(b))
    # Without its VQ-VAE the directory says which file is missing and how to give one
    (tmp_path / "p" / "vqvae.safetensors").rename(tmp_path / "vqvae.safetensors")
    with pytest.raises(CheckpointError, match=r"holds no vqvae.safetensors: pass .* \(--vae on the command line\)"):
        StarPipeline.from_pretrained(tmp_path / "p")
    assert StarPipeline.from_pretrained(tmp_path / "p", vae=pipe.vqvae).vqvae is pipe.vqvae


def test_generation_defaults_are_saved_and_used(pipe, tmp_path):
    assert pipe.generation == {"cfg": 4.0, "top_k": 900, "top_p": 0.95, "guidance_schedule": "linear"}  # official
    greedy = {"cfg": 0.5, "top_k": 1, "top_p": 0.0, "guidance_schedule": "constant"}
    custom = StarPipeline(pipe.star, pipe.vqvae, pipe.text_encoder, pipe.sampler, text_config=pipe.text_config,
                          generation=greedy)
    custom.save_pretrained(tmp_path / "p")
    again = StarPipeline.from_pretrained(tmp_path / "p")
    assert again.generation == greedy
    assert again.generation_settings(cfg=2.0, top_k=None) == {**greedy, "cfg": 2.0}
    prompts = ["a red circle", "a blue square"]
    implicit = pixels(again(prompts, seed=5, use_sampler=False))
    assert np.array_equal(implicit, pixels(pipe(prompts, seed=5, use_sampler=False, **greedy)))
    assert not np.array_equal(implicit, pixels(pipe(prompts, seed=5, use_sampler=False)))
    with pytest.raises(ValueError, match="unknown generation settings"):
        StarPipeline(pipe.star, pipe.vqvae, pipe.text_encoder, generation={"temperature": 0.5})


def test_one_seed_per_prompt_makes_images_independent_of_the_batch(pipe):
    """With a list of seeds each prompt's images (two per prompt, top-k/top-p sampling, with and without the
    sampler head) get exactly the tokens they get when that prompt is generated alone with its seed."""
    prompts, seeds = ["a red circle", "two blue squares", "a large green triangle"], [11, 12, 13]
    for use_sampler in (False, True):
        kw = dict(num_images=2, use_sampler=use_sampler, top_k=50, top_p=0.9, return_tokens=True)
        _, batched = pipe(prompts, seed=seeds, **kw)
        for j, (prompt, seed) in enumerate(zip(prompts, seeds)):
            _, alone = pipe(prompt, seed=seed, **kw)
            _, alone_listed = pipe(prompt, seed=[seed], **kw)  # a list of one seed is the plain seed
            for b, a, a2 in zip(batched, alone, alone_listed):
                assert torch.equal(b[2 * j:2 * j + 2], a) and torch.equal(a, a2)
    with pytest.raises(ValueError, match="one seed per prompt"):
        pipe(prompts, seed=[1, 2])


def test_gumbel_smoothing_draws_per_prompt_generator(pipe):
    """STAR.generate's official Gumbel smoothing and per-group generators: rows drawn with generator i in a
    batch equal a batch of that group alone."""
    text = pipe.encode_text(["a red circle", "a blue square"], ["", ""])
    kw = dict(cfg=2.0, gumbel_smooth=True, return_tokens=True)
    _, batched = pipe.star.generate(pipe.vqvae, *text, generator=[torch.Generator().manual_seed(s) for s in (3, 4)],
                                    **kw)
    for row, seed in enumerate((3, 4)):
        one = tuple(t[[row, 2 + row]] for t in text)
        _, alone = pipe.star.generate(pipe.vqvae, *one, generator=torch.Generator().manual_seed(seed), **kw)
        assert all(torch.equal(b[row:row + 1], a) for b, a in zip(batched, alone))


def test_seeds_and_negative_prompt(pipe):
    kw = dict(top_k=0, top_p=0.0, cfg=3.0)
    a, b, c = (pixels(pipe("a red circle", seed=s, **kw)) for s in (1, 1, 2))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    d = pixels(pipe("a red circle", seed=1, negative_prompt="a green square", **kw))
    assert not np.array_equal(a, d)
    assert len(pipe(["x", "y"], num_images=3, seed=0)) == 6


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompts=[]), "nothing to generate"),
    (dict(prompts="a", num_images=0), "nothing to generate"),
    (dict(prompts="a", cfg=float("nan")), "cfg must be a finite number"),
    (dict(prompts="a", top_k=-1), "top_k must be >= 0"),
    (dict(prompts="a", top_p=1.5), r"top_p must lie in \[0, 1\]"),
    (dict(prompts="a", seed=2 ** 64), r"seed 18446744073709551616 is out of range: seeds lie in \[-2\*\*63"),
    (dict(prompts=["a", "b"], seed=[0, -2 ** 63 - 1]), "seed -9223372036854775809 is out of range"),
])
def test_bad_call_arguments_are_refused_before_generating(pipe, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pipe(**{"seed": 0, **kwargs})


def test_inpainting_keeps_unmasked_tokens_at_every_scale(pipe):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[:, 40:] = 255  # regenerate the right part
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    original = pipe.vqvae.img_to_idx(x)
    keep = keep_masks(torch.from_numpy(mask / 255.0)[None], pipe.star.cfg.patch_nums)
    for use_sampler in (False, True):
        _, tokens = pipe.edit("a red circle", image, Image.fromarray(mask), seed=3, top_k=0, top_p=0.0,
                              use_sampler=use_sampler, return_tokens=True)
        for s, (t, o, k) in enumerate(zip(tokens, original, keep)):
            assert torch.equal(t[k], o[k]), f"scale {s}"
        assert any(not torch.equal(t[~k], o[~k]) for t, o, k in zip(tokens, original, keep))
    # 4x4 scale: columns 0-1 are unmasked, column 2 is half masked (pixels 32..47, mask from 40): regenerated.
    assert keep[-1].view(4, 4).tolist() == [[True, True, False, False]] * 4


def test_edit_takes_a_mask_array_with_channels_and_refuses_other_shapes(pipe):
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[:32] = 255
    rgba = np.zeros((64, 64, 4), dtype=np.uint8)
    rgba[:32, :, 0] = 255  # masked where any channel is set
    settings = dict(seed=5, top_k=0, top_p=0.0, return_tokens=True)
    _, expected = pipe.edit("a red circle", image, Image.fromarray(mask), **settings)
    _, tokens = pipe.edit("a red circle", image, rgba, **settings)
    assert all(torch.equal(a, b) for a, b in zip(tokens, expected))
    with pytest.raises(ValueError, match=r"got shape \(1, 64, 64, 3\)"):
        pipe.edit("a red circle", image, rgba[None, ..., :3])


def test_seeds_as_an_array_are_one_per_prompt(pipe):
    _, expected = pipe(["x", "y"], seed=[3, 4], return_tokens=True)
    for seeds in (np.array([3, 4]), torch.tensor([3, 4])):
        _, tokens = pipe(["x", "y"], seed=seeds, return_tokens=True)
        assert all(torch.equal(a, b) for a, b in zip(tokens, expected))


def test_cpu_refuses_half_precision():
    from models.pipeline import resolve_dtype
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    with pytest.raises(ValueError, match="CUDA"):
        resolve_dtype("bf16", torch.device("cpu"))


def run_sample(args, torchrun=0):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"] \
        if torchrun else [sys.executable]
    return subprocess.run(prefix + [str(REPO / "sample.py")] + args, env=env, capture_output=True, text=True,
                          timeout=300, cwd=REPO)


def test_sample_py_prompt_file_metadata_and_resume(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "p")
    (tmp_path / "prompts.txt").write_text("a red circle\n\na blue square at the top\na green triangle\n")
    args = ["--ckpt", str(tmp_path / "p"), "--prompts", str(tmp_path / "prompts.txt"), "--out", str(tmp_path / "o"),
            "--seed", "5", "--top-k", "0", "--top-p", "0", "--grid"]
    proc = run_sample(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pngs = sorted(p.name for p in (tmp_path / "o").glob("0*.png"))
    assert pngs == ["000000_0.png", "000001_0.png", "000002_0.png"] and (tmp_path / "o" / "grid.png").is_file()
    meta = json.loads((tmp_path / "o" / "000001.json").read_text())
    assert meta["prompt"] == "a blue square at the top" and meta["seed"] == 6 and meta["use_sampler"] is True
    assert meta["cfg"] == 4.0 and meta["top_k"] == 0 and meta["files"] == ["000001_0.png"]
    # The same image from the pipeline with the recorded settings.
    settings = {k: meta[k] for k in ("negative_prompt", "cfg", "top_k", "top_p", "guidance_schedule", "use_sampler",
                                     "sampler_schedule", "num_images")}
    ours = np.asarray(pipe(meta["prompt"], seed=meta["seed"], **settings)[0]).astype(int)
    # Same tokens; the decoder's last bits depend on the thread count (the subprocess runs 1 thread).
    assert np.abs(ours - np.asarray(Image.open(tmp_path / "o" / "000001_0.png"))).max() <= 2
    again = run_sample(args)
    assert json.loads(again.stdout.strip().splitlines()[-1])["generated"] == 0  # resumed: nothing left to do
    # Items made otherwise are not passed off as this run's (they were: 'generated 0' and the old cfg's images)
    before = (tmp_path / "o" / "000000_0.png").read_bytes()
    (tmp_path / "prompts.txt").write_text("a red circle\na blue square at the top\na green triangle\n")  # same
    other = run_sample(args + ["--cfg", "2"])
    assert other.returncode == 2 and "000000.json was generated otherwise (cfg 4.0 -> 2.0)" in other.stderr
    assert (tmp_path / "o" / "000000_0.png").read_bytes() == before
    remade = run_sample(args + ["--cfg", "2", "--overwrite"])
    assert json.loads(remade.stdout.strip().splitlines()[-1])["generated"] == 3
    assert json.loads((tmp_path / "o" / "000002.json").read_text())["cfg"] == 2.0


def test_sample_py_geneval_layout(pipe, tmp_path):
    """--layout geneval: the folders GenEval's evaluate_images.py walks (numbered item folders, each with its
    metadata as one JSON object and samples/NNNN.png), holding the same images as the flat layout."""
    pipe.save_pretrained(tmp_path / "p")
    metadata = [{"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": "a photo of a circle"},
                {"tag": "colors", "include": [{"class": "square", "count": 1, "color": "red"}],
                 "prompt": "a photo of a red square"}]
    (tmp_path / "evaluation_metadata.jsonl").write_text("\n".join(json.dumps(m) for m in metadata))
    common = ["--ckpt", str(tmp_path / "p"), "--prompts", str(tmp_path / "evaluation_metadata.jsonl"),
              "--num-images", "2", "--seed", "42"]
    args = common + ["--layout", "geneval", "--out", str(tmp_path / "g")]
    proc = run_sample(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert run_sample(common + ["--out", str(tmp_path / "flat")]).returncode == 0
    folders = sorted(d.name for d in (tmp_path / "g").iterdir() if d.is_dir() and d.name.isdigit())
    assert folders == ["00000", "00001"]
    for i, folder in enumerate(folders):
        assert json.loads((tmp_path / "g" / folder / "metadata.jsonl").read_text()) == metadata[i]
        sample_dir = tmp_path / "g" / folder / "samples"
        samples = sorted(f.name for f in sample_dir.iterdir() if re.match(r"\d+\.png", f.name))
        assert samples == ["0000.png", "0001.png"]
        assert json.loads((tmp_path / "g" / folder / "item.json").read_text())["seed"] == 42 + i
        for k, name in enumerate(samples):
            ours = np.asarray(Image.open(sample_dir / name))
            assert np.array_equal(ours, np.asarray(Image.open(tmp_path / "flat" / f"{i:06d}_{k}.png")))
    again = run_sample(args)
    assert json.loads(again.stdout.strip().splitlines()[-1])["generated"] == 0  # resumed: nothing left to do


def test_sample_py_torchrun_shards_without_duplicates(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "p")
    lines = [json.dumps({"prompt": f"a red circle number {i}", "seed": 100 + i}) for i in range(5)]
    (tmp_path / "items.jsonl").write_text("\n".join(lines))
    args = ["--ckpt", str(tmp_path / "p"), "--prompts", str(tmp_path / "items.jsonl"), "--out", str(tmp_path / "o"),
            "--top-k", "0", "--top-p", "0"]
    proc = run_sample(args, torchrun=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The ranks share one stdout, so their one-line reports may arrive on one line: decode object by object.
    decoder, text, reports = json.JSONDecoder(), proc.stdout, []
    pos = text.find("{")
    while pos != -1:
        report, end = decoder.raw_decode(text, pos)
        reports.append(report)
        pos = text.find("{", end)
    assert sorted(r["generated"] for r in reports) == [2, 3]
    metas = [json.loads((tmp_path / "o" / f"{i:06d}.json").read_text()) for i in range(5)]
    assert [m["seed"] for m in metas] == [100, 101, 102, 103, 104]
    single = run_sample(args[:-4] + ["--out", str(tmp_path / "one"), "--top-k", "0", "--top-p", "0"])
    batched = run_sample(args[:-4] + ["--out", str(tmp_path / "b3"), "--top-k", "0", "--top-p", "0",
                                      "--batch-size", "3"])
    assert single.returncode == 0 and batched.returncode == 0
    assert [json.loads((tmp_path / "b3" / f"{i:06d}.json").read_text())["seed"] for i in range(5)] == \
        [100, 101, 102, 103, 104]
    for i in range(5):
        a, b, c = (np.asarray(Image.open(tmp_path / d / f"{i:06d}_0.png")).astype(int) for d in ("o", "one", "b3"))
        assert np.array_equal(a, b)  # sharding does not change any image
        # Nor does batching: the decoder's rounding differs between batch sizes by at most one grey level in a
        # few pixels (a different token would change a whole patch).
        assert np.abs(a - c).max() <= 1 and (a != c).mean() < 1e-3


def test_eval_shapes_script_writes_table_and_examples(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "p")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "eval_shapes.py"), "--ckpt", str(tmp_path / "p"),
                           "--count", "6", "--batch-size", "4", "--compare-sampler", "--out", str(tmp_path / "e")],
                          env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "e" / "judge.json").read_text())
    for run in ("with_sampler", "without_sampler"):
        summary = report[run]["summary"]
        assert summary["overall"]["n"] == 6 and summary["one"]["n"] == 3 and summary["two"]["n"] == 3
        assert 0 <= summary["overall"]["all_correct"] <= 1
        assert len(report[run]["prompts"]) == 6
        assert Image.open(tmp_path / "e" / f"examples_{run}.png").size[0] == 4 * 128
    assert "all_correct" in proc.stdout


def test_eval_shapes_on_a_pipeline_without_a_head(pipe, tmp_path, capsys):
    """The backbone samples when there is no head (it used to stop unless --no-sampler was given); asking to
    compare with a head that is not there, or a malformed --forced-scales, is an input error (exit 2)."""
    from tests.helpers import load_script
    StarPipeline(pipe.star, pipe.vqvae, pipe.text_encoder, None, text_config=pipe.text_config).save_pretrained(
        tmp_path / "p")
    eval_shapes = load_script("eval_shapes")
    argv = ["--ckpt", str(tmp_path / "p"), "--count", "2", "--out", str(tmp_path / "e")]
    assert cli.run(eval_shapes.main, argv) == 0
    report = json.loads((tmp_path / "e" / "judge.json").read_text())
    assert report["result"]["use_sampler"] is False and report["result"]["summary"]["overall"]["n"] == 2
    assert cli.run(eval_shapes.main, argv + ["--compare-sampler"]) == 2
    assert "has no sampler head to compare with" in capsys.readouterr().err
    assert cli.run(eval_shapes.main, argv + ["--forced-scales", "0,x"]) == 2
    assert "--forced-scales takes comma-separated integers" in capsys.readouterr().err


def test_eval_with_every_scale_forced_gives_the_vqvae_reconstructions(pipe):
    """The ceiling diagnosis: forcing every scale to the reference image's tokens must reproduce the VQ-VAE's own
    reconstruction (computed here by the independent img_to_idx -> idx_to_img path); forcing none is the plain run."""
    from metrics.shapes_eval import evaluate_pipeline, heldout_samples, reference_images

    n = 4
    forced = evaluate_pipeline(pipe, count=n, batch_size=n, forced_scales=pipe.star.num_scales, cfg=2.0, top_k=0,
                               top_p=0.0, use_sampler=True)
    ref = reference_images(heldout_samples(n), pipe.vqvae.cfg.image_size)
    with torch.no_grad():
        rec = pipe.vqvae.idx_to_img(pipe.vqvae.img_to_idx(ref))
    expected = rec.add(1).mul(127.5).round().clamp(0, 255).permute(0, 2, 3, 1).numpy()
    assert np.abs(pixels(forced["images"]).astype(np.float32) - expected).max() <= 1
    free = evaluate_pipeline(pipe, count=n, batch_size=n, forced_scales=0, cfg=2.0, top_k=0, top_p=0.0)
    plain = pipe([s.caption for s in heldout_samples(n)], seed=0, cfg=2.0, top_k=0, top_p=0.0)
    assert np.array_equal(pixels(free["images"]), pixels(plain))
    assert not np.array_equal(pixels(free["images"]), pixels(forced["images"]))


def test_saved_text_config_rebuilds_the_same_tiny_encoder(pipe, tmp_path):
    one_layer = build_text_encoder("tiny", layers=1)
    custom = StarPipeline(pipe.star, pipe.vqvae, one_layer, pipe.sampler,
                          text_config={"encoder": "tiny", "path": None, "tiny_layers": 1})
    custom.save_pretrained(tmp_path / "p")
    loaded = StarPipeline.from_pretrained(tmp_path / "p")
    assert loaded.text_encoder.identity == one_layer.identity != pipe.text_encoder.identity


def test_text_encoder_options_keep_what_the_directory_records(pipe, tmp_path, capsys):
    """--text-encoder naming the recorded kind keeps its recorded settings (it used to rebuild the tiny encoder at
    its default depth, a different encoder); --text-encoder-path alone moves the weights (it used to be ignored,
    so a pipeline trained elsewhere could not find its CLIP)."""
    one_layer = build_text_encoder("tiny", layers=1)
    StarPipeline(pipe.star, pipe.vqvae, one_layer, pipe.sampler,
                 text_config={"encoder": "tiny", "path": None, "tiny_layers": 1}).save_pretrained(tmp_path / "tiny")
    assert StarPipeline.from_pretrained(tmp_path / "tiny", text_encoder="tiny").text_encoder.identity == \
        one_layer.identity
    # Another kind starts afresh: nothing recorded for the tiny encoder applies to it.
    with pytest.raises(TextEncoderError, match="needs a local path"):
        StarPipeline.from_pretrained(tmp_path / "tiny", text_encoder="open_clip")

    clip = tmp_path / "clip"
    StarPipeline(pipe.star, pipe.vqvae, pipe.text_encoder, pipe.sampler,
                 text_config={"encoder": "hf-clip", "path": "/models/elsewhere"}).save_pretrained(clip)
    moved = str(tmp_path / "here")
    for argv in (["--text-encoder-path", moved], ["--text-encoder", "hf-clip", "--text-encoder-path", moved]):
        assert cli.run(sample.main, ["--ckpt", str(clip), "--prompt", "a", "--out", str(tmp_path / "o"), *argv]) == 2
        assert f"no CLIP text encoder at {moved}" in capsys.readouterr().err
