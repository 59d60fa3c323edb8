import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from models.star import StarConfig
from models.vqvae import VQVAEConfig
from utils.config import ConfigError, from_dict, load_config, parse_overrides, to_dict, to_json

REPO = Path(__file__).resolve().parents[1]


@dataclass
class OptimSection:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    schedule: str = "lin0"
    clip: float | None = 2.0
    cache: str | None = "cache/"


@dataclass
class RunSection:
    name: str = "run"
    steps: int = 10
    fp16: bool = False
    tags: list[str] = field(default_factory=list)
    optim: OptimSection = field(default_factory=OptimSection)
    model: StarConfig = field(default_factory=lambda: StarConfig(depth=2))


def write(tmp_path, data) -> str:
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_json_load_with_nested_sections(tmp_path):
    cfg = load_config(RunSection, write(tmp_path, {"steps": 5, "optim": {"lr": 3e-4}, "model": {"depth": 4}}))
    assert cfg.steps == 5 and cfg.optim.lr == 3e-4 and cfg.optim.schedule == "lin0"
    assert cfg.model.depth == 4 and cfg.model.width == 256 and cfg.model.num_heads == 4  # derived defaults


def test_overrides_flat_nested_and_types(tmp_path):
    cfg = load_config(RunSection, write(tmp_path, {"steps": 5}),
                      ["--steps=7", "--optim.lr=1e-3", "--optim.betas=[0.8,0.99]", "--fp16", "--name", "123",
                       "--model.patch_nums=1,2,4", "--optim.clip=null", "--tags=[\"a\",\"b\"]"])
    assert cfg.steps == 7 and cfg.optim.lr == 1e-3 and cfg.optim.betas == (0.8, 0.99)
    assert cfg.fp16 is True and cfg.name == "123"  # a str field keeps the raw text
    assert cfg.model.patch_nums == (1, 2, 4) and cfg.optim.clip is None and cfg.tags == ["a", "b"]


def test_null_clears_an_optional_text_field_and_stays_text_for_a_plain_one(tmp_path):
    cfg = load_config(RunSection, None, ["--optim.cache=null", "--name=null"])
    assert cfg.optim.cache is None and cfg.name == "null"
    assert load_config(RunSection, None, ["--optim.cache=123"]).optim.cache == "123"


def test_int_is_accepted_for_float_but_not_the_reverse():
    assert from_dict(OptimSection, {"lr": 1}).lr == 1.0
    with pytest.raises(ConfigError, match=r"'steps': expected int, got 1.5"):
        from_dict(RunSection, {"steps": 1.5})


@pytest.mark.parametrize("data,override,match", [
    ({"stpes": 3}, [], r"unknown config key 'stpes'\. Did you mean 'steps'\?"),
    ({"optim": {"lrr": 3}}, [], r"unknown config key 'optim\.lrr'\. Did you mean 'lr'\?"),
    ({}, ["--optim.schedul=cos"], r"unknown config key 'optim\.schedul'\. Did you mean 'schedule'\?"),
    ({}, ["--modle.depth=3"], r"unknown config key 'modle'\. Did you mean 'model'\?"),
])
def test_unknown_keys_name_the_closest_valid_key(tmp_path, data, override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(RunSection, write(tmp_path, data), override)


@pytest.mark.parametrize("data,match", [
    ({"steps": "ten"}, r"'steps': expected int, got 'ten' \(str\)"),
    ({"fp16": 1}, r"'fp16': expected bool \(true/false\), got 1 \(int\)"),
    ({"optim": {"betas": [0.9]}}, r"'optim\.betas': expected 2 items, got 1"),
    ({"optim": 3}, r"'optim': expected a section"),
    ({"model": {"patch_nums": [1, 3, 2]}}, r"patch_nums must start at 1 and increase strictly"),
])
def test_wrong_types_name_key_expected_and_given(tmp_path, data, match):
    with pytest.raises(ConfigError, match=match):
        load_config(RunSection, write(tmp_path, data))


def test_override_of_a_section_or_through_a_value_is_an_error():
    with pytest.raises(ConfigError, match="is a section"):
        load_config(RunSection, None, ["--optim=3"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_config(RunSection, None, ["--steps.x=3"])


def test_round_trip_to_json():
    cfg = load_config(RunSection, None, ["--optim.betas=[0.5,0.6]", "--model.depth=3", "--tags=x,y"])
    data = json.loads(to_json(cfg))
    assert data["optim"]["betas"] == [0.5, 0.6] and data["model"]["patch_nums"] == list(cfg.model.patch_nums)
    assert from_dict(RunSection, data) == cfg
    assert to_dict(from_dict(VQVAEConfig, to_dict(VQVAEConfig()))) == to_dict(VQVAEConfig())


@pytest.mark.parametrize("data,match", [
    ({"ch": 48}, "ch must be a multiple of 32"),
    ({"num_res_blocks": 0}, "num_res_blocks must be >= 1"),  # used to fail deep inside the first forward
])
def test_vqvae_config_rejects_layouts_the_model_cannot_build(data, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(VQVAEConfig, data)


def test_shapes_data_needs_images_of_at_least_8_px():
    from train import build_dataset
    from trainer.config import RunConfig
    from utils.data.shapes import make_sample, render
    with pytest.raises(ConfigError, match="shapes data set draws images of 8 px or more; this VQ-VAE's are 4 px"):
        build_dataset(RunConfig(), 4)
    assert build_dataset(RunConfig(), 8)[0]["image"].shape == (3, 8, 8)
    with pytest.raises(ValueError, match="drawn at 8 px or more, not 4"):  # used to fail inside PIL
        render(make_sample(0, "train"), 4)


def test_missing_file_and_bad_json(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(RunSection, tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    with pytest.raises(ConfigError, match="invalid JSON"):
        load_config(RunSection, bad)


def test_parse_overrides_forms():
    assert parse_overrides(["--a.b=1", "--c", "2", "--flag", "--d-e=x"]) == [
        ("a.b", "1"), ("c", "2"), ("flag", "true"), ("d_e", "x")]
    with pytest.raises(ConfigError, match="overrides look like --key=value"):
        parse_overrides(["positional"])


@pytest.mark.parametrize("raw, expected", [
    ('["/data/a","/data/b"]', ["/data/a", "/data/b"]),  # JSON
    ("[/data/a,/data/b]", ["/data/a", "/data/b"]),      # brackets without quotes, as train.py's docstring shows
    ("[ /data/a , /data/b ]", ["/data/a", "/data/b"]),
    ("/data/a,/data/b", ["/data/a", "/data/b"]),
    ("/data/a", ["/data/a"]),                           # one path: a one-element list
    ("[/data/a]", ["/data/a"]),
])
def test_list_overrides_without_json_quotes(raw, expected):
    assert load_config(RunSection, None, [f"--tags={raw}"]).tags == expected


@pytest.mark.parametrize("override, match", [
    ("--loop.keep_last=0", r"'loop.keep_last' must be 1 <= keep_last, got 0"),  # would delete every checkpoint
    ("--loop.log_every=0", r"'loop.log_every' must be 1 <="),                     # was a ZeroDivisionError
    ("--loop.batch_size=0", r"'loop.batch_size' must be 1 <="),
    ("--loop.steps=0", r"'loop.steps' must be 1 <="),
    ("--loop.sample_every=-1", r"'loop.sample_every' must be 0 <="),              # was: samples at every step
    ("--loop.max_nonfinite=0", r"'loop.max_nonfinite' must be 1 <="),
    ("--optim.lr=-1", r"'optim.lr' must be 0 <= lr, got -1"),
    ("--optim.warmup_steps=-5", r"'optim.warmup_steps' must be 0 <="),
    ("--optim.betas=[0.9,1.2]", r"'optim.betas\[1\]' must be 0.0 <= betas\[1\] < 1.0, got 1.2"),
    ("--optim.ema_decay=1.0", r"'optim.ema_decay' must be 0.0 <= ema_decay < 1.0"),
    ("--optim.label_smoothing=1", r"'optim.label_smoothing' must be"),
    ("--data.caption_dropout=1.5", r"'data.caption_dropout' must be 0.0 <= caption_dropout <= 1.0, got 1.5"),
    ("--data.random_crop=1", r"'data.random_crop' must be"),
    ("--data.workers=-1", r"'data.workers' must be 0 <="),
    ("--data.shapes_count=0", r"'data.shapes_count' must be 1 <="),
    ("--vqvae_train.disc_weight=-1", r"'vqvae_train.disc_weight' must be 0 <="),
    ("--vqvae_train.restart_dead_every=-1", r"'vqvae_train.restart_dead_every' must be 0 <="),
    ("--sampler_train.num_blocks=0", r"'sampler_train.num_blocks' must be 1 <="),
    # scale indices are taken modulo the number of scales (10 here): 12 cropped scales 2..9, not none
    ("--star_train.drop_from_scale=12", r"'star_train.drop_from_scale' must be -10 <= drop_from_scale < 10"),
])
def test_run_config_refuses_values_out_of_range(override, match):
    from trainer.config import RunConfig
    with pytest.raises(ConfigError, match=match):
        load_config(RunConfig, None, ["--star_train.vqvae=v", override])


@pytest.mark.parametrize("override, match", [
    ("--model.depth=0", r"^model: 'depth' must be 1 <= depth, got 0$"),          # was a ZeroDivisionError
    ("--model.vocab_size=0", r"^model: 'vocab_size' must be 1 <="),
    ("--model.drop_path_rate=1.5", r"^model: 'drop_path_rate' must be 0.0 <= drop_path_rate < 1.0"),
    ("--model.mlp_ratio=0", r"^model: 'mlp_ratio' must be > 0"),
    ("--vqvae.ch_mult=[]", r"^vqvae: ch_mult must be a non-empty list"),
    ("--vqvae.dropout=2", r"^vqvae: 'dropout' must be 0.0 <= dropout < 1.0"),
    ("--vqvae.vocab_size=0", r"^vqvae: 'vocab_size' must be 1 <="),                # same key, its section named
])
def test_model_configs_refuse_values_out_of_range_and_name_their_section(override, match):
    from trainer.config import RunConfig
    with pytest.raises(ConfigError, match=match):
        load_config(RunConfig, None, ["--star_train.vqvae=v", "--stage=vqvae", override])


def test_sampler_scale_index_is_checked_against_the_models_scales():
    """sample_from=12 on 10 scales silently trained a head for scales 2..9."""
    from trainer.config import RunConfig
    run = ["--stage=sampler", "--sampler_train.backbone=b"]
    with pytest.raises(ConfigError, match=r"'sampler_train.sample_from' must be -9 <= sample_from < 10, got 12"):
        load_config(RunConfig, None, [*run, "--sampler_train.sample_from=12"])
    with pytest.raises(ConfigError, match=r"must not be 0: the head covers scales 1..9"):
        load_config(RunConfig, None, [*run, "--sampler_train.sample_from=0"])
    assert load_config(RunConfig, None, [*run, "--sampler_train.sample_from=-9"]).sampler_train.sample_from == -9


@pytest.mark.parametrize("key", ["data.lmdb_dirs", "data.val_lmdb_dirs"])
def test_packed_folders_with_the_shapes_source_are_an_error(key):
    """configs/shapes_*.json with --data.lmdb_dirs trained on the built-in shapes, the folders unread."""
    from trainer.config import RunConfig
    with pytest.raises(ConfigError, match=rf"^{key} is given but data.source='shapes' .* --data.source=lmdb"):
        load_config(RunConfig, REPO / "configs" / "shapes_star.json", [f"--{key}=data/photos"])
    cfg = load_config(RunConfig, REPO / "configs" / "shapes_star.json", ["--data.source=lmdb", f"--{key}=data/photos",
                                                                         "--data.lmdb_dirs=data/photos"])
    assert cfg.data.lmdb_dirs == ["data/photos"]


def test_nan_in_a_config_file_is_out_of_every_range(tmp_path):
    """JSON files may hold NaN (Python's json reads it), and NaN compares False with any bound."""
    from trainer.config import RunConfig
    path = tmp_path / "run.json"
    path.write_text('{"optim": {"lr": NaN}}')
    with pytest.raises(ConfigError, match=r"'optim.lr' must be 0 <= lr, got nan"):
        load_config(RunConfig, path, ["--star_train.vqvae=v"])


def test_run_config_accepts_the_range_edges():
    from trainer.config import RunConfig
    cfg = load_config(RunConfig, None, ["--star_train.vqvae=v", "--loop.keep_last=1", "--loop.sample_every=0",
                                        "--optim.lr=0", "--optim.ema_decay=0.9999", "--data.caption_dropout=1"])
    assert cfg.loop.keep_last == 1 and cfg.optim.ema_decay == 0.9999 and cfg.data.caption_dropout == 1
