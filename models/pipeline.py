"""StarPipeline: text encoder + STAR transformer (+ sampler head) + VQ-VAE decoder, for inference.

    pipe = StarPipeline.from_pretrained("outputs/quickstart/pipeline")            # our directory format
    pipe = StarPipeline.from_pretrained("star_1024.pth", preset="star-d30-1024",   # an official checkpoint
                                        vae="vae_ch160v4096z32.pth", text_encoder=("hf-clip", "clip-vit-h"))
    images = pipe(["a red circle"], cfg=4.0, top_k=900, top_p=0.95, seed=0)      # list of PIL images
    pipe.save_pretrained("my_pipeline")

Editing (zero-shot in-/out-painting): ``pipe.edit(prompt, image, mask)`` regenerates the masked region and
keeps every token outside it, at every scale, by teacher forcing.
"""
from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from models.checkpoint import (
    OFFICIAL_PRESETS,
    CheckpointError,
    load_official_star_and_sampler,
    load_pretrained_sampler,
    load_pretrained_star,
    load_vqvae_for,
    read_config,
    save_pretrained,
)
from models.sampler import SamplerHead
from models.sampling import OFFICIAL_GENERATION, check_sampling, guidance_weights
from models.star import STAR
from models.text_encoder import TextEncoder, build_text_encoder, text_encoder_from_config
from models.vqvae import VQVAE
from utils import cli
from utils.config import ConfigError
from utils.data.images import to_rgb

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
           "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """fp32 on CPU (no fast half kernels there); the given dtype (default bf16) as autocast dtype on CUDA."""
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ConfigError(f"unknown dtype {dtype!r}; use fp32, fp16 or bf16")
        dtype = _DTYPES[dtype]
    if device.type != "cuda":
        if dtype not in (None, torch.float32):
            raise ConfigError(f"{dtype} on {device.type}: half precision is for CUDA; this device runs fp32")
        return torch.float32
    return dtype or torch.bfloat16


def keep_masks(mask: torch.Tensor, patch_nums: tuple[int, ...]) -> list[torch.Tensor]:
    """Region mask (B, H, W), 1 = regenerate -> per scale bool (B, pn^2), True = keep the original token.
    A token is kept when less than half of its area is masked."""
    m = mask.float().unsqueeze(1)
    return [(F.interpolate(m, size=(pn, pn), mode="area") < 0.5).flatten(1) for pn in patch_nums]


class StarPipeline:
    def __init__(self, star: STAR, vqvae: VQVAE, text_encoder: TextEncoder, sampler: SamplerHead | None = None,
                 device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
                 text_config: dict | None = None, generation: dict | None = None):
        self.device = torch.device(device)
        unknown = set(generation or {}) - set(OFFICIAL_GENERATION)
        if unknown:
            raise ConfigError(f"unknown generation settings {sorted(unknown)}; known: {sorted(OFFICIAL_GENERATION)}")
        self.generation = {**OFFICIAL_GENERATION, **(generation or {})}
        self.dtype = resolve_dtype(dtype, self.device)
        self.star = star.to(self.device).eval()
        self.vqvae = vqvae.to(self.device).eval()
        self.text_encoder = text_encoder.to(self.device).eval()
        self.sampler = sampler.to(self.device).eval() if sampler is not None else None
        self.text_config = text_config or {}
        if text_encoder.dim != star.cfg.text_dim:
            raise CheckpointError(f"text encoder gives {text_encoder.dim}-d features, "
                                  f"the model expects {star.cfg.text_dim}")
        if tuple(vqvae.cfg.patch_nums) != tuple(star.cfg.patch_nums):
            raise CheckpointError(f"VQ-VAE schedule {vqvae.cfg.patch_nums} != "
                                  f"transformer schedule {star.cfg.patch_nums}")

    # --- loading and saving -----------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, vae: str | Path | VQVAE | None = None,
                        text_encoder: TextEncoder | str | tuple[str, str | None] | None = None,
                        preset: str | None = None, device: str | torch.device = "cpu",
                        dtype: str | torch.dtype | None = None, text_encoder_path: str | None = None,
                        **star_overrides) -> StarPipeline:
        """``path``: our directory (config.json + safetensors) or an official ``.pth`` (then ``preset``, ``vae``
        and ``text_encoder`` are required: the file holds only the transformer). ``vae``: a VQVAE, our directory
        or VAR's ``.pth``; ``text_encoder``: an encoder, a kind (``"tiny"``) or ``(kind, local path)``; the kind
        the directory records keeps its recorded settings (say the tiny encoder's depth). ``text_encoder_path``:
        where the encoder's weights are on this machine, if not where the directory says."""
        path = Path(path)
        text_config: dict = {}
        generation = None
        if path.is_dir():
            star = load_pretrained_star(path, **star_overrides)
            sampler = load_pretrained_sampler(path, star.cfg)
            saved = read_config(path)
            text_config, generation = saved.get("text", {}), saved.get("generation")
            if vae is None:
                if not (path / "vqvae.safetensors").is_file():
                    raise CheckpointError(f"{path} holds no vqvae.safetensors: pass the VQ-VAE it was trained with "
                                          "as vae= (--vae on the command line): our directory or VAR's .pth")
                vae = path
        elif path.is_file():
            if preset is None:
                raise CheckpointError(f"{path} is a file, so an official checkpoint: give its architecture with "
                                      f"preset= (--preset on the command line), one of {', '.join(OFFICIAL_PRESETS)}")
            star, sampler = load_official_star_and_sampler(path, preset)
        else:
            raise CheckpointError(f"no checkpoint at {path}")
        vqvae = _load_vae(vae, star)
        if isinstance(text_encoder, (str, tuple)):
            kind, enc_path = (text_encoder, None) if isinstance(text_encoder, str) else text_encoder
            if kind != text_config.get("encoder"):  # another encoder: nothing recorded applies to it
                text_config = {"encoder": kind, "path": None}
            text_config = {**text_config, "path": enc_path or text_config.get("path")}
        if text_encoder_path is not None and not isinstance(text_encoder, TextEncoder):
            text_config = {**text_config, "path": text_encoder_path}
        if text_encoder is None and "encoder" not in text_config:
            raise CheckpointError(f"{path} does not name its text encoder: pass text_encoder=(kind, path) (on the "
                                  "command line --text-encoder KIND --text-encoder-path DIR; official: hf-clip with "
                                  "SD 2.1's text encoder)")
        if not isinstance(text_encoder, TextEncoder):
            text_encoder = text_encoder_from_config(text_config)
        return cls(star, vqvae, text_encoder, sampler, device, dtype, text_config, generation)

    @classmethod
    def from_args(cls, args) -> StarPipeline:
        """The pipeline named by the options of ``add_pipeline_args`` (``args.ckpt`` must be set)."""
        return cls.from_pretrained(args.ckpt, vae=args.vae, text_encoder=args.text_encoder, preset=args.preset,
                                   device=args.device, dtype=args.dtype, text_encoder_path=args.text_encoder_path)

    @classmethod
    def tiny_random(cls, seed: int = 0, device: str | torch.device = "cpu") -> StarPipeline:
        """The embedded tiny model (randomly initialised, 64x64, tiny text encoder): for demos and tests of the
        plumbing when no checkpoint is at hand. Its images are noise-like."""
        from models import build_star, build_vqvae, star_config, vqvae_config
        torch.manual_seed(seed)
        star, vqvae = build_star(star_config("star-tiny")), build_vqvae(vqvae_config("vqvae-tiny"))
        return cls(star, vqvae, build_text_encoder("tiny"), device=device, text_config={"encoder": "tiny"})

    def save_pretrained(self, directory: str | Path) -> Path:
        return save_pretrained(directory, star=self.star, vqvae=self.vqvae, sampler=self.sampler,
                               extra_config={"text": self.text_config, "generation": self.generation})

    # --- generation -------------------------------------------------------------------------------------------
    def _autocast(self):
        if self.device.type == "cuda" and self.dtype != torch.float32:
            return torch.autocast("cuda", dtype=self.dtype)
        return contextlib.nullcontext()

    @torch.no_grad()
    def encode_text(self, prompts: list[str], negative: list[str]):
        hidden, mask, pooled = self.text_encoder.encode(list(prompts) + list(negative))
        return hidden.to(self.device), mask.to(self.device), pooled.to(self.device)

    def generation_settings(self, **overrides) -> dict:
        """The sampling settings (cfg, top_k, top_p, guidance_schedule) a call uses: each given one, else this
        pipeline's default (``self.generation``)."""
        settings = {**self.generation, **{k: v for k, v in overrides.items() if v is not None}}
        check_sampling(settings["cfg"], settings["top_k"], settings["top_p"])
        guidance_weights(settings["guidance_schedule"], settings["cfg"], self.star.num_scales)  # before any work
        return settings

    def __call__(self, prompts: str | list[str], negative_prompt: str | list[str] = "", cfg: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, seed: int | list[int] | None = None,
                 use_sampler: bool = True, guidance_schedule: str | list[float] | None = None,
                 sampler_schedule: str = "default", num_images: int = 1, return_tokens: bool = False,
                 progress: bool = False, keep_tokens: list[torch.Tensor] | None = None,
                 keep: list[torch.Tensor] | None = None):
        """Images for ``prompts`` (each repeated ``num_images`` times, in order) as a list of PIL images; with
        ``return_tokens`` also the token maps [(N, pn^2)] per scale. One batch, seeded by ``seed`` (None:
        random); a list of seeds, one per prompt, gives each prompt's images their own generator, so that they
        do not depend on the other prompts of the batch (up to floating-point rounding, which can differ
        between batch sizes). ``negative_prompt`` replaces "" as the unconditional text. Sampling settings
        left None take the pipeline's defaults (``generation_settings``). ``keep_tokens``/``keep`` (per scale
        (N, pn^2)): tokens forced where ``keep`` is True (editing; see ``edit``)."""
        sampling = self.generation_settings(cfg=cfg, top_k=top_k, top_p=top_p, guidance_schedule=guidance_schedule)
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or num_images < 1:
            raise ValueError(f"nothing to generate: {len(prompts)} prompts, num_images={num_images}")
        prompts = [p for p in prompts for _ in range(num_images)]
        negative = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else \
            [n for n in negative_prompt for _ in range(num_images)]
        if len(negative) != len(prompts):
            raise ValueError(f"{len(negative)} negative prompts for {len(prompts)} prompts")
        if seed is None:
            seed = int.from_bytes(os.urandom(4), "little")
        if isinstance(seed, (np.ndarray, torch.Tensor)):  # an array of seeds, one per prompt (or one seed)
            seed = seed.tolist()
        if not isinstance(seed, (list, tuple)):
            generator = seeded_generator(self.device, seed)
        elif len(seed) * num_images == len(prompts):
            generator = [seeded_generator(self.device, s) for s in seed]
        else:
            raise ValueError(f"{len(seed)} seeds for {len(prompts) // num_images} prompts: give one seed per prompt")
        text = self.encode_text(prompts, negative)
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=self.star.num_scales, desc="scales", leave=False)
        with self._autocast():
            img, tokens = self.star.generate(
                self.vqvae, *text, cfg=sampling["cfg"], guidance=sampling["guidance_schedule"],
                top_k=sampling["top_k"], top_p=sampling["top_p"], generator=generator,
                sampler=self.sampler if use_sampler else None,
                sampler_schedule=sampler_schedule, return_tokens=True, keep_tokens=keep_tokens, keep=keep,
                scale_callback=(lambda si: bar.update(1)) if bar is not None else None)
        if bar is not None:
            bar.close()
        images = to_pil(img)
        return (images, tokens) if return_tokens else images

    @torch.no_grad()
    def edit(self, prompt: str, image: Image.Image, mask: Image.Image | np.ndarray, **kwargs):
        """In-/out-painting: regenerate where ``mask`` is set (white / nonzero), keep the rest of ``image``'s
        tokens at every scale. Other keyword arguments as in ``__call__``."""
        size = self.vqvae.cfg.image_size
        img = to_rgb(image).resize((size, size), Image.BICUBIC)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None].to(self.device)
        m = np.asarray(mask.convert("L") if isinstance(mask, Image.Image) else mask, dtype=np.float32)
        if m.ndim == 3:  # (H, W, C) array, say an RGB(A) mask: a pixel is masked where any channel is set
            m = m.max(axis=2)
        if m.ndim != 2:
            raise ValueError(f"mask must be an image or an (H, W) / (H, W, C) array, got shape {m.shape}")
        m = torch.from_numpy(m / max(m.max(), 1e-8))[None, None]
        m = F.interpolate(m, size=(size, size), mode="nearest")[:, 0].to(self.device)
        n = kwargs.get("num_images", 1)
        known = [t.repeat(n, 1) for t in self.vqvae.img_to_idx(x)]
        keep = [k.repeat(n, 1) for k in keep_masks(m, self.star.cfg.patch_nums)]
        return self(prompt, keep_tokens=known, keep=keep, **kwargs)


SEED_RANGE = (-2 ** 63, 2 ** 64)  # what torch.Generator.manual_seed takes


def check_seed(seed) -> int:
    """``seed`` as an int, or a ValueError naming the range (torch's own error was 'Overflow when unpacking')."""
    seed = int(seed)
    if not SEED_RANGE[0] <= seed < SEED_RANGE[1]:
        raise ValueError(f"seed {seed} is out of range: seeds lie in [-2**63, 2**64)")
    return seed


def seeded_generator(device, seed) -> torch.Generator:
    return torch.Generator(device).manual_seed(check_seed(seed))


def add_pipeline_args(parser: argparse.ArgumentParser, ckpt_help: str) -> None:
    """Options saying which pipeline to load (``StarPipeline.from_args``): sample.py, demo_gradio.py and
    scripts/eval_mjhq.py take the same ones."""
    group = parser.add_argument_group("model")
    group.add_argument("--ckpt", help=ckpt_help)
    group.add_argument("--preset", choices=sorted(OFFICIAL_PRESETS), help="architecture of an official .pth")
    group.add_argument("--vae", help="VQ-VAE: our directory or VAR's vae_ch160v4096z32.pth (default: from --ckpt)")
    group.add_argument("--text-encoder", help="hf-clip | open_clip | t5 | tiny | minilm (default: from --ckpt)")
    group.add_argument("--text-encoder-path", help="local weights of the text encoder (default: from --ckpt)")
    group.add_argument("--device", type=cli.device_arg, default=cli.default_device())
    group.add_argument("--dtype", default=None, choices=sorted(_DTYPES),
                       help="CUDA autocast dtype (default bf16 there; the CPU runs fp32)")


def _load_vae(vae, star: STAR) -> VQVAE:
    if isinstance(vae, VQVAE):
        return vae
    if vae is None:
        raise CheckpointError("no VQ-VAE: pass vae= (--vae on the command line): our directory or VAR's "
                              "vae_ch160v4096z32.pth")
    return load_vqvae_for(vae, star.cfg.patch_nums)


def to_pil(img: torch.Tensor) -> list[Image.Image]:
    """(N, 3, H, W) in [0, 1] -> PIL images."""
    arr = img.float().clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]
