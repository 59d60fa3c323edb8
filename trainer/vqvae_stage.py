"""VQ-VAE training step: reconstruction + multi-scale VQ losses, codebook usage tracking, dead-code restart."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as tdist
import torch.nn.functional as F
from torch import nn

from metrics.reconstruction import psnr_db
from models.checkpoint import load_weights_into, read_official_state_dict, read_weights, save_pretrained
from models.quant import phi_index_table
from models.vqvae import VQVAE
from trainer.config import RunConfig
from trainer.loop import host_values
from trainer.optim import with_ema_weights
from utils import dist


class PatchDiscriminator(nn.Module):
    """A small PatchGAN: one real/fake logit per overlapping patch."""

    def __init__(self, ch: int = 64):
        super().__init__()
        def block(c_in, c_out, stride):  # 3x3 kernels with padding: valid for any image size
            return [nn.Conv2d(c_in, c_out, 3, stride, 1), nn.GroupNorm(8, c_out), nn.LeakyReLU(0.2)]
        self.net = nn.Sequential(nn.Conv2d(3, ch, 3, 2, 1), nn.LeakyReLU(0.2), *block(ch, 2 * ch, 2),
                                 *block(2 * ch, 4 * ch, 1), nn.Conv2d(4 * ch, 1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def mse_01(rec: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
    """Mean squared error of images in [-1, 1], computed on [0, 1] (a 0-d tensor: no host read)."""
    return ((rec.clamp(-1, 1) - img) / 2).pow(2).mean()


class VQVAEStage:
    def __init__(self, cfg: RunConfig, device: torch.device):
        self.cfg, self.tcfg, self.device = cfg, cfg.vqvae_train, device
        self.model = VQVAE(cfg.vqvae)
        if cfg.loop.init_from:  # fine-tune from our checkpoint dir or VAR's .pth (the usage buffer may differ)
            p = Path(cfg.loop.init_from)
            state = read_weights(p / "vqvae.safetensors") if p.is_dir() else read_official_state_dict(p)
            load_weights_into(self.model, state, p)
        # A short schedule can leave phi convs unused (3 scales use 3 of the 4): freeze those, or DDP would wait
        # for gradients they never get and fail at the second step.
        q = self.model.quantize
        used = set(phi_index_table(q.num_scales, len(q.quant_resi.qresi_ls)))
        for k, phi in enumerate(q.quant_resi.qresi_ls):
            phi.requires_grad_(k in used)
        self.perceptual = None
        if self.tcfg.perceptual_weight > 0:
            from trainer.perceptual import PerceptualLoss
            self.perceptual = PerceptualLoss(self.tcfg.perceptual_vgg, self.tcfg.perceptual_lin).to(device)
        self.disc = self.disc_opt = None
        if self.tcfg.disc_weight > 0:
            self.disc = PatchDiscriminator().to(device)
            self.disc_opt = torch.optim.AdamW(self.disc.parameters(), lr=self.tcfg.disc_lr, betas=(0.5, 0.9))
        self._step = 0
        self._latents = None
        # Codebook hits (all scales, all ranks) since the last dead-code check; a code is dead when the window
        # saw (almost) none of it. A window rather than the usage EMA: restarted codes get no grace period in
        # which unused ones look alive.
        self._window_hits = torch.zeros(cfg.vqvae.vocab_size, device=device)  # stays on device: no sync
        self._fixed_batch = None

    def reconstruction_loss(self, rec: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        return F.l1_loss(rec, img) if self.tcfg.recon == "l1" else F.mse_loss(rec, img)

    def loss(self, model: nn.Module, batch: dict):
        img = batch["image"].to(self.device, non_blocking=True)
        rec, vq_loss, hits, f = model(img)
        rec = rec.float()
        recon = self.reconstruction_loss(rec, img)
        loss = recon + self.tcfg.vq_weight * vq_loss
        perceptual = None
        if self.perceptual is not None:
            perceptual = self.perceptual(rec, img)
            loss = loss + self.tcfg.perceptual_weight * perceptual
        gan = None
        if self.disc is not None and self._step >= self.tcfg.disc_start:
            gan = self.discriminator_step(img, rec)
            loss = loss + self.tcfg.disc_weight * gan
        with torch.no_grad():
            q = self.model.quantize
            if dist.is_initialized() and dist.get_world_size() > 1:
                tdist.all_reduce(hits)
            share = hits / hits.sum(1, keepdim=True).clamp_min(1) * q.vocab_size  # 1.0 = uniform usage
            q.ema_vocab_hit_SV.mul_(0.99).add_(share, alpha=0.01)
            self._window_hits += hits.sum(0)
            self._latents = f.detach().float()
            used = (q.ema_vocab_hit_SV > self.tcfg.dead_threshold).float().mean(1)
            values = {"recon": recon, "vq": vq_loss, "mse": mse_01(rec, img), "perceptual": perceptual, "gan_g": gan,
                      **{f"usage_scale{s}": u for s, u in enumerate(used)}}
            metrics = host_values({k: v for k, v in values.items() if v is not None})
            metrics["psnr"] = psnr_db(metrics.pop("mse"))
            if gan is not None:
                metrics["gan_d"] = self._last_d_loss
        if self._fixed_batch is None:
            self._fixed_batch = img[:8].detach().cpu()
        return loss, metrics

    def evaluate(self, model: nn.Module, batch: dict) -> dict[str, float]:
        """Validation: reconstruction + VQ loss (``loss``; the perceptual and GAN terms left out), its parts and
        PSNR. No codebook statistics are touched."""
        img = batch["image"].to(self.device, non_blocking=True)
        rec, vq_loss, _, _ = model(img)
        rec = rec.float()
        recon = self.reconstruction_loss(rec, img)
        metrics = host_values({"loss": recon + self.tcfg.vq_weight * vq_loss, "recon": recon, "vq": vq_loss,
                               "mse": mse_01(rec, img)})
        metrics["psnr"] = psnr_db(metrics.pop("mse"))
        return metrics

    def discriminator_step(self, img: torch.Tensor, rec: torch.Tensor) -> torch.Tensor:
        """Update the discriminator (hinge loss, fp32, gradients averaged over ranks) and return the
        generator's adversarial loss -D(rec)."""
        disc = self.disc
        with torch.autocast(img.device.type, enabled=False):
            self.disc_opt.zero_grad(set_to_none=True)  # also drops what the last generator loss left in D
            d_loss = F.relu(1 - disc(img)).mean() + F.relu(1 + disc(rec.detach().float())).mean()
            d_loss.backward()
            if dist.is_initialized() and dist.get_world_size() > 1:
                for p in disc.parameters():
                    tdist.all_reduce(p.grad)
                    p.grad /= dist.get_world_size()
            self.disc_opt.step()
            self._last_d_loss = d_loss.item()
            return -disc(rec.float()).mean()

    def state_dict(self) -> dict:
        """Stage state that must survive a resume (the loop stores it in the checkpoint)."""
        state = {"step": self._step, "window_hits": self._window_hits.clone()}
        if self.disc is not None:
            state.update(disc=self.disc.state_dict(), disc_opt=self.disc_opt.state_dict())
        return state

    def load_state_dict(self, state: dict) -> None:
        self._step = state.get("step", 0)
        if "window_hits" in state:
            self._window_hits = state["window_hits"].to(self.device)
        if self.disc is not None and "disc" in state:
            self.disc.load_state_dict(state["disc"])
            self.disc_opt.load_state_dict(state["disc_opt"])

    @torch.no_grad()
    def after_step(self, step: int, metrics: dict) -> None:
        self._step = step
        every = self.tcfg.restart_dead_every
        if not every or step % every or self._latents is None:
            return
        q = self.model.quantize
        window = self._window_hits
        share = window / window.sum().clamp_min(1) * q.vocab_size  # 1.0 = a uniform share of the window's hits
        dead = (share < self.tcfg.dead_threshold).nonzero().flatten()
        window.zero_()
        if len(dead):
            # Re-seed from the vectors the quantizer actually looks up: the residual at every scale (the raw
            # latent only matches the first scale's inputs; later scales quantize small residuals).
            pool = torch.cat([z.permute(0, 2, 3, 1).reshape(-1, q.z_channels)
                              for z in q.residual_inputs(self._latents)])
            pick = pool[torch.randint(len(pool), (len(dead),), device=pool.device)]
            q.embedding.weight[dead] = pick + 0.01 * pick.std() * torch.randn_like(pick)
        if dist.is_initialized() and dist.get_world_size() > 1:  # every rank keeps rank 0's codebook
            tdist.broadcast(q.embedding.weight.data, 0)
            tdist.broadcast(q.ema_vocab_hit_SV, 0)
        metrics["restarted_codes"] = float(len(dead))

    @torch.no_grad()
    def sample(self, step: int, out_dir: Path, writer) -> None:
        if self._fixed_batch is None:
            return
        from torchvision.utils import make_grid, save_image
        was_training = self.model.training
        self.model.eval()
        img = self._fixed_batch.to(self.device)
        rec = self.model.idx_to_img(self.model.img_to_idx(img))
        grid = make_grid(torch.cat([img, rec]).add(1).div(2).clamp(0, 1).cpu(), nrow=len(img))
        (out_dir / "samples").mkdir(parents=True, exist_ok=True)
        save_image(grid, out_dir / "samples" / f"recon_{step:08d}.png")
        writer.add_image("reconstructions", grid, step)
        self.model.train(was_training)

    def export(self, out_dir: Path, ema_state: dict | None) -> None:
        save_pretrained(out_dir, vqvae=with_ema_weights(self.model, ema_state))
