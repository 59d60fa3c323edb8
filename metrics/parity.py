"""Parity with the official implementation: rebuild the reference tiny models from a reference directory
(``tiny_*_state.safetensors`` + ``tiny_*_golden.safetensors`` + ``.json``), rerun every recorded call with our
code and compare. Everything needed comes from those files, so any directory of the same format works.

Each ``check_*`` returns ``{"pass": bool, "tensors": {name: {"max_abs": .., "match": .., "tol": ..}}}``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from models.sampler import SamplerHead, split_official_state_dict
from models.star import STAR, StarConfig
from models.vqvae import VQVAE, VQVAEConfig

FLOAT_TOL = 1e-5  # holds on the reference CPU (max 1.8e-6 unguided); AVX-512 and CUDA kernels differ by ~1.4e-5
# Decoded images pass ~20 convolutions whose CPU kernels (AVX2 / AVX-512 / AMX, NCHW or channels-last) round
# differently: up to 2.0e-5 apart on an AVX-512+AMX Xeon. Their tolerance is this factor times FLOAT_TOL,
# still three orders of magnitude below one 8-bit grey level (7.8e-3 on [-1, 1]).
IMAGE_TOL_FACTOR = 4.0


def _load(path: Path) -> dict[str, torch.Tensor]:
    # Clone: tensors straight from safetensors may be unaligned, which changes CPU kernels' last bits.
    return {k: (v.float() if v.is_floating_point() else v).clone() for k, v in load_file(str(path)).items()}


def _compare(report: dict, name: str, ours: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    ours, ref = ours.detach().cpu(), ref.cpu()
    if ours.shape != ref.shape:
        report[name] = {"error": f"shape {list(ours.shape)} != reference {list(ref.shape)}", "ok": False}
    elif ref.is_floating_point():
        err = (ours.float() - ref).abs().max().item()
        report[name] = {"max_abs": err, "tol": tol, "ok": err <= tol}
    else:
        match = (ours == ref).float().mean().item()
        report[name] = {"match": match, "ok": match == 1.0}


def _compare_image(report: dict, name: str, ours: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    _compare(report, name, ours, ref, tol * IMAGE_TOL_FACTOR)


def _result(tensors: dict) -> dict:
    return {"pass": bool(tensors) and all(t["ok"] for t in tensors.values()), "tensors": tensors}


def build_reference_vqvae(ref_dir: Path) -> VQVAE:
    kw = json.loads((ref_dir / "tiny_vae_golden.json").read_text())["vae_kwargs"]
    cfg = VQVAEConfig(vocab_size=kw["vocab_size"], z_channels=kw["z_channels"], ch=kw["ch"],
                      ch_mult=tuple(kw.get("ch_mult", (1, 1, 2, 2, 4))), num_res_blocks=kw.get("num_res_blocks", 2),
                      patch_nums=tuple(kw["v_patch_nums"]), num_phis=kw["share_quant_resi"],
                      phi_ratio=kw.get("quant_resi", 0.5), beta=kw.get("beta", 0.25))
    vae = VQVAE(cfg).eval()
    vae.load_state_dict(_load(ref_dir / "tiny_vae_state.safetensors"), strict=True)
    return vae


def reference_star_config(meta: dict, legacy_batch0: bool = True) -> StarConfig:
    """StarConfig equal to the official constructor recorded in a golden JSON."""
    kw = meta["build_vae_var_kwargs"]
    depth = kw["depth"]
    return StarConfig(depth=depth, width=64 * depth, num_heads=depth, vocab_size=kw["V"], z_channels=kw["Cvae"],
                      text_dim=kw["in_dim_cross"], patch_nums=tuple(kw["patch_nums"]), rope=kw["rope_emb"],
                      rope_theta=float(kw["rope_theta"]), rope_norm=float(kw["rope_norm"]),
                      qk_norm=kw["attn_l2_norm"], cross_attn=kw["enable_cross"], head_norm=kw["enable_logit_norm"],
                      legacy_cross_attn_batch0=legacy_batch0)


def check_vae(ref_dir: Path, device: str = "cpu", tol: float = FLOAT_TOL) -> dict:
    vae = build_reference_vqvae(ref_dir).to(device)
    g = {k: v.to(device) for k, v in _load(ref_dir / "tiny_vae_golden.safetensors").items()}
    report: dict = {}
    with torch.no_grad():
        img = g["img"]
        _compare(report, "f", vae.encode(img), g["f"], tol)
        idx = vae.img_to_idx(img)
        fhat = vae.img_to_fhat(img)
        for si in range(len(idx)):
            _compare(report, f"idx_{si}", idx[si], g[f"idx_{si}"], tol)
            _compare(report, f"fhat_{si}", fhat[si], g[f"fhat_{si}"], tol)
        _compare(report, "var_input", vae.idx_to_var_input(idx), g["var_input"], tol)
        _compare_image(report, "rec_img", vae.idx_to_img(idx), g["rec_img"], tol)
        _compare_image(report, "rec_img_per_scale", torch.stack(vae.idx_to_img(idx, every_scale=True)),
                       g["rec_img_per_scale"], tol)
        _compare_image(report, "fhat_to_img", vae.fhat_to_img(g[f"fhat_{len(idx) - 1}"]), g["fhat_to_img"], tol)
    return _result(report)


def check_star(ref_dir: Path, device: str = "cpu", tol: float = FLOAT_TOL) -> dict:
    meta = json.loads((ref_dir / "tiny_star_golden.json").read_text())
    g = {k: v.to(device) for k, v in _load(ref_dir / "tiny_star_golden.safetensors").items()}
    vae = build_reference_vqvae(ref_dir).to(device)
    model = STAR(reference_star_config(meta)).eval()
    model.load_state_dict(_load(ref_dir / "tiny_star_state.safetensors"), strict=True)
    model.to(device)
    report: dict = {}
    B = g["gt_idx"].shape[0]
    text = (g["enc_hidden"], g["enc_mask"], g["enc_pooled"])

    # Teacher-forced forward and the training loss/gradients.
    logits, hidden = model(g["var_input"], *(t[:B] for t in text))
    _compare(report, "logits", logits, g["logits"], tol)
    _compare(report, "hidden_out", hidden, g["hidden_out"], tol)
    loss = F.cross_entropy(logits.flatten(0, 1), g["gt_idx"].flatten())
    _compare(report, "loss", loss.detach().view(1), g["loss"], tol)
    loss.backward()
    params = dict(model.named_parameters())
    grad = {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in params.items()}
    grad_norms = torch.stack([grad[n].norm() for n in meta["grad_param_order"]])
    _compare(report, "grad_norms", grad_norms, g["grad_norms"], tol)
    for key in (k for k in g if k.startswith("grad.")):
        _compare(report, key, grad[key[len("grad."):]], g[key], tol)

    # Generation: greedy CFG runs and the seeded top-k/top-p run.
    for tag, args in meta["infer_args"].items():
        if args["top_k"] != 1 and torch.device(device).type != "cpu":
            continue  # random sampling: the generator's stream differs between devices; greedy runs are compared
        gen = torch.Generator(device).manual_seed(args["g_seed"])
        img, tokens, guided = model.generate(
            vae, *text, cfg=args["cfg"], top_k=args["top_k"], top_p=args["top_p"],
            gumbel_smooth=args["more_smooth"], generator=gen, return_tokens=True, return_logits=True)
        S = len(tokens)
        for si in range(S):
            _compare(report, f"{tag}.idx_{si}", tokens[si], g[f"{tag}.idx_{si}"], tol)
            if f"{tag}.logits_{si}" in g:
                # Guidance amplifies float error: (1+t) cond - t uncond has error up to (1+2t) times that of
                # the logits, so the tolerance grows with the guidance weight t of the scale.
                t = args["cfg"] * si / (S - 1)
                _compare(report, f"{tag}.logits_{si}", guided[si], g[f"{tag}.logits_{si}"], tol * (1 + 2 * t))
        _compare_image(report, f"{tag}.img", img, g[f"{tag}.img"], tol)
    return _result(report)


class OfficialPositionNoise:
    """Replays the official random-position stream for one sampler scale.

    The official sampler draws its random positions from the *global* torch RNG (seeded by the caller), and
    ``Scheduler.get_mask`` discards one ``torch.rand`` of shape (2B, n) before every used draw of shape (B, n).
    Our generation takes these scores from ``position_noise`` (by default the one generator of the call);
    this object reproduces the official stream instead. (With several sampler scales the official code also
    discards a draw at every later step; the reference data has one sampler scale.)
    """

    def __init__(self, seed: int):
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, shape, generator, device) -> torch.Tensor:
        B, n = shape
        torch.rand((2 * B, n), generator=self.gen)
        return torch.rand((B, n), generator=self.gen).to(device)


def build_reference_sampler(ref_dir: Path, meta: dict, vae: VQVAE):
    """(backbone, head) of the reference sampler model, loaded with strict keys from one official flat dict."""
    kw = meta["VAR_kwargs"]
    cfg = StarConfig(depth=kw["depth"], width=kw["embed_dim"], num_heads=kw["num_heads"],
                     vocab_size=vae.cfg.vocab_size, z_channels=vae.cfg.z_channels, text_dim=kw["in_dim_cross"],
                     patch_nums=tuple(kw["patch_nums"]), rope=kw["rotary_pos_emb"], rope_theta=float(kw["rope_theta"]),
                     rope_norm=float(kw["rope_norm"]), qk_norm=kw["attn_l2_norm"], cross_attn=kw["enable_cross"],
                     head_norm=kw["enable_logit_norm"], drop_path_rate=kw["drop_path_rate"],
                     legacy_cross_attn_batch0=True)
    backbone_state, head_state = split_official_state_dict(_load(ref_dir / "tiny_star_sampler_state.safetensors"))
    star = STAR(cfg).eval()
    star.load_state_dict(backbone_state, strict=True)
    head = SamplerHead(cfg, sample_from=kw["sample_from_idx"]).eval()
    head.load_state_dict(head_state, strict=True)
    return star, head


def check_sampler(ref_dir: Path, device: str = "cpu", tol: float = FLOAT_TOL) -> dict:
    """Generation with the sampler head, greedy (top-k 1), in the official 'new' and '1024' versions.

    Compared: the indices returned by every token-sampling call (backbone scales and each refinement step:
    with top-k 1 they do not depend on the RNG), the committed token embeddings h of every scale, and the
    image. Which positions a step commits does depend on the RNG; those comparisons replay the official
    global-RNG stream (``OfficialPositionNoise``).
    """
    meta = json.loads((ref_dir / "tiny_star_sampler_golden.json").read_text())
    g = {k: v.to(device) for k, v in _load(ref_dir / "tiny_star_sampler_golden.safetensors").items()}
    text_golden = _load(ref_dir / "tiny_star_golden.safetensors")
    text = tuple(text_golden[k].to(device) for k in ("enc_hidden", "enc_mask", "enc_pooled"))
    vae = build_reference_vqvae(ref_dir).to(device)
    star, head = (m.to(device) for m in build_reference_sampler(ref_dir, meta, vae))
    codebook = vae.quantize.embedding.weight
    report: dict = {}
    schedules = {"new": "default", "1024": "official-1024"}
    for tag, args in meta["infer_args"].items():
        steps: list[torch.Tensor] = []
        img, tokens = star.generate(
            vae, *text, cfg=args["cfg"], top_k=args["top_k"], top_p=args["top_p"],
            generator=torch.Generator(device).manual_seed(args["g_seed"]), sampler=head,
            sampler_schedule=schedules[args["sample_version"]],
            sampler_noise=OfficialPositionNoise(args["torch_manual_seed_before_call"]),
            sampler_step_callback=lambda step, idx, committed, steps=steps: steps.append(idx.clone()),
            return_tokens=True)
        calls = tokens[:head.sample_from] + steps  # one sampling call per backbone scale, then one per step
        for j in range(args["n_sampling_calls"]):
            key = f"{tag}.call{j:02d}.idx"
            ours = calls[j] if j < len(calls) else torch.full_like(g[key], -1)
            _compare(report, key, ours.view(g[key].shape), g[key], tol)
        for si, idx in enumerate(tokens):
            ref = g[f"{tag}.h_{si}"]
            _compare(report, f"{tag}.h_{si}", codebook[idx].transpose(1, 2).reshape(ref.shape), ref, tol)
        _compare_image(report, f"{tag}.img", img, g[f"{tag}.img"], tol)
    return _result(report)


PARTS = {"vae": check_vae, "star": check_star, "sampler": check_sampler}


def run(ref_dir: str | Path, parts: list[str], device: str = "cpu", float_tol: float = FLOAT_TOL) -> dict:
    ref_dir = Path(ref_dir)
    out: dict = {"reference_dir": str(ref_dir), "device": device, "parts": {}}
    for part in parts:
        try:
            out["parts"][part] = PARTS[part](ref_dir, device, float_tol)
        except FileNotFoundError as e:
            out["parts"][part] = {"pass": False, "error": f"missing reference file: {e.filename}", "tensors": {}}
    out["pass"] = all(p["pass"] for p in out["parts"].values())
    return out
