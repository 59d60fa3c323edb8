"""The training run's typed configuration (one JSON file in ``configs/`` + ``--section.key=value`` overrides)."""
from __future__ import annotations

from dataclasses import dataclass, field

from models.sampling import OFFICIAL_GENERATION, check_sampling, guidance_weights
from models.star import ATTENTION_KERNELS, StarConfig
from models.vqvae import VQVAEConfig
from utils.config import ConfigError, check_range


@dataclass
class DataConfig:
    source: str = "shapes"                 # "shapes" (rendered on the fly) or "lmdb" (packed shards)
    lmdb_dirs: list[str] = field(default_factory=list)
    val_lmdb_dirs: list[str] = field(default_factory=list)  # lmdb: held-out data for loop.eval_every
    shapes_count: int = 20000              # shapes: number of distinct training samples
    shapes_seed: int = 0
    shapes_texture: float = 0.0
    caption_keys: list[str] | None = None  # caption fields to choose from (None: all)
    caption_dropout: float = 0.1           # probability of the "" prompt (classifier-free guidance)
    random_crop: float = 0.0
    hflip: bool = False
    min_side: int = 0
    max_aspect: float = 0.0
    workers: int = 0

    def validate(self) -> None:
        if self.source not in ("shapes", "lmdb"):
            raise ConfigError(f"data.source must be 'shapes' or 'lmdb', got {self.source!r}")
        if self.source == "lmdb" and not self.lmdb_dirs:
            raise ConfigError("data.source='lmdb' needs data.lmdb_dirs (folders written by test_pack.py)")
        if self.source == "shapes" and (self.lmdb_dirs or self.val_lmdb_dirs):  # would train on shapes regardless
            given = "data.lmdb_dirs" if self.lmdb_dirs else "data.val_lmdb_dirs"
            raise ConfigError(f"{given} is given but data.source='shapes' (the built-in data set) does not read it: "
                              "add --data.source=lmdb to train on those folders")
        check_range("data.caption_dropout", self.caption_dropout, 0.0, 1.0)
        check_range("data.random_crop", self.random_crop, 0.0, 1.0, below_high=True)
        check_range("data.shapes_texture", self.shapes_texture, 0.0, 1.0)
        check_range("data.shapes_count", self.shapes_count, 1)
        for name in ("workers", "min_side", "max_aspect"):
            check_range(f"data.{name}", getattr(self, name), 0)


@dataclass
class TextConfig:
    encoder: str = "tiny"                  # hf-clip | open_clip | t5 | tiny | minilm
    path: str | None = None                # local weights folder/file for hf-clip, open_clip, t5
    cache_dir: str | None = None           # caption-embedding cache (LMDB); None: encode every step
    # Depth of the tiny encoder. Its second random layer washes word identity out of the features (cosine of
    # "red" vs "blue" at one position: 0.95 with 2 layers, 0.38 with 1); the shapes configs use 1.
    tiny_layers: int = 2


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.05
    schedule: str = "lin0"                 # lin0 (official) | cosine | constant
    warmup_steps: int = 0
    warmup_start: float = 0.005            # LR fraction at step 0 (official wp0)
    end_lr: float = 0.01                   # final LR fraction (official wpe)
    grad_clip: float = 2.0                 # 0: no clipping
    grad_accum: int = 1
    label_smoothing: float = 0.0
    ema_decay: float = 0.0                 # 0: no EMA of weights
    fused: bool = False                    # fused AdamW (CUDA)

    def validate(self) -> None:
        if self.schedule not in ("lin0", "cosine", "constant"):
            raise ConfigError(f"optim.schedule must be lin0, cosine or constant, got {self.schedule!r}")
        if self.grad_accum < 1:
            raise ConfigError("optim.grad_accum must be >= 1")
        for name in ("lr", "weight_decay", "warmup_steps", "warmup_start", "end_lr", "grad_clip"):
            check_range(f"optim.{name}", getattr(self, name), 0)
        for i, beta in enumerate(self.betas):
            check_range(f"optim.betas[{i}]", beta, 0.0, 1.0, below_high=True)
        check_range("optim.label_smoothing", self.label_smoothing, 0.0, 1.0, below_high=True)
        check_range("optim.ema_decay", self.ema_decay, 0.0, 1.0, below_high=True)


@dataclass
class LoopConfig:
    steps: int = 1000                      # optimizer steps
    batch_size: int = 32                   # global batch per optimizer step (over ranks and accumulation)
    precision: str = "fp32"                # fp32 | fp16 (GradScaler) | bf16
    compile: bool = False                  # torch.compile the trained model
    seed: int = 0
    out_dir: str = "outputs/run"
    resume: str = "auto"                   # auto: newest valid checkpoint in out_dir; "": start fresh; or a path
    init_from: str | None = None           # weights to start from (e.g. a lower-resolution run)
    ckpt_every: int = 500
    ckpt_every_minutes: float = 0.0        # > 0: also a checkpoint once this long has passed since the last one
    keep_last: int = 2
    log_every: int = 20
    sample_every: int = 0                  # 0: no periodic samples
    max_nonfinite: int = 20                # stop after this many skipped steps in a row (non-finite loss or grad)
    # > 0: train for as many steps (at most ``steps``) as fit in this many seconds of the loop, the count set from
    # the speed of the first steps, revised once at the next checkpoint (trainer.loop.BUDGET_TIMED_STEPS) and
    # then kept, resume included. A run that plans its count ends when the budget is spent even if it planned more.
    time_budget_s: float = 0.0
    # > 0: every this many steps (and at the last), the stage's validation metrics (loss, accuracy or PSNR) on
    # the first eval_samples samples of the validation set: data.val_lmdb_dirs, or for the shapes source its
    # held-out attribute combinations. Logged as val_* (log.txt) and val/* (TensorBoard).
    eval_every: int = 0
    eval_samples: int = 512

    def validate(self) -> None:
        if self.precision not in ("fp32", "fp16", "bf16"):
            raise ConfigError(f"loop.precision must be fp32, fp16 or bf16, got {self.precision!r}")
        if self.ckpt_every < 1 or self.ckpt_every_minutes < 0:
            raise ConfigError("loop.ckpt_every must be >= 1 and loop.ckpt_every_minutes >= 0 (0: by steps only)")
        if self.eval_every < 0 or self.eval_samples < 1:
            raise ConfigError("loop.eval_every must be >= 0 (0: no validation) and loop.eval_samples >= 1")
        if self.time_budget_s < 0:
            raise ConfigError("loop.time_budget_s must be >= 0 (0: no budget, train loop.steps steps)")
        # keep_last 0 would delete every checkpoint as soon as it is written: nothing to resume from.
        for name in ("steps", "batch_size", "keep_last", "log_every", "max_nonfinite"):
            check_range(f"loop.{name}", getattr(self, name), 1)
        check_range("loop.sample_every", self.sample_every, 0)


@dataclass
class VQVAETrainConfig:
    recon: str = "l1"                      # l1 | l2
    vq_weight: float = 1.0
    perceptual_weight: float = 0.0         # > 0: LPIPS-style loss; needs the two local weight files below
    perceptual_vgg: str | None = None      # torchvision's vgg16-397923af.pth
    perceptual_lin: str | None = None      # the lpips package's vgg.pth (linear heads)
    disc_weight: float = 0.0               # > 0: patch discriminator (hinge GAN) from step disc_start on
    disc_start: int = 0
    disc_lr: float = 1e-4
    restart_dead_every: int = 100          # 0: never; else every N steps re-seed the codes dead in those N steps
    dead_threshold: float = 0.03           # dead: hit less than this fraction of a uniform share in the window

    def validate(self) -> None:
        if self.recon not in ("l1", "l2"):
            raise ConfigError(f"vqvae_train.recon must be l1 or l2, got {self.recon!r}")
        for name in ("vq_weight", "perceptual_weight", "disc_weight", "disc_start", "disc_lr", "restart_dead_every",
                     "dead_threshold"):
            check_range(f"vqvae_train.{name}", getattr(self, name), 0)
        if self.perceptual_weight > 0 and not (self.perceptual_vgg and self.perceptual_lin):
            raise ConfigError("vqvae_train.perceptual_weight > 0 needs two local weight files: "
                              "--vqvae_train.perceptual_vgg=<torchvision's vgg16-397923af.pth> "
                              "--vqvae_train.perceptual_lin=<the lpips package's vgg.pth> "
                              "(or --vqvae_train.perceptual_weight=0)")


@dataclass
class StarTrainConfig:
    vqvae: str = ""                        # our checkpoint dir (vqvae.safetensors) or VAR's .pth
    sample_prompts: list[str] = field(default_factory=list)
    # How samples are drawn (during training, and by default from the exported pipeline: its "generation").
    sample_cfg: float = OFFICIAL_GENERATION["cfg"]
    sample_top_k: int = OFFICIAL_GENERATION["top_k"]
    sample_top_p: float = OFFICIAL_GENERATION["top_p"]
    sample_guidance: str = OFFICIAL_GENERATION["guidance_schedule"]  # linear | constant | window:i:j | t0,t1,..
    # Token dropping for high resolutions (loss averaged over the kept tokens):
    token_drop: str = "none"               # none | window (paper: one local window, nested across scales) | random
    drop_from_scale: int = -2              # scales with index >= this are cropped (negative: from the end)
    keep_fraction: float = 0.5             # window: side fraction kept; random: token fraction kept
    # token: every token weighs the same (official); scale: every scale weighs the same, so the few coarse
    # tokens that decide colour and layout are not drowned by the fine ones (faster text conditioning).
    loss_weighting: str = "token"
    # Keep each record's VQ-VAE tokens in memory once it is first encoded (2 bytes per token per record, on every
    # rank) instead of re-encoding the image at every step; needs a data set without random crop or flip.
    token_cache: bool = False
    # Recompute each transformer block in the backward pass instead of keeping its activations
    # (STAR.set_activation_checkpointing): for large models or resolutions that do not fit otherwise.
    activation_checkpointing: bool = False
    # Self-attention kernel (STAR.set_attention_kernel): sdpa (dense mask) | flex (FlexAttention block mask,
    # CUDA only: it skips the masked score blocks; PyTorch has no CPU backward for it).
    attention: str = "sdpa"

    def generation(self) -> dict:
        """The exported pipeline's default sampling settings (keyword arguments of ``StarPipeline.__call__``)."""
        return {"cfg": self.sample_cfg, "top_k": self.sample_top_k, "top_p": self.sample_top_p,
                "guidance_schedule": self.sample_guidance}

    def validate(self) -> None:
        try:
            check_sampling(self.sample_cfg, self.sample_top_k, self.sample_top_p)
        except ConfigError as e:
            raise ConfigError(f"star_train.sample_*: {e}") from None
        if self.loss_weighting not in ("token", "scale"):
            raise ConfigError(f"star_train.loss_weighting must be token or scale, got {self.loss_weighting!r}")
        if self.token_drop not in ("none", "window", "random"):
            raise ConfigError(f"star_train.token_drop must be none, window or random, got {self.token_drop!r}")
        if not 0 < self.keep_fraction <= 1:
            raise ConfigError("star_train.keep_fraction must be in (0, 1]")
        if self.attention not in ATTENTION_KERNELS:
            raise ConfigError(f"star_train.attention must be one of {ATTENTION_KERNELS}, got {self.attention!r}")


@dataclass
class SamplerTrainConfig:
    backbone: str = ""                     # the frozen STAR: our checkpoint dir, or an official .pth (model.* must fit)
    sample_from: int = -1                  # first scale index the head covers (negative: from the end; official 9)
    num_blocks: int = 3
    init_from_backbone: bool = False       # start as the backbone's logits (SamplerHead.init_from_backbone)
    schedule: str = "default"              # refinement schedule for samples: default | official-1024

    def validate(self) -> None:
        if self.schedule not in ("default", "official-1024"):
            raise ConfigError(f"sampler_train.schedule must be default or official-1024, got {self.schedule!r}")
        check_range("sampler_train.num_blocks", self.num_blocks, 1)


@dataclass
class RunConfig:
    stage: str = "star"                    # star | vqvae | sampler (train_sampler.py)
    model: StarConfig = field(default_factory=StarConfig)
    vqvae: VQVAEConfig = field(default_factory=VQVAEConfig)
    text: TextConfig = field(default_factory=TextConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    vqvae_train: VQVAETrainConfig = field(default_factory=VQVAETrainConfig)
    star_train: StarTrainConfig = field(default_factory=StarTrainConfig)
    sampler_train: SamplerTrainConfig = field(default_factory=SamplerTrainConfig)

    def validate(self) -> None:
        if self.stage not in ("star", "vqvae", "sampler"):
            raise ConfigError(f"stage must be 'star', 'vqvae' or 'sampler', got {self.stage!r}")
        if self.stage == "star" and not self.star_train.vqvae:  # a sampler run may take its backbone's
            raise ConfigError("stage 'star' needs star_train.vqvae (a trained VQ-VAE checkpoint)")
        if self.stage == "sampler" and not self.sampler_train.backbone:
            raise ConfigError("stage 'sampler' needs sampler_train.backbone (a trained STAR checkpoint)")
        if self.stage == "sampler" and self.loop.init_from:
            raise ConfigError("stage 'sampler' starts the head from scratch; the backbone comes from "
                              "sampler_train.backbone, not loop.init_from")
        if self.stage != "vqvae" and self.star_train.token_cache and (self.data.random_crop > 0 or self.data.hflip):
            raise ConfigError("star_train.token_cache keeps one set of tokens per record, but data.random_crop / "
                              "data.hflip give a different image at every visit: turn one or the other off")
        if self.loop.eval_every and self.data.source == "lmdb" and not self.data.val_lmdb_dirs:
            raise ConfigError("loop.eval_every needs validation data: --data.val_lmdb_dirs=<folders written by "
                              "test_pack.py from held-out images> (or --loop.eval_every=0)")
        if self.stage != "vqvae" and tuple(self.model.patch_nums) != tuple(self.vqvae.patch_nums):
            raise ConfigError(f"model.patch_nums {self.model.patch_nums} != vqvae.patch_nums {self.vqvae.patch_nums}")
        if self.stage != "vqvae":  # a guidance window is checked against the model's scales
            try:
                guidance_weights(self.star_train.sample_guidance, self.star_train.sample_cfg,
                                 len(self.model.patch_nums))
            except ConfigError as e:
                raise ConfigError(f"star_train.sample_guidance: {e}") from None
            # Scale indices are taken modulo the number of scales: out of range, they would pick another scale.
            S = len(self.model.patch_nums)
            check_range("star_train.drop_from_scale", self.star_train.drop_from_scale, -S, S, below_high=True)
            if self.stage == "sampler":  # scale 0 (the 1x1 map) is never the head's: a scale index in 1..S-1
                check_range("sampler_train.sample_from", self.sampler_train.sample_from, 1 - S, S, below_high=True)
                if self.sampler_train.sample_from == 0:
                    raise ConfigError(f"sampler_train.sample_from must not be 0: the head covers scales 1..{S - 1} "
                                      "(negative: counted from the end)")

    @property
    def resolution(self) -> int:
        return self.vqvae.image_size
