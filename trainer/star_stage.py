"""STAR transformer training step: frozen VQ-VAE tokens + frozen text features -> teacher-forced cross-entropy."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from metrics.flops import star_training_flops
from models.checkpoint import (
    adapt_official_state_dict,
    load_vqvae_for,
    read_config,
    read_official_state_dict,
    read_weights,
    save_pretrained,
)
from models.sampler import split_official_state_dict
from models.star import STAR, StarConfig
from models.text_cache import CachedTextEncoder
from models.text_encoder import text_encoder_from_config
from models.vqvae import VQVAE
from trainer.config import RunConfig, TextConfig
from trainer.loop import host_values
from trainer.optim import with_ema_weights
from utils.config import ConfigError, from_dict, to_dict
from utils.logging import get_logger

# Settings that shape a trained transformer's features and tokens; the rest (drop path, the caption cache; the
# encoder's path, which may differ between machines: a warning) can change between runs.
_FREE_KEYS = {"model": ("drop_path_rate",), "text": ("cache_dir", "path")}
_RECORDED_AS = {"model": "star", "text": "text"}  # the sections of an exported directory's config.json
_TRAINING_STATISTICS = ("quantize.ema_vocab_hit_SV",)  # VQ-VAE codebook usage: not part of the tokenizer


def load_init_weights(model: STAR, path: str) -> None:
    """Start from other weights (ours or official; e.g. a lower-resolution run: lvl_embed rows are grown).
    A sampler head in an official file is left out."""
    p = Path(path)
    state = read_weights(p / "model.safetensors") if p.is_dir() else read_official_state_dict(p)
    state, _ = split_official_state_dict(state)
    model.load_state_dict(adapt_official_state_dict(state, model), strict=True)


def settings_differences(recorded: dict, cfg: RunConfig, sections: tuple[str, ...]) -> list[tuple]:
    """(section, key, recorded value, this run's) for each setting of ``sections`` ("model", "text") in which
    ``cfg`` differs from an exported directory's config.json (``recorded``), free settings aside."""
    differences = []
    for section in sections:
        if _RECORDED_AS[section] in recorded:
            cls = StarConfig if section == "model" else TextConfig
            theirs = to_dict(from_dict(cls, recorded[_RECORDED_AS[section]], f"{section}."))
            ours = to_dict(getattr(cfg, section))
            differences += [(section, key, theirs[key], ours[key]) for key in ours
                            if key not in _FREE_KEYS[section] and ours[key] != theirs[key]]
    return differences


def warn_if_text_path_differs(recorded: dict, cfg: RunConfig, what: str) -> None:
    text_path = recorded.get("text", {}).get("path")
    if text_path and cfg.text.path and Path(text_path) != Path(cfg.text.path):
        get_logger().warning("%s was trained with text.path=%s, this run reads text.path=%s: they must hold the "
                             "same encoder weights", what, text_path, cfg.text.path)


def same_tokenizer(vqvae: VQVAE, path: str | Path, patch_nums) -> bool:
    """Whether ``vqvae`` holds the weights of the VQ-VAE checkpoint at ``path`` (ours or VAR's; codebook usage
    statistics aside)."""
    a, b = vqvae.state_dict(), load_vqvae_for(str(path), patch_nums).state_dict()
    return a.keys() == b.keys() and all(
        key in _TRAINING_STATISTICS or (a[key].shape == b[key].shape and torch.equal(a[key].cpu(), b[key]))
        for key in a)


def warn_if_started_from_another_setup(cfg: RunConfig, vqvae: VQVAE) -> None:
    """Fine-tuning (``loop.init_from``, e.g. progressive resolution) from one of our directories with another
    text encoder or VQ-VAE (``vqvae``: this run's, loaded) than it was trained with starts from features and
    tokens the weights never saw: legal, rarely meant. The architecture may differ (a longer schedule), so only
    text and tokenizer are compared."""
    source = Path(cfg.loop.init_from)
    if not source.is_dir():
        return
    recorded = read_config(source)
    log = get_logger()
    for _, key, theirs, ours in settings_differences(recorded, cfg, ("text",)):
        log.warning("loop.init_from=%s was trained with text.%s=%r, this run uses %r", source, key, theirs, ours)
    warn_if_text_path_differs(recorded, cfg, f"loop.init_from={source}")
    if "vqvae" in recorded and not same_tokenizer(vqvae, source, cfg.model.patch_nums):
        log.warning("loop.init_from=%s was trained with another VQ-VAE than star_train.vqvae=%s: its weights "
                    "start from tokens they never saw", source, cfg.star_train.vqvae)


def scale_balanced_weights(lvl: torch.Tensor) -> torch.Tensor:
    """Per-token loss weights (L,) from each token's scale index (L,): every scale present gets total weight
    1/num_scales, shared equally by its tokens (weights sum to 1)."""
    counts = torch.bincount(lvl)
    present = (counts > 0).sum()
    return 1.0 / (present * counts[lvl]).float()


class TokenCache:
    """Each record's VQ-VAE tokens, computed the first time the record is seen and reused at later visits.

    Valid because the VQ-VAE is frozen and, without random crop or flip, a record always gives the same image
    (RunConfig.validate checks). Nothing of it is checkpointed: a resumed run re-encodes what it meets, which
    gives the same tokens as long as the encoder's result for an image does not depend on the rest of its batch
    (true on the CPU, tested; GPU convolution algorithms may differ in the last bit). Memory: 2 bytes per token
    (680 tokens at 256^2: 1.4 GB per million records, on every rank, as every rank meets every record in time).
    """

    def __init__(self, vocab_size: int):
        self.dtype = torch.int16 if vocab_size <= 2 ** 15 else torch.int32
        self.tokens: dict[int, torch.Tensor] = {}

    def lookup(self, keys: list[int], images: torch.Tensor, encode) -> torch.Tensor:
        """Tokens (B, L) int64 on the CPU for records ``keys`` (the data set's record numbers, unique within it,
        unlike the records' source ids); ``encode(images[missing]) -> (n, L)`` fills gaps."""
        missing = [i for i, key in enumerate(keys) if key not in self.tokens]
        if missing:
            fresh = encode(images[missing]).cpu().to(self.dtype)
            for i, row in zip(missing, fresh):
                self.tokens[keys[i]] = row
        return torch.stack([self.tokens[key] for key in keys]).long()


class StarStage:
    def __init__(self, cfg: RunConfig, device: torch.device):
        self.cfg, self.device = cfg, device
        self.model = STAR(cfg.model)
        self.model.init_weights()
        if cfg.loop.init_from:
            load_init_weights(self.model, cfg.loop.init_from)
        self.model.set_activation_checkpointing(cfg.star_train.activation_checkpointing)
        if cfg.star_train.attention == "flex" and device.type != "cuda":
            raise ConfigError(f"star_train.attention=flex needs a CUDA device (PyTorch has no FlexAttention backward "
                              f"on {device.type}): use --star_train.attention=sdpa")
        self.model.set_attention_kernel(cfg.star_train.attention)
        if not Path(cfg.star_train.vqvae).exists():  # the usual first-run slip: the VQ-VAE is not trained yet
            raise FileNotFoundError(f"star_train.vqvae={cfg.star_train.vqvae} not found: train the VQ-VAE first "
                                    "(train.py with a 'vqvae' config; its <loop.out_dir>/final) or pass "
                                    "--star_train.vqvae=DIR (or VAR's vae_ch160v4096z32.pth)")
        self.vqvae = load_vqvae_for(cfg.star_train.vqvae, cfg.model.patch_nums).to(device)
        if cfg.loop.init_from:
            warn_if_started_from_another_setup(cfg, self.vqvae)
        unfit = [f"--model.{key}={getattr(self.vqvae.cfg, key)}" for key in ("vocab_size", "z_channels")
                 if getattr(cfg.model, key) != getattr(self.vqvae.cfg, key)]
        if unfit:  # the transformer reads the VQ-VAE's code vectors and predicts its token ids
            raise ConfigError(f"the transformer does not fit the VQ-VAE of star_train.vqvae={cfg.star_train.vqvae} "
                              f"(model.vocab_size {cfg.model.vocab_size}, model.z_channels {cfg.model.z_channels}; "
                              f"the VQ-VAE's: {self.vqvae.cfg.vocab_size}, {self.vqvae.cfg.z_channels}): set "
                              f"{' '.join(unfit)}")
        encoder = text_encoder_from_config(to_dict(cfg.text)).to(device)
        if encoder.dim != cfg.model.text_dim:
            raise ConfigError(f"text encoder '{cfg.text.encoder}' gives {encoder.dim}-d features but model.text_dim "
                              f"is {cfg.model.text_dim}: set --model.text_dim={encoder.dim}")
        self.text = CachedTextEncoder(encoder, cfg.text.cache_dir) if cfg.text.cache_dir else encoder
        self.resolution = self.vqvae.cfg.image_size
        self.scale_of_token = torch.cat([torch.full((pn * pn,), s) for s, pn in enumerate(cfg.model.patch_nums)])
        self.scale_sizes = [pn * pn for pn in cfg.model.patch_nums]
        # One cache per data set: record numbers are unique within a data set only.
        self.token_cache = TokenCache(cfg.model.vocab_size) if cfg.star_train.token_cache else None
        self.val_token_cache = TokenCache(cfg.model.vocab_size) if cfg.star_train.token_cache else None

    def tokens(self, batch: dict, cache: TokenCache | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Ground-truth tokens (B, L) of the batch's images and the transformer's input (B, L-1, Cvae), through
        ``cache`` (the data set's token cache, if any)."""
        img = batch["image"]
        if cache is None:
            gt = self.encode_tokens(img)
        else:
            gt = cache.lookup(batch["record"].tolist(), img, self.encode_tokens).to(self.device)
        with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
            return gt, self.vqvae.idx_to_var_input(list(gt.split(self.scale_sizes, dim=1)))

    def encode_tokens(self, img: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
            return torch.cat(self.vqvae.img_to_idx(img.to(self.device, non_blocking=True).float()), dim=1)

    def keep_mask(self) -> torch.Tensor | None:
        """Which tokens this step trains on (None: all). Drawn from the global RNG, which checkpoints restore.

        window: one square window per cropped scale, side keep_fraction * pn, at the same relative position on
        every cropped scale (so the windows are nested, as the scales are aligned); random: a random subset.
        """
        sc, pns = self.cfg.star_train, self.cfg.model.patch_nums
        if sc.token_drop == "none":
            return None
        first = sc.drop_from_scale % len(pns)
        keep = self.scale_of_token < first
        begin = sum(pn * pn for pn in pns[:first])
        if sc.token_drop == "random":
            n = len(keep) - begin
            chosen = torch.randperm(n)[: max(1, round(n * sc.keep_fraction))]
            keep[begin + chosen] = True
            return keep
        u, v = torch.rand(2).tolist()  # relative top-left of the window
        for pn in pns[first:]:
            side = max(1, round(pn * sc.keep_fraction))
            r0, c0 = round(u * (pn - side)), round(v * (pn - side))
            grid = torch.zeros(pn, pn, dtype=torch.bool)
            grid[r0:r0 + side, c0:c0 + side] = True
            keep[begin:begin + pn * pn] = grid.flatten()
            begin += pn * pn
        return keep

    def text_features(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(t.to(self.device) for t in self.text.encode(list(batch["caption"])))

    def loss(self, model: nn.Module, batch: dict):
        gt, var_input = self.tokens(batch, self.token_cache)
        hidden, mask, pooled = self.text_features(batch)
        keep = self.keep_mask()
        if keep is None:
            logits, _ = model(var_input, hidden, mask, pooled)
            lvl = self.scale_of_token.to(gt.device)
        else:
            keep = keep.to(gt.device)
            logits, _ = model(var_input, hidden, mask, pooled, keep=keep)
            gt, lvl = gt[:, keep], self.scale_of_token.to(gt.device)[keep]
        loss = self.weighted_cross_entropy(logits, gt, lvl, self.cfg.optim.label_smoothing)
        with torch.no_grad():
            metrics = self.token_metrics(logits, gt, lvl)
            metrics["tokens"] = float(gt.numel())  # trained tokens in this micro-batch (the loop logs tokens/s)
            metrics["flops"] = float(star_training_flops(self.cfg.model, *gt.shape, hidden.shape[1]))
        return loss, metrics

    def evaluate(self, model: nn.Module, batch: dict) -> dict[str, float]:
        """Validation: teacher-forced cross-entropy weighted as in training but without label smoothing (``loss``)
        and the metrics of ``token_metrics``, on every token (no token dropping)."""
        gt, var_input = self.tokens(batch, self.val_token_cache)
        logits, _ = model(var_input, *self.text_features(batch))
        lvl = self.scale_of_token.to(gt.device)
        return {"loss": self.weighted_cross_entropy(logits, gt, lvl).item(), **self.token_metrics(logits, gt, lvl)}

    def weighted_cross_entropy(self, logits: torch.Tensor, gt: torch.Tensor, lvl: torch.Tensor,
                               label_smoothing: float = 0.0) -> torch.Tensor:
        """logits (B, L, V), targets (B, L), each token's scale (L,) -> the loss of ``star_train.loss_weighting``."""
        V = logits.shape[-1]
        if self.cfg.star_train.loss_weighting == "scale":  # the mean over scales of each scale's mean
            ce = F.cross_entropy(logits.reshape(-1, V), gt.reshape(-1), reduction="none",
                                 label_smoothing=label_smoothing)
            return (ce.view(gt.shape) * scale_balanced_weights(lvl)).sum(1).mean()
        return F.cross_entropy(logits.reshape(-1, V), gt.reshape(-1), label_smoothing=label_smoothing)  # official

    def token_metrics(self, logits: torch.Tensor, gt: torch.Tensor, lvl: torch.Tensor) -> dict[str, float]:
        """Accuracy overall, and cross-entropy and accuracy per scale (``loss_scale{s}``, ``acc_scale{s}``; NaN for
        a scale without tokens). The per-scale sums are one product with a one-hot scale matrix, read with the rest
        in one transfer (``host_values``): a boolean selection and ``.item()`` per scale made two host-device syncs
        per scale on a GPU."""
        S = len(self.cfg.model.patch_nums)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), gt.reshape(-1),
                             reduction="none").view(gt.shape)
        correct = (logits.argmax(-1) == gt).float()
        one_hot = (lvl[:, None] == torch.arange(S, device=lvl.device)).float()  # (L, S)
        sums = torch.stack((ce.sum(0), correct.sum(0), torch.full_like(ce[0], gt.shape[0]))) @ one_hot  # (3, S)
        loss_s, acc_s = sums[0] / sums[2], sums[1] / sums[2]
        return host_values({"acc": correct.mean(), **{f"loss_scale{s}": loss_s[s] for s in range(S)},
                            **{f"acc_scale{s}": acc_s[s] for s in range(S)}})

    def after_step(self, step: int, metrics: dict) -> None:
        pass

    @torch.no_grad()
    def generate(self, prompts: list[str], seed: int = 0) -> torch.Tensor:
        sc = self.cfg.star_train
        hidden, mask, pooled = (t.to(self.device) for t in self.text.encode(list(prompts) + [""] * len(prompts)))
        gen = torch.Generator(self.device).manual_seed(seed)
        return self.model.generate(self.vqvae, hidden, mask, pooled, cfg=sc.sample_cfg, guidance=sc.sample_guidance,
                                   top_k=sc.sample_top_k, top_p=sc.sample_top_p, generator=gen)

    def sample(self, step: int, out_dir: Path, writer) -> None:
        prompts = self.cfg.star_train.sample_prompts
        if not prompts:
            return
        from torchvision.utils import make_grid, save_image
        was_training = self.model.training
        self.model.eval()
        grid = make_grid(self.generate(prompts).cpu(), nrow=min(len(prompts), 8))
        self.model.train(was_training)
        (out_dir / "samples").mkdir(parents=True, exist_ok=True)
        save_image(grid, out_dir / "samples" / f"step_{step:08d}.png")
        (out_dir / "samples" / "prompts.txt").write_text("\n".join(prompts))
        writer.add_image("samples", grid, step)

    def export(self, out_dir: Path, ema_state: dict | None) -> None:
        save_pretrained(out_dir, star=with_ema_weights(self.model, ema_state), vqvae=self.vqvae,
                        extra_config=self.pipeline_config())

    def pipeline_config(self) -> dict:
        """What an exported pipeline records besides the models: its text encoder and sampling defaults."""
        return {"text": to_dict(self.cfg.text), "generation": self.cfg.star_train.generation()}
