"""The sampler head against the official implementation, and the refinement schedule's invariants.

What the golden data lets us compare, and why (see ``rng_note`` in tiny_star_sampler_golden.json):
- With top-k 1 every token-sampling call returns the argmax, so the indices of every call (three backbone
  scales, then eight refinement steps on the last scale) are independent of any RNG: compared exactly.
- Which positions a refinement step *commits* is random in the first five steps, and the official code draws
  those scores from the global torch RNG (plus one discarded draw per step). Our generation takes them from
  its one generator; to compare the committed tokens (h_3) and the image we replay the official stream
  through ``sampler_noise`` (``metrics.parity.OfficialPositionNoise``). A test below shows that the '1024'
  comparison does depend on that stream, so it is not vacuous.
"""
import json

import pytest
import torch

from metrics.parity import (
    IMAGE_TOL_FACTOR,
    OfficialPositionNoise,
    _load,
    build_reference_sampler,
    build_reference_vqvae,
)
from models import build_star, star_config
from models.sampler import SamplerHead, arccos_counts, split_official_state_dict, visible_probability
from tests.helpers import read_manifest, run_check_parity


@pytest.fixture(scope="module")
def reference(reference_dir):
    meta = json.loads((reference_dir / "tiny_star_sampler_golden.json").read_text())
    golden = _load(reference_dir / "tiny_star_sampler_golden.safetensors")
    text_golden = _load(reference_dir / "tiny_star_golden.safetensors")
    text = tuple(text_golden[k] for k in ("enc_hidden", "enc_mask", "enc_pooled"))
    vae = build_reference_vqvae(reference_dir)
    star, head = build_reference_sampler(reference_dir, meta, vae)
    return meta, golden, text, vae, star, head


def test_check_parity_sampler_passes(reference_dir):
    rc, result = run_check_parity(reference_dir, "sampler")
    tensors = result["parts"]["sampler"]["tensors"]
    failed = {k: v for k, v in tensors.items() if not v["ok"]}
    assert rc == 0 and result["pass"] and not failed, failed
    for tag in ("vnew", "v1024"):
        assert all(tensors[f"{tag}.call{j:02d}.idx"]["match"] == 1.0 for j in range(11))
        assert tensors[f"{tag}.h_3"]["max_abs"] == 0.0 and tensors[f"{tag}.img"]["max_abs"] <= 1e-5 * IMAGE_TOL_FACTOR


def test_head_keys_are_the_official_extra_keys(reference, reference_dir):
    meta, *_ = reference
    state = _load(reference_dir / "tiny_star_sampler_state.safetensors")
    _, head_state = split_official_state_dict(state)
    assert sorted(head_state) == sorted(meta["sampler_extra_keys"])
    head = reference[5]
    del head_state["head_proj.weight"]
    with pytest.raises(RuntimeError, match="head_proj.weight"):
        head.load_state_dict(head_state, strict=True)


def test_d30_head_matches_the_official_manifest(reference_dir):
    cfg = star_config("star-d30", 1024)
    with torch.device("meta"):
        head = SamplerHead(cfg, sample_from=9)
    rows = [line.split("\t") for line in (reference_dir / "manifest_star_d30_sampler.txt").read_text().splitlines()
            if line.endswith("SAMPLER")]
    assert [(k, list(v.shape)) for k, v in head.state_dict().items()] == [(r[0], json.loads(r[1])) for r in rows]
    with torch.device("meta"):
        star = build_star(cfg, init=False)
    # Backbone + head = the full official sampler checkpoint, key for key.
    ours = sorted([k for k in star.state_dict()] + [k for k in head.state_dict()])
    assert ours == sorted(k for k, _ in read_manifest(reference_dir / "manifest_star_d30_sampler.txt"))


def test_refinement_depends_on_the_replayed_position_stream(reference):
    """Control for the parity check: another position stream commits other positions in the '1024' version."""
    meta, golden, text, vae, star, head = reference
    args = meta["infer_args"]["v1024"]
    _, tokens = star.generate(vae, *text, cfg=args["cfg"], top_k=1, generator=torch.Generator().manual_seed(0),
                              sampler=head, sampler_schedule="official-1024",
                              sampler_noise=OfficialPositionNoise(args["torch_manual_seed_before_call"] + 1),
                              return_tokens=True)
    h3 = vae.quantize.embedding.weight[tokens[3]].transpose(1, 2).reshape(golden["v1024.h_3"].shape)
    assert (h3 - golden["v1024.h_3"]).abs().max() > 0.1


@pytest.mark.parametrize("n,steps,expected", [
    # The official counts listed in official_star.md (computed there by the official Scheduler).
    (16 * 16, 8, [1, 18, 26, 32, 38, 43, 48, 50]),
    (21 * 21, 8, [1, 31, 44, 55, 65, 74, 82, 89]),
    (48 * 48, 8, [1, 162, 232, 289, 338, 384, 428, 470]),
    (64 * 64, 15, [1, 106, 151, 186, 216, 243, 268, 292, 314, 336, 357, 377, 397, 417, 435]),
    (64 * 64, 8, [1, 288, 413, 513, 601, 683, 761, 836]),
])
def test_arccos_counts_match_the_official_tables(n, steps, expected):
    assert arccos_counts(n, steps) == expected


@pytest.mark.parametrize("steps", [1, 5, 8, 15])
def test_arccos_counts_fill_small_scales(steps):
    """Every scale size gets a valid plan: counts >= 0 summing to n, at most ``steps`` steps (the official rule
    alone gives n=4 at 8 steps a last step of -3)."""
    for n in range(1, 300):
        counts = arccos_counts(n, steps)
        assert sum(counts) == n and min(counts) >= 0 and len(counts) <= steps, (n, counts)


def test_head_refines_scales_smaller_than_its_step_count(reference):
    """A head from scale 1 on (2x2 = 4 tokens < 8 steps): one token per step there, every position once."""
    meta, golden, text, vae, star, _ = reference
    torch.manual_seed(0)
    head = SamplerHead(star.cfg, sample_from=1)
    head.init_weights()
    committed_per_step = []
    _, tokens = star.generate(
        vae, *text, cfg=2.0, top_k=0, top_p=0.0, generator=torch.Generator().manual_seed(0), sampler=head,
        return_tokens=True, sampler_step_callback=lambda step, idx, c: committed_per_step.append(c.sum(1)))
    sizes = [pn * pn for pn in star.cfg.patch_nums[1:]]
    assert len(committed_per_step) == sum(min(n, 8) for n in sizes)
    begin = 0
    for n in sizes:  # the committed count grows to n on every scale
        steps = committed_per_step[begin:begin + min(n, 8)]
        assert (steps[-1] == n).all() and all((a <= b).all() for a, b in zip(steps, steps[1:]))
        begin += min(n, 8)
    assert all(((t >= 0) & (t < star.cfg.vocab_size)).all() for t in tokens)


def test_visible_fraction_has_mean_two_over_pi():
    r = torch.rand(200_000, generator=torch.Generator().manual_seed(0))
    assert abs(visible_probability(r).mean().item() - 2 / torch.pi) < 3e-3


@pytest.mark.parametrize("schedule", ["default", "official-1024"])
def test_refinement_commits_every_position_once_and_never_resamples(reference, schedule):
    meta, golden, text, vae, star, head = reference
    seen = []
    _, tokens = star.generate(
        vae, *text, cfg=2.0, top_k=0, top_p=0.0, generator=torch.Generator().manual_seed(3), sampler=head,
        sampler_schedule=schedule, return_tokens=True,
        sampler_step_callback=lambda step, idx, committed: seen.append((idx.clone(), committed.clone())))
    n = 16
    assert len(seen) == 8
    counts = arccos_counts(n, 8)
    final = tokens[3]
    previous = torch.zeros(2, n, dtype=torch.bool)
    for k, (idx, committed) in enumerate(seen):
        new = committed & ~previous
        assert (previous <= committed).all()  # monotone
        if schedule == "default":  # one commit per step; the '1024' backbone steps commit twice
            assert (new.sum(1) == counts[k]).all()
        assert (final[new] == idx[new]).all()  # the token of a committed position is the one sampled then
        previous = committed
    assert previous.all()


def test_training_mask_is_block_diagonal_with_open_text_token(reference):
    *_, star, _ = reference
    head = SamplerHead(star.cfg, sample_from=2)  # two sampler scales (3x3 and 4x4)
    mask = head.training_mask(star)
    sampler_levels = star.level_ids[star.scale_begins[head.sample_from]:].tolist()
    n = len(sampler_levels)
    naive = torch.zeros(n + 1, n + 1, dtype=torch.bool)
    for i in range(n + 1):
        for j in range(n + 1):
            naive[i, j] = i == 0 or j == 0 or sampler_levels[i - 1] == sampler_levels[j - 1]
    assert torch.equal(mask, naive)


def test_official_sampler_file_converts_and_round_trips(reference, reference_dir, tmp_path):
    """An official train_sampler.py checkpoint (one flat dict in a trainer dict) -> backbone + head -> our
    directory format -> the same greedy generation."""
    from models.checkpoint import (
        load_official_star_and_sampler,
        load_pretrained_sampler,
        load_pretrained_star,
        save_pretrained,
    )
    meta, golden, text, vae, star, head = reference
    state = _load(reference_dir / "tiny_star_sampler_state.safetensors")
    path = tmp_path / "ar-ckpt-last.pth"
    torch.save({"trainer": {"var_wo_ddp": state}}, path)
    star2, head2 = load_official_star_and_sampler(path, config=star.cfg, sample_from=head.sample_from)
    save_pretrained(tmp_path / "ours", star2, vae, sampler=head2)
    star3 = load_pretrained_star(tmp_path / "ours")
    head3 = load_pretrained_sampler(tmp_path / "ours", star3.cfg)
    args = meta["infer_args"]["vnew"]
    kw = dict(cfg=args["cfg"], top_k=1, generator=None, sampler_schedule="default")
    img = star3.generate(vae, *text, sampler=head3, sampler_noise=OfficialPositionNoise(1006), **kw)
    assert (img - golden["vnew.img"]).abs().max() <= 1e-5 * IMAGE_TOL_FACTOR
