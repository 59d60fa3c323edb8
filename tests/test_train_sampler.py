"""train_sampler.py: only the head learns, exact resume, DDP ranks stay in sync, the export is a pipeline dir."""
import pytest
import torch
from safetensors.torch import load_file

from models.checkpoint import load_pretrained_sampler, load_pretrained_star, load_pretrained_vqvae, save_pretrained
from models.sampler import SamplerHead
from models.star import STAR, StarConfig
from models.vqvae import VQVAE
from tests.train_helpers import history, make_vqvae_dir, run_train, star_overrides
from trainer.config import RunConfig
from trainer.sampler_stage import with_backbone_settings
from utils.config import ConfigError, load_config

TINY_STAR = dict(depth=2, width=64, num_heads=2, vocab_size=64, z_channels=8, text_dim=64, patch_nums=(1, 2, 4))


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sampler")
    vqvae_dir = make_vqvae_dir(root / "vqvae")
    torch.manual_seed(1)
    star = STAR(StarConfig(**TINY_STAR))
    star.init_weights()
    save_pretrained(root / "star", star=star, vqvae=load_pretrained_vqvae(vqvae_dir))
    return vqvae_dir, root / "star"


def sampler_args(out_dir, dirs, steps, **extra):
    vqvae_dir, star_dir = dirs
    extra = {"stage": "sampler", "sampler_train.backbone": str(star_dir), "sampler_train.sample_from": -1,
             "model.drop_path_rate": 0.0, "optim.ema_decay": 0.0, **extra}
    return star_overrides(out_dir, vqvae_dir, steps, **extra)


@pytest.mark.parametrize("init_from_backbone", [False, True])
def test_only_the_head_learns_and_loss_falls(tmp_path, dirs, init_from_backbone):
    extra = {"loop.ckpt_every": 100, "optim.lr": 1e-2, "loop.sample_every": 40,
             "star_train.sample_prompts": '["a red circle"]',
             "sampler_train.init_from_backbone": str(init_from_backbone).lower()}
    run = run_train(sampler_args(tmp_path / "run", dirs, 40, **extra), script="train_sampler.py")
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [r for r in history(tmp_path / "run") if "loss" in r]
    first, last = sum(r["loss"] for r in rows[:5]) / 5, sum(r["loss"] for r in rows[-5:]) / 5
    assert last < first - 0.3, (first, last)
    assert all(0 <= r["acc_hidden"] <= 1 and 0 <= r["visible_fraction"] <= 1 for r in rows)
    final = tmp_path / "run" / "final"
    backbone_in = load_file(str(dirs[1] / "model.safetensors"))
    backbone_out = load_file(str(final / "model.safetensors"))
    assert all(torch.equal(backbone_in[k], backbone_out[k]) for k in backbone_in)  # frozen
    # The export is a complete pipeline directory: backbone + head + VQ-VAE generate together.
    star = load_pretrained_star(final)
    head = load_pretrained_sampler(final, star.cfg)
    assert head is not None and head.sample_from == 2
    text = (torch.randn(2, 5, 64), torch.ones(2, 5, dtype=torch.long), torch.randn(2, 64))
    img = star.generate(load_pretrained_vqvae(final), *text, cfg=2.0, sampler=head,
                        generator=torch.Generator().manual_seed(0))
    assert img.shape == (1, 3, 8, 8) and torch.isfinite(img).all()
    assert (tmp_path / "run" / "samples" / "step_00000040.png").is_file()


def test_resume_is_bit_identical(tmp_path, dirs):
    # With validation every 4 steps: it must not disturb training, and it hides the same tokens every time.
    args = sampler_args(tmp_path / "run", dirs, 8, **{"loop.ckpt_every": 4, "loop.eval_every": 4,
                                                       "loop.eval_samples": 6})
    assert run_train(args, script="train_sampler.py").returncode == 0
    reference = load_file(str(tmp_path / "run" / "final" / "sampler.safetensors"))
    validation = {row["step"]: row["val_loss"] for row in history(tmp_path / "run") if "val_loss" in row}
    assert sorted(validation) == [4, 8] and validation[4] != validation[8]
    # Forget everything after step 4 and run the same command again: it resumes from ckpt-4.
    (tmp_path / "run" / "ckpt-00000008.pt").unlink()
    for f in (tmp_path / "run" / "final").iterdir():
        f.unlink()
    resumed = run_train(args, script="train_sampler.py")
    assert resumed.returncode == 0 and "step 4" in resumed.stderr, resumed.stderr[-3000:]
    again = load_file(str(tmp_path / "run" / "final" / "sampler.safetensors"))
    assert all(torch.equal(reference[k], again[k]) for k in reference)
    assert [row["val_loss"] for row in history(tmp_path / "run") if row["step"] == 8] == [validation[8]]


def test_ddp_ranks_stay_identical(tmp_path, dirs):
    """Each rank sees other images and other masks; identical heads afterwards mean the gradients were
    all-reduced (the official script bypasses DDP, so its ranks drift apart)."""
    args = sampler_args(tmp_path / "ddp", dirs, 4, **{"loop.ckpt_every": 100})
    proc = run_train(args, torchrun=2, script="tests/sampler_ranks.py")
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = torch.load(tmp_path / "ddp" / "head_rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "ddp" / "head_rank1.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    init_like = load_file(str(tmp_path / "ddp" / "final" / "sampler.safetensors"))
    assert all(torch.equal(a[k], init_like[k]) for k in a)  # rank 0's export is that common head


def test_train_sampler_rejects_other_stages(tmp_path, dirs):
    proc = run_train(star_overrides(tmp_path / "x", dirs[0], 2), script="train_sampler.py")
    assert proc.returncode == 2 and "stage 'sampler'" in proc.stderr
    proc = run_train(sampler_args(tmp_path / "y", dirs, 2, **{"sampler_train.backbone": ""}),
                     script="train_sampler.py")
    assert proc.returncode == 2 and "sampler_train.backbone" in proc.stderr


def test_the_backbone_directory_brings_its_vqvae_and_refuses_other_settings(tmp_path, dirs):
    vqvae_dir, star_dir = dirs
    backbone = tmp_path / "backbone"  # as StarStage exports it: with the text settings it was trained with
    text = {"encoder": "tiny", "path": None, "cache_dir": "elsewhere", "tiny_layers": 1}
    save_pretrained(backbone, star=load_pretrained_star(star_dir), vqvae=load_pretrained_vqvae(vqvae_dir),
                    extra_config={"text": text})

    def resolve(**extra):
        args = sampler_args(tmp_path / "run", (vqvae_dir, backbone), 2, **{"text.tiny_layers": 1, **extra})
        return with_backbone_settings(load_config(RunConfig, None, args))

    assert resolve(**{"star_train.vqvae": ""}).star_train.vqvae == str(backbone)  # unset: the backbone's
    assert resolve().star_train.vqvae == str(vqvae_dir)  # the same weights under another path
    # Free: a caption cache of its own, drop path (the backbone runs in eval mode).
    resolve(**{"text.cache_dir": str(tmp_path / "cache"), "model.drop_path_rate": 0.3})

    torch.manual_seed(5)
    other = VQVAE(load_pretrained_vqvae(vqvae_dir).cfg)
    save_pretrained(tmp_path / "other_vqvae", vqvae=other)
    with pytest.raises(ConfigError, match="is not the VQ-VAE the backbone was trained with"):
        resolve(**{"star_train.vqvae": str(tmp_path / "other_vqvae")})

    wrong = {"model.num_heads": 4, "model.patch_nums": "[1,2,3]", "vqvae.patch_nums": "[1,2,3]", "text.tiny_layers": 2}
    with pytest.raises(ConfigError) as error:
        resolve(**wrong)
    message = str(error.value)
    for named in ("model.num_heads: backbone 2, this run 4", "model.patch_nums: backbone [1, 2, 4]",
                  "text.tiny_layers: backbone 1, this run 2"):
        assert named in message
    flags = message.split("Use: ")[1].split()
    assert sorted(flags) == ["--model.num_heads=2", "--model.patch_nums=1,2,4", "--text.tiny_layers=1"]
    suggested = dict(flag[2:].split("=", 1) for flag in flags)  # taken as given, they are the fix
    resolve(**{**wrong, **suggested, "vqvae.patch_nums": "[1,2,4]"})

    official = tmp_path / "official.pth"  # an official file records nothing: the run must name the VQ-VAE
    torch.save(load_file(str(star_dir / "model.safetensors")), official)
    with pytest.raises(ConfigError, match="brings no VQ-VAE: set --star_train.vqvae"):
        resolve(**{"sampler_train.backbone": str(official), "star_train.vqvae": ""})
    assert resolve(**{"sampler_train.backbone": str(official)}).star_train.vqvae == str(vqvae_dir)
    with pytest.raises(FileNotFoundError, match="sampler_train.backbone=.*missing not found"):  # was "no VQ-VAE"
        resolve(**{"sampler_train.backbone": str(tmp_path / "missing"), "star_train.vqvae": ""})
    with pytest.raises(ConfigError, match="holds no STAR model"):  # the VQ-VAE run's directory by mistake
        resolve(**{"sampler_train.backbone": str(vqvae_dir)})


def test_head_initialised_from_the_backbone_returns_the_backbone_logits():
    """Whatever tokens are committed, a head made by ``init_from_backbone`` predicts every position of its scales
    as the backbone's own forward pass does (the reference: STAR.forward's logits)."""
    torch.manual_seed(0)
    star = STAR(StarConfig(**TINY_STAR, drop_path_rate=0.0))
    star.init_weights()
    with torch.no_grad():  # logits far from uniform, so that a mismatch would show
        star.head_logits.weight.normal_(0, 1.0)
    head = SamplerHead(star.cfg, sample_from=1)
    head.init_weights()
    head.init_from_backbone(star)
    B, begin = 3, star.scale_begins[1]
    var_input, text, mask, pooled = torch.randn(B, 20, 8), torch.randn(B, 5, 64), torch.ones(B, 5), torch.randn(B, 64)
    logits, hidden = star(var_input, text, mask, pooled)
    n = star.cfg.seq_len - begin
    codes = torch.randn(B, n, 8) * (torch.rand(B, n, 1) < 0.5)
    rope = head.rope_for(star, begin, star.cfg.seq_len)
    head_logits = head(codes, star.level_ids[begin:], hidden[:, begin:], pooled, rope, head.training_mask(star))
    torch.testing.assert_close(head_logits, logits[:, begin:], rtol=1e-5, atol=1e-5)
