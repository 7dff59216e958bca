"""Shape and checkpoint-mapping tests for models/mldecoder.py. They need torch;
tests/run.sh runs them only where it is installed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (pip install -r models/requirements-train.txt)")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mldecoder import PAPER_CONFIGS, Classifier, HeadConfig, MLDecoder, head_parameter_count, load_official_state_dict  # noqa: E402


def test_full_decoding_gives_one_logit_per_class():
    head = MLDecoder(HeadConfig(num_classes=80, num_of_groups=80, initial_num_features=2432)).eval()
    assert head(torch.randn(2, 2432, 14, 14)).shape == (2, 80)


def test_group_decoding_covers_9605_classes_with_200_queries():
    cfg = PAPER_CONFIGS["openimages-tresnet-m"][1]
    head = MLDecoder(cfg).eval()
    assert head.embed_len == 200
    assert head.duplicate_factor == 49  # ceil(9605 / 200)
    assert head.decoder.duplicate_pooling.shape == (200, 768, 49)
    assert head(torch.randn(1, 2048, 7, 7)).shape == (1, 9605)


def test_default_groups_cap_at_100_queries_as_upstream():
    head = MLDecoder(HeadConfig(num_classes=1000, initial_num_features=64, decoder_embedding=64, dim_feedforward=64)).eval()
    assert head.embed_len == 100
    assert head(torch.randn(1, 64, 4, 4)).shape == (1, 1000)


def test_token_input_is_accepted_like_a_feature_map():
    head = MLDecoder(HeadConfig(num_classes=5, initial_num_features=32, decoder_embedding=64, dim_feedforward=64)).eval()
    features = torch.randn(1, 32, 3, 3)
    tokens = features.flatten(2).transpose(1, 2)
    assert torch.allclose(head(features), head(tokens))


def test_zero_shot_scores_any_number_of_word_queries():
    head = MLDecoder(HeadConfig(num_classes=925, zsl=True, initial_num_features=64, dim_feedforward=64)).eval()
    head.set_word_queries(torch.randn(17, 300))
    assert head(torch.randn(3, 64, 5, 5)).shape == (3, 17)


def test_queries_are_learned_unless_switched_off():
    learned = MLDecoder(HeadConfig(num_classes=4, initial_num_features=8, decoder_embedding=16, dim_feedforward=16, num_heads=4))
    fixed = MLDecoder(HeadConfig(num_classes=4, initial_num_features=8, decoder_embedding=16, dim_feedforward=16, num_heads=4, learnable_queries=False))
    assert learned.decoder.query_embed.weight.requires_grad
    assert not fixed.decoder.query_embed.weight.requires_grad


def test_an_official_layout_checkpoint_loads_with_its_keys_mapped():
    """A randomly initialised model saved the way Alibaba-MIIL/ML_Decoder saves
    (``{"model": state}`` with a ``module.`` prefix, TResNet-style ``body.*``
    backbone keys) loads into a fresh model and reproduces its outputs."""

    class TinyBody(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Conv2d(3, 32, 3, stride=4)
            self.num_features = 32

        def forward_features(self, x):
            return self.body(x)

    from mldecoder import TimmFeatures

    cfg = HeadConfig(num_classes=10, num_of_groups=5, initial_num_features=32, decoder_embedding=64, dim_feedforward=64)
    source = Classifier(TimmFeatures(TinyBody()), MLDecoder(cfg)).eval()
    official = {"model": {"module." + k.replace("backbone.net.", ""): v for k, v in source.state_dict().items()}}
    assert any(k.startswith("module.body.") for k in official["model"])
    assert any(k.startswith("module.head.decoder.layers.0.multihead_attn.in_proj_weight") for k in official["model"])

    target = Classifier(TimmFeatures(TinyBody()), MLDecoder(cfg)).eval()
    missing = load_official_state_dict(target, official)
    assert missing == []
    x = torch.randn(1, 3, 32, 32)
    assert torch.allclose(source(x), target(x))


def test_the_demo_head_is_about_a_million_parameters():
    cfg = HeadConfig(num_classes=12, num_of_groups=12, decoder_embedding=256, initial_num_features=1280, dim_feedforward=1024)
    assert 0.9e6 < head_parameter_count(MLDecoder(cfg)) < 1.3e6
