"""Checkpoint I/O: our release format and the official one.

Ours: a directory with ``config.json`` (the full model configs) + ``model.safetensors`` (+ ``vqvae.safetensors``).
Official: a ``.pth`` trainer dict (weights at ``ckpt["trainer"]["var_wo_ddp"]``) or a bare state dict; it does not
record RoPE/head-norm settings, so a preset (or an explicit StarConfig) supplies them.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from models.sampler import SamplerHead, split_official_state_dict
from models.star import STAR, StarConfig
from models.vqvae import PATCH_NUMS, VQVAE, VQVAEConfig
from utils.cli import InputError
from utils.config import from_dict, to_dict

OFFICIAL_SAMPLE_FROM = 9  # the released sampler heads cover scale indices >= 9
_OFFICIAL = dict(rope_theta=10000.0, rope_norm=64.0, text_dim=1024, legacy_cross_attn_batch0=True)

# The released STAR checkpoints: architecture and the settings their evaluation scripts use.
OFFICIAL_PRESETS: dict[str, dict] = {
    "star-d16-256": dict(depth=16, patch_nums=PATCH_NUMS["256"], **_OFFICIAL),
    "star-d30-256": dict(depth=30, patch_nums=PATCH_NUMS["256"], **_OFFICIAL),
    # The official 512 evaluation runs this checkpoint with the head LayerNorm off (eval_fid_topk.py).
    "star-d30-512": dict(depth=30, patch_nums=PATCH_NUMS["512"], head_norm=False, **_OFFICIAL),
    "star-d30-1024": dict(depth=30, patch_nums=PATCH_NUMS["1024"], **_OFFICIAL),
}

# Keys some official/VAR files carry that no STAR model uses.
_IGNORED_KEYS = ("lvl_1L", "attn_bias_for_masking")


class CheckpointError(InputError, RuntimeError):
    """A checkpoint is missing, unreadable, or does not fit the model it is loaded into."""


def atomic_save(write, path: str | Path) -> None:
    """Run ``write(tmp_path)`` then rename onto ``path``: a crash never leaves a half-written file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def mismatch_reason(error: RuntimeError, limit: int = 160) -> str:
    """The first difference ``load_state_dict``'s error lists (its first line only names the class), shortened."""
    details = [line.strip() for line in str(error).strip().splitlines()[1:] if line.strip()] or [str(error)]
    return details[0] if len(details[0]) <= limit else details[0][:limit - 3] + "..."


def load_weights_into(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str | Path) -> None:
    """``module.load_state_dict(state, strict=True)``; weights of another architecture are a CheckpointError
    naming the file and the first difference, not a traceback listing every tensor."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{source} does not fit this {type(module).__name__} ({mismatch_reason(e)}): "
                              "was it written with another config?") from None


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def save_pretrained(directory: str | Path, star: STAR | None = None, vqvae: VQVAE | None = None,
                    extra_config: dict | None = None, sampler: SamplerHead | None = None) -> Path:
    """Write ``config.json`` + safetensors weights for the given models into ``directory``."""
    directory = Path(directory)
    config: dict = dict(extra_config or {})
    if star is not None:
        config["star"] = to_dict(star.cfg)
        atomic_save(lambda p: save_file(_contiguous(star.state_dict()), p), directory / "model.safetensors")
    if sampler is not None:
        config["sampler"] = {"sample_from": sampler.sample_from, "num_blocks": sampler.num_blocks}
        atomic_save(lambda p: save_file(_contiguous(sampler.state_dict()), p), directory / "sampler.safetensors")
    if vqvae is not None:
        config["vqvae"] = to_dict(vqvae.cfg)
        atomic_save(lambda p: save_file(_contiguous(vqvae.state_dict()), p), directory / "vqvae.safetensors")
    atomic_save(lambda p: Path(p).write_text(json.dumps(config, indent=2)), directory / "config.json")
    return directory


def read_config(directory: str | Path) -> dict:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a star checkpoint directory (no config.json)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None


def load_pretrained_star(directory: str | Path, **config_overrides) -> STAR:
    """A STAR model from our directory format (``config_overrides`` e.g. legacy switches)."""
    cfg_dict = read_config(directory)
    if "star" not in cfg_dict:
        hint = (": it holds a VQ-VAE only; a STAR model is a STAR run's <loop.out_dir>/final (or the quickstart's "
                "pipeline/)") if "vqvae" in cfg_dict else ""
        raise CheckpointError(f"{directory}/config.json has no 'star' section{hint}")
    cfg = from_dict(StarConfig, {**cfg_dict["star"], **config_overrides})
    model = STAR(cfg)
    path = Path(directory) / "model.safetensors"
    load_weights_into(model, read_weights(path), path)
    return model.eval()


def load_pretrained_sampler(directory: str | Path, star_cfg: StarConfig) -> SamplerHead | None:
    """The sampler head saved next to a STAR model, or None if the directory has none."""
    section = read_config(directory).get("sampler")
    if section is None:
        return None
    head = SamplerHead(star_cfg, sample_from=section["sample_from"], num_blocks=section.get("num_blocks", 3))
    path = Path(directory) / "sampler.safetensors"
    load_weights_into(head, read_weights(path), path)
    return head.eval()


def load_pretrained_vqvae(directory: str | Path) -> VQVAE:
    cfg_dict = read_config(directory)
    if "vqvae" not in cfg_dict:
        raise CheckpointError(f"{directory}/config.json has no 'vqvae' section (not a VQ-VAE checkpoint)")
    cfg = from_dict(VQVAEConfig, cfg_dict["vqvae"])
    vae = VQVAE(cfg)
    path = Path(directory) / "vqvae.safetensors"
    load_weights_into(vae, read_weights(path), path)
    return vae.eval()


def load_vqvae_for(path: str, patch_nums: tuple[int, ...]) -> VQVAE:
    """A frozen VQ-VAE from our checkpoint directory or VAR's .pth, on the transformer's scale schedule."""
    p = Path(path)
    vae = load_pretrained_vqvae(p) if p.is_dir() else load_official_vqvae(p, VQVAEConfig(patch_nums=patch_nums))
    if tuple(vae.cfg.patch_nums) != tuple(patch_nums):  # the schedule only changes the usage buffer
        other = VQVAE(dataclasses.replace(vae.cfg, patch_nums=tuple(patch_nums)))
        other.load_state_dict(vae.state_dict())
        vae = other
    vae.eval().requires_grad_(False)
    return vae


def read_weights(path: str | Path):
    """What a ``.safetensors`` or ``.pth`` file holds (``.pth`` with ``weights_only=True``); CheckpointError when
    the file is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, corrupt, not a torch file, or one holding arbitrary Python objects
        # torch's own message suggests weights_only=False, i.e. running the file's code: never done here.
        reason = (str(e).splitlines() or [""])[0]
        if "Weights only load failed" in reason:
            reason = "not a weights-only PyTorch file (corrupt or truncated, or it holds Python objects)"
        raise CheckpointError(f"cannot read {path}: {type(e).__name__}: {reason}") from None


# --- official files ---------------------------------------------------------------------------------------------
def read_official_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The transformer (or VAE) weights of an official ``.pth``: trainer dict or bare state dict, with
    ``module.`` / ``_orig_mod.`` prefixes removed. Loaded with ``weights_only=True``."""
    state = read_weights(path)
    if isinstance(state, dict) and "trainer" in state:
        state = state["trainer"]["var_wo_ddp"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds no state dict")
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def adapt_official_state_dict(state: dict[str, torch.Tensor], model: STAR, allow_partial: bool = False,
                              generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Fit an official/VAR state dict to ``model``: drop unused buffers, rename VAR's ``head.*``, grow
    ``lvl_embed`` (and ``pos_1LC``) for a longer schedule with freshly initialised rows (progressive
    resolution), drop ``class_emb`` if the model has none. Any other mismatch is one readable error unless
    ``allow_partial`` (then the model's own values are kept for those keys)."""
    state = {k: v for k, v in state.items() if k.split(".")[-1] not in _IGNORED_KEYS}
    if "head.weight" in state and "head_logits.weight" not in state:  # VAR naming
        state["head_logits.weight"], state["head_logits.bias"] = state.pop("head.weight"), state.pop("head.bias")
    own = model.state_dict()
    if "class_emb.weight" not in own:
        state.pop("class_emb.weight", None)
    std = math.sqrt(1 / model.cfg.width / 3)
    for key in ("lvl_embed.weight", "pos_1LC"):
        if key in state and key in own:
            old, new = state[key], own[key]
            axis = 0 if key == "lvl_embed.weight" else 1
            if old.shape[axis] < new.shape[axis] and old.shape[axis + 1:] == new.shape[axis + 1:]:
                grown = torch.empty(new.shape, dtype=old.dtype).normal_(0, std, generator=generator)
                grown.narrow(axis, 0, old.shape[axis]).copy_(old)
                state[key] = grown
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(f"{k}: checkpoint {list(state[k].shape)} vs model {list(own[k].shape)}"
                        for k in set(own) & set(state) if state[k].shape != own[k].shape)
    if (missing or unexpected or mismatched) and not allow_partial:
        def fmt(title, keys):
            return f"\n  {title} ({len(keys)}): " + ", ".join(keys[:12]) + (" ..." if len(keys) > 12 else "")
        msg = "checkpoint does not fit the model"
        if missing:
            msg += fmt("missing", missing)
        if unexpected:
            msg += fmt("unexpected", unexpected)
        if mismatched:
            msg += fmt("shape mismatch", mismatched)
        msg += "\n" + describe_official_state_dict(state)
        msg += ("\n(check the preset/config: depth, text_dim, patch_nums, rope; to load anyway: allow_partial=True, "
                "convert_official.py --allow-partial)")
        raise CheckpointError(msg)
    return {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}


def describe_official_state_dict(state: dict[str, torch.Tensor]) -> str:
    """What a transformer state dict holds (depth, width, text width, scales) and the presets of that shape."""
    blocks = {int(k.split(".")[1]) for k in state if k.startswith("blocks.")}
    if not blocks or "lvl_embed.weight" not in state:
        return "the file holds no STAR transformer (no blocks.* / lvl_embed.weight)"
    scales, width = state["lvl_embed.weight"].shape
    text_dim = state["encoder_proj.weight"].shape[1] if "encoder_proj.weight" in state else None
    shape = dict(depth=max(blocks) + 1, width=width, text_dim=text_dim, scales=scales)
    fits = []
    for name, kwargs in OFFICIAL_PRESETS.items():
        cfg = StarConfig(**kwargs)
        if (cfg.depth, cfg.width, cfg.text_dim) == (shape["depth"], width, text_dim) and \
                len(cfg.patch_nums) >= scales:  # longer schedules grow lvl_embed (progressive resolution)
            fits.append(name)
    held = ", ".join(f"{k} {v}" for k, v in shape.items())
    return f"the checkpoint holds: {held}; presets of that shape: {', '.join(fits) or 'none'}"


def load_official_star(path: str | Path, preset: str | None = None, config: StarConfig | None = None,
                       allow_partial: bool = False) -> STAR:
    """A STAR model from an official ``.pth``, built from a preset name or an explicit config (a sampler
    head in the file is ignored; see ``load_official_star_and_sampler``)."""
    return load_official_star_and_sampler(path, preset, config, allow_partial)[0]


def load_official_star_and_sampler(path: str | Path, preset: str | None = None, config: StarConfig | None = None,
                                   allow_partial: bool = False, sample_from: int = OFFICIAL_SAMPLE_FROM
                                   ) -> tuple[STAR, SamplerHead | None]:
    """Backbone and (if the file has one, as the official ``train_sampler.py`` checkpoints) sampler head."""
    if config is None:
        if preset not in OFFICIAL_PRESETS:
            raise CheckpointError(f"official checkpoints need a preset ({', '.join(OFFICIAL_PRESETS)}) or a "
                                  f"StarConfig: RoPE and head settings are not stored in the file")
        config = StarConfig(**OFFICIAL_PRESETS[preset])
    model = STAR(config)
    model.init_weights()
    backbone_state, head_state = split_official_state_dict(read_official_state_dict(path))
    state = adapt_official_state_dict(backbone_state, model, allow_partial)
    model.load_state_dict(state, strict=not allow_partial)
    head = None
    if head_state:
        head = SamplerHead(config, sample_from)
        load_weights_into(head, head_state, f"the sampler head in {path}")
        head.eval()
    return model.eval(), head


def load_official_vqvae(path: str | Path, config: VQVAEConfig | None = None) -> VQVAE:
    """VAR's ``vae_ch160v4096z32.pth`` (bare state dict) into a VQVAE of the given (default: released) config."""
    vae = VQVAE(config or VQVAEConfig())
    load_weights_into(vae, read_official_state_dict(path), path)
    return vae.eval()
