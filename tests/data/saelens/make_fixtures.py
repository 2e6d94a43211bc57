"""Writes the SAELens fixtures beside this file with sae-lens itself (run once, by hand).

    pip install sae-lens  # into a throwaway environment
    python tests/data/saelens/make_fixtures.py

Each folder is what ``SAE.save_model`` writes (``cfg.json`` + ``sae_weights.safetensors``);
``reference.json`` holds inputs and the encodings and reconstructions sae-lens computed for them,
which tests/test_sae.py compares with ``steerlab.load_sae``.
"""

import json
from pathlib import Path

import sae_lens
import torch
from sae_lens import (
    JumpReLUSAE,
    JumpReLUSAEConfig,
    StandardSAE,
    StandardSAEConfig,
    TopKSAE,
    TopKSAEConfig,
)
from sae_lens.saes.sae import SAEMetadata

HERE = Path(__file__).parent
KINDS = {
    "standard": (StandardSAE, StandardSAEConfig, {}),
    "standard_no_b_dec": (StandardSAE, StandardSAEConfig, {"apply_b_dec_to_input": False}),
    "jumprelu": (JumpReLUSAE, JumpReLUSAEConfig, {}),
    "topk": (TopKSAE, TopKSAEConfig, {"k": 3}),
    "topk_rescaled": (TopKSAE, TopKSAEConfig, {"k": 3, "rescale_acts_by_decoder_norm": True}),
}

torch.manual_seed(0)
x = torch.randn(5, 16)
reference = {"sae_lens_version": sae_lens.__version__, "x": x.tolist(), "saes": {}}
for name, (cls, config, extra) in KINDS.items():
    meta = SAEMetadata(hook_name="blocks.2.hook_resid_post")
    sae = cls(config(d_in=16, d_sae=24, dtype="float32", metadata=meta, **extra))
    with torch.no_grad():
        for param in sae.parameters():
            param.copy_(torch.randn_like(param) * 0.5)
        if name == "jumprelu":
            sae.threshold.copy_(torch.rand(24))
        features = sae.encode(x)
        reference["saes"][name] = {
            "encode": features.tolist(),
            "decode": sae.decode(features).tolist(),
        }
    sae.save_model(HERE / name)
(HERE / "reference.json").write_text(json.dumps(reference))
