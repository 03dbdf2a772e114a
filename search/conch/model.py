"""CONCH's two encoders (image and text), with the released checkpoint's tensor names.

The image tower is a timm VisionTransformer trunk followed by CONCH's attentional poolers; the
text tower is a causal transformer with a learned CLS embedding. The captioning decoder is not
built: search needs only the contrastive space.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from search.conch.config import ModelCfg, TextCfg, VisionCfg, get_model_cfg


class AttentionalPooler(nn.Module):
    """Learned queries cross-attending to the trunk's tokens."""

    def __init__(self, d_model: int, context_dim: int, n_head: int, n_queries: int) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.zeros(n_queries, d_model))
        self.attn = nn.MultiheadAttention(d_model, n_head, kdim=context_dim, vdim=context_dim, batch_first=True)
        self.ln_q = nn.LayerNorm(d_model)
        self.ln_k = nn.LayerNorm(context_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        keys = self.ln_k(tokens)
        query = self.ln_q(self.query).unsqueeze(0).expand(tokens.shape[0], -1, -1)
        return self.attn(query, keys, keys, need_weights=False)[0]


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionCfg, embed_dim: int, embed_dim_caption: int) -> None:
        super().__init__()
        self.trunk = VisionTransformer(
            img_size=cfg.image_size,
            patch_size=cfg.patch_size,
            embed_dim=cfg.width,
            depth=cfg.layers,
            num_heads=cfg.num_heads,
            mlp_ratio=cfg.mlp_ratio,
            num_classes=0,
            dynamic_img_size=True,
        )
        self.attn_pool_contrast = AttentionalPooler(embed_dim, cfg.width, cfg.attn_pooler_heads, cfg.n_queries_contrast)
        self.ln_contrast = nn.LayerNorm(embed_dim)
        self.proj_contrast = nn.Parameter(torch.zeros(embed_dim, embed_dim))
        # Part of the released image tower (it feeds the captioning decoder); kept so the checkpoint
        # loads strictly, and exposed through `caption_tokens`.
        self.attn_pool_caption = AttentionalPooler(
            embed_dim_caption, cfg.width, cfg.attn_pooler_heads, cfg.n_queries_caption
        )
        self.ln_caption = nn.LayerNorm(embed_dim_caption)

    def pooled(self, pixels: torch.Tensor) -> torch.Tensor:
        """Attention-pooled, layer-normed image feature before the projection (the 'unprojected' feature)."""
        tokens = self.trunk.forward_features(pixels)
        return self.ln_contrast(self.attn_pool_contrast(tokens)[:, 0])

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.pooled(pixels) @ self.proj_contrast

    def caption_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.ln_caption(self.attn_pool_caption(self.trunk.forward_features(pixels)))


class TextAttention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's tensor names, run through fused SDPA."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.zeros(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        qkv = qkv.view(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=allowed)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, width))


class TextBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width)
        self.attn = TextAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(c_fc=nn.Linear(width, hidden), gelu=nn.GELU(), c_proj=nn.Linear(hidden, width))
        )

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), allowed)
        return x + self.mlp(self.ln_2(x))


class TextTransformer(nn.Module):
    def __init__(self, width: int, heads: int, layers: int) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList([TextBlock(width, heads) for _ in range(layers)])

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, allowed)
        return x


class TextTower(nn.Module):
    def __init__(self, cfg: TextCfg, embed_dim: int) -> None:
        super().__init__()
        self.context_length = cfg.context_length
        self.pad_id = cfg.pad_id
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.zeros(cfg.context_length, cfg.width))
        self.cls_emb = nn.Parameter(torch.zeros(cfg.width))
        self.transformer = TextTransformer(cfg.width, cfg.heads, cfg.layers)
        self.ln_final = nn.LayerNorm(cfg.width)
        self.text_projection = nn.Parameter(torch.zeros(cfg.width, embed_dim))

    def trimmed_length(self, tokens: torch.Tensor) -> int:
        """Positions the trimmed pass computes: the longest text's real tokens and its first pad. Computed
        where ``tokens`` are (on the host before they go to a GPU, so no device sync and no graph break)."""
        text = tokens[:, :-1]
        return min(int((text != self.pad_id).sum(dim=1).max()) + 1, text.shape[1])

    def forward(self, tokens: torch.Tensor, trim: bool = True, length: int | None = None) -> torch.Tensor:
        """Projected (unnormalised) text embedding from ``[n, context_length]`` token ids.

        The last token slot is dropped and the CLS embedding takes its place, at the last position's
        positional embedding. Attention is causal, and the CLS row sees key 0 always, key j >= 1 only
        if token j-1 is not padding, and itself only if the last token slot is not padding (CONCH was
        trained with this mask). So real tokens never see padding and CLS sees only the real tokens and
        the first pad: with ``trim`` the pass computes just those positions plus CLS, which gives the
        padded pass's output at a fraction of its cost. ``length``: ``trimmed_length`` of these tokens when
        the caller computed it already (from a host copy).
        """
        text = tokens[:, :-1]
        if trim:
            text = text[:, : self.trimmed_length(tokens) if length is None else length]
        length = text.shape[1]
        x = self.token_embedding(text) + self.positional_embedding[:length]
        cls = (self.cls_emb + self.positional_embedding[-1]).to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([x, cls], dim=1)
        x = self.transformer(x, self._allowed(text))
        return self.ln_final(x[:, -1]) @ self.text_projection

    def _allowed(self, text: torch.Tensor) -> torch.Tensor:
        """Boolean attention mask ``[n, 1, L+1, L+1]`` (True = may attend)."""
        batch, length = text.shape
        size = length + 1
        allowed = torch.ones(size, size, dtype=torch.bool, device=text.device).tril()
        allowed = allowed.expand(batch, size, size).clone()
        not_pad = text != self.pad_id
        allowed[:, -1, 1:] = not_pad
        allowed[:, -1, 0] = True
        return allowed.unsqueeze(1)


class Conch(nn.Module):
    def __init__(self, cfg: ModelCfg) -> None:
        super().__init__()
        self.cfg = cfg
        self.visual = VisionTower(cfg.vision_cfg, cfg.embed_dim, cfg.embed_dim_caption)
        self.text = TextTower(cfg.text_cfg, cfg.embed_dim)
        self.logit_scale = nn.Parameter(torch.zeros([]))

    def encode_image(self, pixels: torch.Tensor, normalize: bool = True, project: bool = True) -> torch.Tensor:
        features = self.visual(pixels) if project else self.visual.pooled(pixels)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(
        self, tokens: torch.Tensor, normalize: bool = True, trim: bool = True, length: int | None = None
    ) -> torch.Tensor:
        features = self.text(tokens, trim=trim, length=length)
        return F.normalize(features, dim=-1) if normalize else features


def create_model(name_or_cfg: str | Path | ModelCfg, checkpoint: str | Path | None = None) -> Conch:
    """Build CONCH from a config name, JSON path or ModelCfg; load a checkpoint strictly if given."""
    cfg = name_or_cfg if isinstance(name_or_cfg, ModelCfg) else get_model_cfg(name_or_cfg)
    model = Conch(cfg)
    if checkpoint is not None:
        from search.conch.checkpoint import load_checkpoint

        load_checkpoint(model, checkpoint)
    return model.eval()
