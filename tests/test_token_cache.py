"""star_train.token_cache: a record's VQ-VAE tokens are encoded once and reused, with no effect on training."""
import pytest
import torch

from tests.train_helpers import final_state, make_vqvae_dir, run_train, star_overrides
from trainer.config import RunConfig
from trainer.star_stage import StarStage
from utils.config import ConfigError, load_config


@pytest.fixture(scope="module")
def vqvae_dir(tmp_path_factory):
    return make_vqvae_dir(tmp_path_factory.mktemp("vq") / "vqvae")


def _stage(tmp_path, vqvae_dir, **extra):
    args = star_overrides(tmp_path / "run", vqvae_dir, **extra)
    return StarStage(load_config(RunConfig, None, args), torch.device("cpu"))


def test_cached_tokens_equal_fresh_ones_and_only_new_records_are_encoded(tmp_path, vqvae_dir):
    stage = _stage(tmp_path, vqvae_dir, **{"star_train.token_cache": "true"})
    encoded = []

    def counting_encode(img):
        encoded.append(len(img))
        return StarStage.encode_tokens(stage, img)

    stage.encode_tokens = counting_encode
    images = torch.rand(6, 3, 8, 8) * 2 - 1
    reference = StarStage.encode_tokens(stage, images)                     # (6, 21) without any cache
    first = {"image": images[:4], "record": torch.tensor([0, 1, 2, 3]), "caption": [""] * 4}
    gt, var_input = stage.tokens(first, stage.token_cache)
    assert encoded == [4] and torch.equal(gt, reference[:4])
    # a later batch: two records seen before (in another order), two new ones
    second = {"image": images[[5, 1, 4, 0]], "record": torch.tensor([5, 1, 4, 0]), "caption": [""] * 4}
    gt2, var_input2 = stage.tokens(second, stage.token_cache)
    assert encoded == [4, 2] and torch.equal(gt2, reference[[5, 1, 4, 0]])
    assert torch.equal(var_input2[1], var_input[1]) and torch.equal(var_input2[3], var_input[0])
    assert len(stage.token_cache.tokens) == 6
    assert next(iter(stage.token_cache.tokens.values())).dtype == torch.int16  # 64 codes: 2 bytes per token


def test_token_cache_refuses_random_augmentation(tmp_path, vqvae_dir):
    for aug in ({"data.hflip": "true"}, {"data.random_crop": 0.1}):
        with pytest.raises(ConfigError, match="token_cache"):
            load_config(RunConfig, None, star_overrides(tmp_path, vqvae_dir, **{"star_train.token_cache": "true",
                                                                                  **aug}))


def test_training_with_the_cache_is_bit_identical(tmp_path, vqvae_dir):
    # 24 records, batch 8: 3 batches per epoch, so in 8 steps every record is met 2-3 times (later from the cache).
    common = {"data.shapes_count": 24, "loop.ckpt_every": 100}
    runs = {}
    for cache in (False, True):
        out = tmp_path / f"cache_{cache}"
        res = run_train(star_overrides(out, vqvae_dir, 8, **common, **{"star_train.token_cache": str(cache).lower()}))
        assert res.returncode == 0, res.stderr[-3000:]
        runs[cache] = final_state(out)
    assert set(runs[True]) == set(runs[False])
    assert all(torch.equal(runs[True][k], runs[False][k]) for k in runs[True])
