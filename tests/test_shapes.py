import numpy as np
import pytest
import torch

from metrics.shapes_judge import format_table, judge, mcnemar_p, paired_comparison, parse_prompt, summarize
from models.text_encoder import TinyTextEncoder
from utils.data.shapes import caption_vocabulary, is_held_out, make_sample, render


def test_same_seed_same_data_and_different_seed_different():
    a, b = make_sample(7, "train", seed=0), make_sample(7, "train", seed=0)
    assert a == b and np.array_equal(np.asarray(render(a, 64)), np.asarray(render(b, 64)))
    assert any(make_sample(i, seed=0) != make_sample(i, seed=1) for i in range(5))


def test_held_out_combinations_never_appear_in_training():
    train = [make_sample(i, "train") for i in range(3000)]
    held = [make_sample(i, "heldout") for i in range(300)]
    assert not any(is_held_out(s) for s in train)
    assert all(is_held_out(s) for s in held)
    assert {s.kind for s in held} == {"one", "two"}
    train_caps = {s.caption for s in train}
    assert not train_caps & {s.caption for s in held}


def test_judge_accepts_ground_truth_renders():
    """>= 99% all-correct on 500 ground-truth samples (both splits, 64 and 128 px, with texture)."""
    verdicts = []
    for i in range(250):
        for split, size in (("train", 64), ("heldout", 128)):
            s = make_sample(i, split)
            verdicts.append(judge(render(s, size, texture=0.5, seed=i), s.caption)["all_correct"])
    assert np.mean(verdicts) >= 0.99


def test_judge_rejects_noise_and_wrong_prompts():
    rng = np.random.default_rng(0)
    noise = [judge(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), make_sample(i).caption)["all_correct"]
             for i in range(100)]
    assert np.mean(noise) <= 0.02
    blank = np.full((64, 64, 3), 232, dtype=np.uint8)
    assert not judge(blank, "a red circle at the top left")["all_correct"]
    wrong = []
    for i in range(200):
        s, other = make_sample(i), make_sample(i + 1000)
        if s.caption != other.caption:
            wrong.append(judge(render(s, 64), other.caption)["all_correct"])
    assert np.mean(wrong) <= 0.05


@pytest.mark.parametrize("prompt,attr", [
    ("a small red circle at the top left", "size"), ("a large red circle at the top left", None)])
def test_judge_checks_each_attribute(prompt, attr):
    s = make_sample(0, kind="one")
    s.objects[0].color, s.objects[0].shape, s.objects[0].size = "red", "circle", "large"
    s.objects[0].cx, s.objects[0].cy = 1 / 6, 1 / 6
    verdict = judge(render(s, 64), prompt)
    assert verdict["all_correct"] == (attr is None)
    if attr:
        assert verdict[attr] is False and verdict["color"] and verdict["position"]
    swapped = judge(render(s, 64), "a red square at the top left")
    assert swapped["shape"] is False and swapped["color"] is True
    moved = judge(render(s, 64), "a red circle at the bottom right")
    assert moved["position"] is False and moved["shape"] is True


def test_parse_prompt_and_table():
    assert parse_prompt("a blue square to the right of a yellow triangle")["relation"] == "to the right of"
    with pytest.raises(ValueError, match="not a shapes prompt"):
        parse_prompt("a cat")
    table = format_table(summarize([{"count": True, "all_correct": True}], ["one"]))
    assert "all_correct" in table and "one" in table


def test_tiny_encoder_distinguishes_every_caption():
    caps = caption_vocabulary()
    assert len(caps) > 2000
    enc = TinyTextEncoder(seed=0)
    pooled = torch.cat([enc.encode(caps[i:i + 256])[2] for i in range(0, len(caps), 256)])
    dist = torch.cdist(pooled, pooled)
    dist.fill_diagonal_(float("inf"))
    assert dist.min() > 1e-3  # every pair of distinct captions is separated


def test_mcnemar_p_matches_the_binomial_test():
    from scipy.stats import binomtest

    assert mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(0, 5) == 2 / 32                      # closed form: both all-one-sided splits of 5
    for only_a, only_b in ((3, 9), (10, 10), (1, 20), (17, 4)):
        expected = binomtest(only_a, only_a + only_b, 0.5).pvalue
        assert abs(mcnemar_p(only_a, only_b) - expected) < 1e-12


def test_paired_comparison_counts_discordant_prompts():
    a = [{"count": True, "color": True, "all_correct": True, "relation": None}] * 3 + \
        [{"count": False, "color": True, "all_correct": False, "relation": True}]
    b = [{"count": False, "color": True, "all_correct": False, "relation": None}] * 3 + \
        [{"count": True, "color": True, "all_correct": False, "relation": False}]
    res = paired_comparison(a, b, ["one", "one", "one", "two"])
    assert res["overall"]["count"] == {"n": 4, "only_a": 3, "only_b": 1, "difference": 0.5, "p_value": 0.625}
    assert res["overall"]["color"]["only_a"] == res["overall"]["color"]["only_b"] == 0
    assert res["overall"]["relation"]["n"] == 1 and res["two"]["relation"]["only_a"] == 1
    assert res["one"]["all_correct"]["difference"] == 1.0
    with pytest.raises(ValueError, match="same prompts"):
        paired_comparison(a, b[:2])
