import os

import pytest
import torch

from models.text_cache import CachedTextEncoder
from models.text_encoder import (
    CLIP_VOCAB_SIZE,
    HFClipEncoder,
    OpenClipEncoder,
    TextEncoderError,
    TinyTextEncoder,
    build_text_encoder,
    clip_bpe_tokenizer,
    open_clip_to_hf_clip,
    text_encoder_from_config,
)
from utils.cli import InputError

PROMPTS = ["a red circle at the top left", "", "a small blue square to the right of a yellow triangle"]


@pytest.fixture(scope="module")
def tiny():
    return TinyTextEncoder(width=64, layers=2, heads=2, seed=0)


def test_tiny_shapes_masks_and_empty_prompt(tiny):
    hidden, mask, pooled = tiny.encode(PROMPTS)
    assert hidden.shape == (3, 77, 64) and mask.shape == (3, 77) and pooled.shape == (3, 64)
    assert mask.dtype == torch.long and tiny.dim == 64 and tiny.max_length == 77
    # "" is <start><end>: two valid tokens; masks are 1..1 0..0
    assert mask[1].tolist() == [1, 1] + [0] * 75
    n = mask.sum(1)
    assert all(mask[i, : n[i]].all() and not mask[i, n[i]:].any() for i in range(3))
    assert (hidden[mask == 0] == 0).all() and (hidden[mask == 1].abs().sum(-1) > 0).all()


def test_tiny_is_deterministic_and_leaves_global_rng_alone(tiny):
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    again = TinyTextEncoder(seed=0)
    assert torch.equal(torch.rand(3), before)
    for a, b in zip(tiny.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    assert not torch.equal(next(iter(TinyTextEncoder(seed=1).parameters())), next(iter(tiny.parameters())))


def test_truncation_at_max_length(tiny):
    hidden, mask, _ = tiny.encode(["word " * 200])
    assert mask.sum() == 77 and hidden.shape[1] == 77


def test_open_clip_and_hf_clip_agree_on_the_same_weights(tiny, tmp_path):
    """Convert the tiny open_clip tower into a transformers CLIPTextModel folder (+ the offline-built BPE
    tokenizer) and check that both back-ends give the same hidden states, masks and pooled vectors."""
    hf = open_clip_to_hf_clip(tiny.tower)
    hf.save_pretrained(tmp_path / "text_encoder")
    clip_bpe_tokenizer().save_pretrained(tmp_path / "tokenizer")
    enc = HFClipEncoder(tmp_path)
    h1, m1, p1 = tiny.encode(PROMPTS)
    h2, m2, p2 = enc.encode(PROMPTS)
    assert torch.equal(m1, m2)
    assert (h1 - h2).abs().max() < 1e-5 and (p1 - p2).abs().max() < 1e-5


def test_first_layers_only(tiny):
    sub = OpenClipEncoder("", model=tiny.tower, num_layers=1, identity="x")
    sub.tokenizer = tiny.tokenizer
    assert not torch.allclose(sub.encode(PROMPTS)[0], tiny.encode(PROMPTS)[0])


def test_offline_bpe_tokenizer_has_the_full_vocabulary():
    tok = clip_bpe_tokenizer()
    assert len(tok) == CLIP_VOCAB_SIZE
    ids = tok(["a red circle"])["input_ids"][0]
    assert ids[0] == 49406 and ids[-1] == 49407 and len(ids) == 5


def test_missing_weights_name_the_path(tmp_path):
    with pytest.raises(TextEncoderError, match=str(tmp_path / "nope")):
        build_text_encoder("hf-clip", str(tmp_path / "nope"))
    with pytest.raises(TextEncoderError, match="needs a local path"):
        build_text_encoder("t5", None)
    with pytest.raises(TextEncoderError, match="weights not found"):
        build_text_encoder("open_clip", str(tmp_path / "x.bin"))


def test_cache_is_identical_to_direct_encoding(tiny, tmp_path):
    cached = CachedTextEncoder(tiny, tmp_path / "cache")
    direct = tiny.encode(PROMPTS)
    first = cached.encode(PROMPTS)
    assert cached.misses == 3 and len(cached) == 3
    second = cached.encode(PROMPTS[::-1])
    assert cached.hits == 3
    for a, b, c in zip(direct, first, second):
        assert torch.equal(a, b) and torch.equal(a, c.flip(0))
    cached.close()
    # another encoder identity does not collide
    other = CachedTextEncoder(TinyTextEncoder(seed=5), tmp_path / "cache")
    other.encode(PROMPTS[:1])
    assert other.misses == 1


def test_cache_grows_a_full_map_and_adopts_one_another_process_grew(tiny, tmp_path):
    """The map started at 64 GB and never grew: SD 2.1 CLIP features of ~1M captions ended a run in MapFullError."""
    import subprocess
    import sys

    from tests.helpers import REPO
    prompts = [f"a red circle number {i} at the top left" for i in range(60)]
    small = 2 ** -14  # 64 KiB: a few entries of 64-d states
    cached = CachedTextEncoder(tiny, tmp_path / "cache", map_size_gb=small)
    start = cached.env.info()["map_size"]
    for b in range(0, 60, 20):
        cached.encode(prompts[b:b + 20])
    assert cached.misses == 60 and len(cached) == 60 and cached.env.info()["map_size"] > start
    for a, b in zip(tiny.encode(prompts), cached.encode(prompts)):
        assert torch.equal(a, b)
    assert cached.hits == 60
    # Another process (a second DDP rank) grows the map further; this one then reads what it wrote
    more = [f"a blue square number {i} below a green triangle" for i in range(200)]
    writer = ("import sys; from models.text_cache import CachedTextEncoder; from models.text_encoder import "
              "TinyTextEncoder; c = CachedTextEncoder(TinyTextEncoder(width=64, layers=2, heads=2, seed=0), "
              f"sys.argv[1], map_size_gb={small}); c.encode({more!r}); print(c.env.info()['map_size'])")
    run = subprocess.run([sys.executable, "-c", writer, str(tmp_path / "cache")], cwd=REPO, capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stderr[-2000:]
    assert int(run.stdout) > cached.env.info()["map_size"]
    for a, b in zip(tiny.encode(more), cached.encode(more)):
        assert torch.equal(a, b)
    assert cached.hits == 260 and cached.env.info()["map_size"] == int(run.stdout)
    cached.close()


def test_t5_backend_shapes_and_pooling(tmp_path):
    """A tiny random T5 encoder folder (with the offline CLIP BPE tokenizer standing in for T5's
    sentencepiece vocabulary, which is not available offline): both pooling modes."""
    from transformers import T5Config, T5EncoderModel
    torch.manual_seed(0)
    T5EncoderModel(T5Config(vocab_size=CLIP_VOCAB_SIZE, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                            num_heads=4)).save_pretrained(tmp_path)
    clip_bpe_tokenizer().save_pretrained(tmp_path)
    enc_all = build_text_encoder("t5", str(tmp_path))
    enc_valid = build_text_encoder("t5", str(tmp_path), pooling="mean_valid")
    hidden, mask, pooled = enc_all.encode(PROMPTS)
    assert hidden.shape == (3, 120, 32) and mask.shape == (3, 120) and enc_all.dim == 32
    assert mask[1].sum() == 2
    _, _, pooled_valid = enc_valid.encode(PROMPTS)
    tok = enc_all.tokenizer(PROMPTS, padding="max_length", max_length=120, return_tensors="pt")
    raw = enc_all.model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).last_hidden_state
    assert torch.allclose(pooled, raw.mean(1), atol=1e-6)  # official: padding included
    n = mask.sum(1, keepdim=True)
    assert torch.allclose(pooled_valid, hidden.sum(1) / n, atol=1e-6)


def test_minilm_backend_is_pretrained_and_offline():
    enc = build_text_encoder("minilm")
    hidden, mask, pooled = enc.encode(["a red circle", "a blue square", ""])
    assert hidden.shape == (3, 77, 384) and enc.dim == 384 and mask[2].sum() == 2  # [CLS] [SEP]
    sim = torch.nn.functional.cosine_similarity(pooled[0], pooled[1], dim=0)
    assert 0.0 < sim < 0.99


def test_cache_text_script_covers_packed_captions_with_the_runs_encoder(tmp_path, capsys):
    """With --config the cache holds what training with that config looks up (it used to build the tiny encoder
    at its default depth whatever the run used: the shapes runs' one-layer encoder missed every entry)."""
    import json

    from models.text_cache import CachedTextEncoder
    from tests.helpers import load_script
    from utils.data.pack import PackOptions, pack, shapes_items
    from utils.data.shapes import make_sample
    pack(shapes_items(30), tmp_path / "data", PackOptions(shard_size=16))
    text = {"encoder": "tiny", "tiny_layers": 1, "cache_dir": str(tmp_path / "cache")}
    (tmp_path / "run.json").write_text(json.dumps({"stage": "star", "text": text}))
    cache_text = load_script("cache_text")

    def run(*extra):
        assert cache_text.main(["--data", str(tmp_path / "data"), "--config", str(tmp_path / "run.json"), *extra]) == 0
        return json.loads(capsys.readouterr().out)
    first, second = run(), run()
    assert first["entries"] == first["captions"] == first["newly_encoded"] and second["newly_encoded"] == 0
    assert ":l1:" in first["encoder"] and first["skipped_records"] == 0
    training = CachedTextEncoder(text_encoder_from_config({**text, "path": None}), text["cache_dir"])
    training.encode([make_sample(i).caption for i in range(30)] + [""])
    assert training.misses == 0 and training.hits == 31
    training.close()
    # A flag overrides the file: another depth is another encoder, so every caption is new to the cache.
    other = run("--tiny-layers", "2")
    assert ":l2:" in other["encoder"] and other["newly_encoded"] == first["captions"]
    # A folder without shards (here the pack's parent) was a silent success that cached only "".
    with pytest.raises(InputError, match=f"no complete LMDB shards in {tmp_path}"):
        cache_text.main(["--data", str(tmp_path), "--config", str(tmp_path / "run.json")])


def test_tiny_layers_from_config_and_word_identity():
    """text.tiny_layers picks the tiny encoder's depth (part of its identity, so caches never mix). With one
    layer, two colour words at the same position stay far apart; the 2-layer default nearly merges them."""
    one = text_encoder_from_config({"encoder": "tiny", "path": None, "tiny_layers": 1})
    two = text_encoder_from_config({"encoder": "tiny", "path": None})
    assert ":l1:" in one.identity and ":l2:" in two.identity
    assert len(one.tower.transformer.resblocks) == 1

    def colour_cosine(enc):
        hidden, _, _ = enc.encode(["a red circle", "a blue circle"])
        return torch.nn.functional.cosine_similarity(hidden[0, 2], hidden[1, 2], dim=0).item()
    assert colour_cosine(one) < 0.6 < 0.9 < colour_cosine(two)
