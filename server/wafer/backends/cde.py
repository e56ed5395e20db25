"""cde-small-v1 (contextual document embeddings) on onnxruntime, from its safetensors weights.

The model (jxm/cde-small-v1, code in jxmorris12/cde) has two NomicBERT encoders:
- **stage 1** (`first_stage_model`, a BiEncoder) embeds a text: mean pool over its tokens, then an
  MLP (Linear, GELU, Linear). Run on `transductive_corpus_size` (512) documents of a corpus, it gives
  the corpus's *dataset embeddings*, the context; run on any text, it is what the model's own encode
  returns without dataset embeddings (its sentence-transformers module calls `first_stage_model`
  when none are given).
- **stage 2** (`second_stage_model`, a DatasetConditionedBiencoder) embeds a text given a context:
  the 512 dataset embeddings and 8 learned soft tokens come before the text's token embeddings, the
  first 512 positions get no rotary embedding (rotary positions count from the start of the whole
  sequence), only the text's positions are mean-pooled, then an output projection (Linear, ReLU,
  Linear) gives the vector.

Nothing of PyTorch runs here. On load the weights become the initializers of two onnxruntime graphs
built with `onnx.helper` (one per stage). The graphs hold no weights: they are handed to onnxruntime
as external initializers straight from the arrays read out of `model.safetensors`, so a load costs
one read of the file, nothing is converted or written to disk, and memory holds one copy of the
weights (a disk cache of converted graphs would save the graph build, well under a second, and cost
a second copy of 1.1 GB on disk). Rotary tables, the soft prompt and the additive masks are computed
in numpy, in float64, and fed to the graphs.

Files (a spec's `source` and `files`): `model.safetensors` (source), `config` (the model's
config.json), `backbone_config` (its backbone's config.json: nomic-ai/nomic-bert-2048, which the
model's config names in `embedder` and which holds the encoder's shape), and `tokenizer`
(bert-base-uncased's tokenizer.json).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import onnxruntime as ort
from numpy.typing import NDArray
from onnx import TensorProto, helper
from pydantic import BaseModel, ConfigDict, Field
from safetensors.numpy import load_file
from tokenizers import Encoding, Tokenizer

from wafer.backends.base import (
    Backend,
    ComputeInterrupted,
    Embeddings,
    InputTooLongError,
    LoadOptions,
    ModelFiles,
)
from wafer.backends.onnx import Padding, load_tokenizers, sub_batches
from wafer.domain import Context, FloatMatrix
from wafer.errors import FailedPreconditionError, InvalidArgumentError, UnavailableError
from wafer.specs import ModelSpec, Task

# Padded token positions per stage-1 call (as the onnx backend's budget).
STAGE1_TOKEN_BUDGET = 2048
# Positions per stage-2 call, the 520 context positions of every row included.
STAGE2_TOKEN_BUDGET = 4096
N_SOFT_PROMPT = 8
_OPSET = 17
_PROBE_TEXT = "wafer health check"

IntMatrix = NDArray[np.int64]


class CdeOptions(BaseModel):
    """Options of the cde backend (a spec's `options`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    corpus_rope: Literal["skip", "apply"] = Field(
        default="skip",
        description="Rotary embedding on the context positions in stage 2. 'skip' (the authors' "
        "training code and their cde/hf_model.py: the first transductive_corpus_size positions are not "
        "rotated) or 'apply' (every position rotated, as the Hub repository's model.py does when it "
        "runs on nomic-bert-2048's remote code, which ignores rotary_start_pos).",
    )


@dataclass(frozen=True, slots=True)
class _Shape:
    hidden: int
    heads: int
    layers: int
    eps: float
    rotary_base: float
    corpus_size: int
    rotary_start: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def _read_json(spec: ModelSpec, path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise FailedPreconditionError(f"model {spec.name!r}: cannot read {what} {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise FailedPreconditionError(f"model {spec.name!r}: {what} {path} is not a JSON object")
    return data


def _shape(spec: ModelSpec, config: dict[str, Any], backbone: dict[str, Any], rope: str) -> _Shape:
    def need(key: str, source: dict[str, Any], what: str) -> Any:
        if key not in source:
            raise FailedPreconditionError(f"model {spec.name!r}: {what} has no {key!r}")
        return source[key]

    checks = {
        "activation_function": "swiglu",
        "prenorm": False,
        "rotary_emb_interleaved": False,
        "qkv_proj_bias": False,
        "mlp_fc1_bias": False,
        "mlp_fc2_bias": False,
    }
    for key, wanted in checks.items():
        if backbone.get(key, wanted) != wanted:
            raise FailedPreconditionError(
                f"model {spec.name!r}: backbone {key}={backbone[key]!r}; the cde backend runs NomicBERT "
                f"with {key}={wanted!r} (nomic-bert-2048)"
            )
    if backbone.get("rotary_emb_fraction", 1.0) != 1.0 or backbone.get("rotary_scaling_factor"):
        raise FailedPreconditionError(
            f"model {spec.name!r}: the cde backend runs full-head rotary embeddings without scaling"
        )
    if config.get("autoregressive_backbone") or int(config.get("transductive_tokens_per_document", 1)) != 1:
        raise FailedPreconditionError(
            f"model {spec.name!r}: the cde backend runs the biencoder form of cde (one token per document)"
        )
    corpus_size = int(need("transductive_corpus_size", config, "config.json"))
    skip = rope == "skip" and bool(config.get("disable_transductive_rotary_embedding", True))
    hidden = int(need("n_embd", backbone, "backbone config.json"))
    heads = int(need("n_head", backbone, "backbone config.json"))
    if hidden % heads:
        raise FailedPreconditionError(f"model {spec.name!r}: n_embd {hidden} is not a multiple of n_head {heads}")
    return _Shape(
        hidden=hidden,
        heads=heads,
        layers=int(need("n_layer", backbone, "backbone config.json")),
        eps=float(backbone.get("layer_norm_epsilon", 1e-12)),
        rotary_base=float(backbone.get("rotary_emb_base", 10_000)),
        corpus_size=corpus_size,
        rotary_start=corpus_size if skip else 0,
    )


# -- graph building ----------------------------------------------------------------------------


class _Graph:
    """Nodes of one stage's graph; weights become named inputs filled as external initializers."""

    def __init__(self, weights: dict[str, np.ndarray]) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.weights = weights
        # Names of weights used, in use order: handed to onnxruntime after the graph is built.
        self.used: dict[str, np.ndarray] = {}
        self._count = 0

    def name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def op(self, op_type: str, inputs: list[str], hint: str = "", **attrs: Any) -> str:
        out = self.name(hint or op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], **attrs))
        return out

    def const(self, value: np.ndarray, hint: str = "const") -> str:
        name = self.name(hint)
        self.initializers.append(onnx.numpy_helper.from_array(value, name))
        return name

    def weight(self, key: str, *, transpose: bool = False) -> str:
        array = self.weights[key]
        name = f"w:{key}" + (":T" if transpose else "")
        if name not in self.used:
            self.used[name] = np.ascontiguousarray(array.T if transpose else array, dtype=np.float32)
        return name

    def linear(self, x: str, prefix: str, *, bias: bool = True) -> str:
        y = self.op("MatMul", [x, self.weight(f"{prefix}.weight", transpose=True)])
        return self.op("Add", [y, self.weight(f"{prefix}.bias")]) if bias else y

    def layer_norm(self, x: str, prefix: str, eps: float) -> str:
        return self.op(
            "LayerNormalization",
            [x, self.weight(f"{prefix}.weight"), self.weight(f"{prefix}.bias")],
            axis=-1,
            epsilon=eps,
        )

    def rope(self, x: str, cos: str, sin: str, half: int) -> str:
        """x [b, h, s, d]; cos/sin [s, d] (identity rows where a position is not rotated)."""
        split = self.const(np.array([half, half], dtype=np.int64), "halves")
        x1 = self.name("x1")
        x2 = self.name("x2")
        self.nodes.append(helper.make_node("Split", [x, split], [x1, x2], axis=-1))
        rotated_half = self.op("Concat", [self.op("Neg", [x2]), x1], axis=-1)
        return self.op("Add", [self.op("Mul", [x, cos]), self.op("Mul", [rotated_half, sin])])

    def encoder(self, prefix: str, hidden: str, additive_mask: str, shape: _Shape) -> str:
        """The NomicBERT layers on `hidden`; rotary tables come from the graph inputs cos and sin."""
        cos, sin = "cos", "sin"
        h = hidden
        heads, head_dim = shape.heads, shape.head_dim
        to_heads = self.const(np.array([0, 0, 3, heads, head_dim], dtype=np.int64), "to_heads")
        back = self.const(np.array([0, 0, shape.hidden], dtype=np.int64), "back")
        scale = self.const(np.array(1.0 / math.sqrt(head_dim), dtype=np.float32), "scale")
        for i in range(shape.layers):
            lp = f"{prefix}.encoder.layers.{i}"
            qkv = self.op("MatMul", [h, self.weight(f"{lp}.attn.Wqkv.weight", transpose=True)], "qkv")
            qkv = self.op("Reshape", [qkv, to_heads])
            qkv = self.op("Transpose", [qkv], perm=[2, 0, 3, 1, 4])  # [3, b, heads, s, d]
            q, k, v = (self.name("q"), self.name("k"), self.name("v"))
            self.nodes.append(helper.make_node("Split", [qkv], [q, k, v], axis=0))
            q, k, v = (self.op("Squeeze", [t, self.const(np.array([0], dtype=np.int64))]) for t in (q, k, v))
            q = self.rope(q, cos, sin, head_dim // 2)
            k = self.rope(k, cos, sin, head_dim // 2)
            scores = self.op("MatMul", [q, self.op("Transpose", [k], perm=[0, 1, 3, 2])])
            scores = self.op("Add", [self.op("Mul", [scores, scale]), additive_mask])
            attn = self.op("MatMul", [self.op("Softmax", [scores], axis=-1), v])
            attn = self.op("Reshape", [self.op("Transpose", [attn], perm=[0, 2, 1, 3]), back])
            attn = self.op("MatMul", [attn, self.weight(f"{lp}.attn.out_proj.weight", transpose=True)])
            h = self.layer_norm(self.op("Add", [attn, h]), f"{lp}.norm1", shape.eps)
            up = self.op("MatMul", [h, self.weight(f"{lp}.mlp.fc11.weight", transpose=True)])
            gate = self.op("MatMul", [h, self.weight(f"{lp}.mlp.fc12.weight", transpose=True)])
            swish = self.op("Mul", [gate, self.op("Sigmoid", [gate])])
            down = self.op("MatMul", [self.op("Mul", [up, swish]), self.weight(f"{lp}.mlp.fc2.weight", transpose=True)])
            h = self.layer_norm(self.op("Add", [down, h]), f"{lp}.norm2", shape.eps)
        return h

    def additive_mask(self, mask: str) -> str:
        """[b, s] int64 -> [b, 1, 1, s] float: 0 where attended, float32's minimum where masked."""
        as_float = self.op("Cast", [mask], to=TensorProto.FLOAT)
        one = self.const(np.array(1.0, dtype=np.float32))
        lowest = self.const(np.array(np.finfo(np.float32).min, dtype=np.float32))
        additive = self.op("Mul", [self.op("Sub", [one, as_float]), lowest])
        return self.op("Unsqueeze", [additive, self.const(np.array([1, 2], dtype=np.int64))])

    def mean_pool(self, states: str, mask: str) -> str:
        m = self.op(
            "Unsqueeze", [self.op("Cast", [mask], to=TensorProto.FLOAT), self.const(np.array([2], dtype=np.int64))]
        )
        axis = self.const(np.array([1], dtype=np.int64))
        total = self.op("ReduceSum", [self.op("Mul", [states, m]), axis], keepdims=0)
        count = self.op(
            "Add", [self.op("ReduceSum", [m, axis], keepdims=0), self.const(np.array(1e-20, dtype=np.float32))]
        )
        return self.op("Div", [total, count])

    def model(self, inputs: list[onnx.ValueInfoProto], output: str, width: int) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes,
            "cde",
            inputs,
            [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["batch", width])],
            initializer=self.initializers,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _OPSET)])
        model.ir_version = 8
        return model


def _ids_input(name: str) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", "seq"])


def _float_input(name: str, dims: list[str | int]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)


def _embeddings(g: _Graph, prefix: str, ids: str, type_copies: int) -> str:
    """Word embeddings plus `type_copies` times the token-type-0 embedding."""
    words = g.op("Gather", [g.weight(f"{prefix}.embeddings.word_embeddings.weight"), ids], axis=0)
    type0 = g.weights[f"{prefix}.embeddings.token_type_embeddings.weight"][0]
    return g.op("Add", [words, g.const((type0 * type_copies).astype(np.float32), "type0")])


def _stage1_graph(weights: dict[str, np.ndarray], shape: _Shape) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    g = _Graph(weights)
    prefix = "first_stage_model.embedder"
    hidden = g.layer_norm(_embeddings(g, prefix, "input_ids", 1), f"{prefix}.emb_ln", shape.eps)
    states = g.encoder(prefix, hidden, g.additive_mask("attention_mask"), shape)
    pooled = g.mean_pool(states, "attention_mask")
    x = g.linear(pooled, "first_stage_model.mlp.0")
    # Exact GELU, as torch.nn.GELU() computes it.
    half = g.const(np.array(0.5, dtype=np.float32))
    one = g.const(np.array(1.0, dtype=np.float32))
    root2 = g.const(np.array(math.sqrt(2.0), dtype=np.float32))
    gelu = g.op("Mul", [g.op("Mul", [x, half]), g.op("Add", [one, g.op("Erf", [g.op("Div", [x, root2])])])])
    output = g.linear(gelu, "first_stage_model.mlp.2")
    inputs = [
        _ids_input("input_ids"),
        _ids_input("attention_mask"),
        _float_input("cos", ["seq", shape.head_dim]),
        _float_input("sin", ["seq", shape.head_dim]),
    ]
    return g.model(inputs, output, shape.hidden), g.used


def _stage2_graph(weights: dict[str, np.ndarray], shape: _Shape) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    g = _Graph(weights)
    prefix = "second_stage_model.backbone"
    # `prefix_embeds` [p, d]: the dataset embeddings and soft prompt, type-0 embedding added (the
    # backbone's embeddings module adds it to every inputs_embeds position). The text's own
    # embeddings come from backbone.embeddings(input_ids), which adds it once more.
    text = _embeddings(g, prefix, "input_ids", 2)
    batch = g.op(
        "Slice",
        [g.op("Shape", ["input_ids"]), g.const(np.array([0], dtype=np.int64)), g.const(np.array([1], dtype=np.int64))],
    )
    prefix_shape = g.op("Shape", ["prefix_embeds"])
    expand_to = g.op("Concat", [batch, prefix_shape], axis=0)
    prefix_rows = g.op("Expand", ["prefix_embeds", expand_to])
    hidden = g.layer_norm(g.op("Concat", [prefix_rows, text], axis=1), f"{prefix}.emb_ln", shape.eps)
    n_prefix = g.op(
        "Slice", [prefix_shape, g.const(np.array([0], dtype=np.int64)), g.const(np.array([1], dtype=np.int64))]
    )
    prefix_mask = g.op(
        "ConstantOfShape",
        [g.op("Concat", [batch, n_prefix], axis=0)],
        value=helper.make_tensor("one", TensorProto.INT64, [1], [1]),
    )
    mask = g.op("Concat", [prefix_mask, "attention_mask"], axis=1)
    states = g.encoder(prefix, hidden, g.additive_mask(mask), shape)
    # Pool the text's positions only.
    end = g.const(np.array([np.iinfo(np.int64).max], dtype=np.int64))
    text_states = g.op("Slice", [states, n_prefix, end, g.const(np.array([1], dtype=np.int64))])
    pooled = g.mean_pool(text_states, "attention_mask")
    x = g.op("Relu", [g.linear(pooled, "second_stage_model.output_projection.0")])
    output = g.linear(x, "second_stage_model.output_projection.2")
    inputs = [
        _ids_input("input_ids"),
        _ids_input("attention_mask"),
        _float_input("prefix_embeds", ["prefix", shape.hidden]),
        _float_input("cos", ["positions", shape.head_dim]),
        _float_input("sin", ["positions", shape.head_dim]),
    ]
    return g.model(inputs, output, shape.hidden), g.used


def _session(spec: ModelSpec, model: onnx.ModelProto, weights: dict[str, np.ndarray], threads: int) -> Any:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    names = list(weights)
    values = [ort.OrtValue.ortvalue_from_numpy(weights[name]) for name in names]
    options.add_external_initializers(names, values)
    # Placeholders for the weights: initializers whose data the session options supply.
    graph = model.graph
    for name in names:
        placeholder = onnx.TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(weights[name].shape))
        placeholder.data_location = TensorProto.EXTERNAL
        entry = placeholder.external_data.add()
        entry.key, entry.value = "location", "wafer-external-initializer"
        graph.initializer.append(placeholder)
    try:
        session = ort.InferenceSession(
            model.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:
        raise FailedPreconditionError(
            f"model {spec.name!r}: onnxruntime cannot build the cde graph: {type(exc).__name__}: {exc}"
        ) from exc
    # The OrtValues borrow the arrays' memory: keep both alive with the session.
    session._wafer_weights = (weights, values)
    return session


def rotary_tables(base: float, head_dim: int, positions: int, *, skip: int = 0) -> tuple[FloatMatrix, FloatMatrix]:
    """cos and sin [positions, head_dim] (halves repeated, not interleaved); the first `skip`
    positions are left un-rotated (cos 1, sin 0)."""
    inv_freq = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    freqs = np.outer(np.arange(positions, dtype=np.float64), inv_freq)
    cos = np.concatenate([np.cos(freqs), np.cos(freqs)], axis=1)
    sin = np.concatenate([np.sin(freqs), np.sin(freqs)], axis=1)
    cos[:skip] = 1.0
    sin[:skip] = 0.0
    return cos.astype(np.float32), sin.astype(np.float32)


class CdeBackend(Backend):
    tasks = frozenset({Task.EMBED})
    options_model = CdeOptions
    required_files = frozenset({"config", "backbone_config"})
    contextual = True
    context_rows_are_embeddings = True

    def __init__(
        self,
        spec: ModelSpec,
        *,
        shape: _Shape,
        stage1: Any,
        stage2: Any,
        soft_prompt: FloatMatrix,
        type0: FloatMatrix,
        truncating: Tokenizer,
        counting: Tokenizer,
        padding: Padding,
    ) -> None:
        super().__init__(spec)
        self._shape = shape
        self._stage1: Any | None = stage1
        self._stage2: Any | None = stage2
        self._soft_prompt = soft_prompt
        self._type0 = type0
        self._truncating = truncating
        self._counting = counting
        self._padding = padding
        self._options = ort.RunOptions()
        self._prefix_cache: tuple[str, FloatMatrix] | None = None

    @property
    def context_size(self) -> int:
        return self._shape.corpus_size

    @classmethod
    def load(cls, spec: ModelSpec, files: ModelFiles, options: LoadOptions) -> CdeBackend:
        opts = CdeOptions.model_validate(spec.options)
        if files.tokenizer is None:
            raise FailedPreconditionError(
                f"model {spec.name!r}: the cde backend needs a `tokenizer` (bert-base-uncased)"
            )
        config = _read_json(spec, files.extra["config"], "config.json")
        backbone = _read_json(spec, files.extra["backbone_config"], "backbone config.json")
        shape = _shape(spec, config, backbone, opts.corpus_rope)
        if spec.dimensions != shape.hidden:
            raise FailedPreconditionError(
                f"model {spec.name!r}: the model gives {shape.hidden}-d vectors, "
                f"models.yaml says dimensions: {spec.dimensions}"
            )
        try:
            weights = load_file(str(files.weights))
        except Exception as exc:
            raise FailedPreconditionError(f"model {spec.name!r}: cannot read {files.weights}: {exc}") from exc
        try:
            model1, used1 = _stage1_graph(weights, shape)
            model2, used2 = _stage2_graph(weights, shape)
            soft_prompt = _soft_prompt(weights)
            type0 = weights["second_stage_model.backbone.embeddings.token_type_embeddings.weight"][0].astype(np.float32)
        except KeyError as exc:
            raise FailedPreconditionError(
                f"model {spec.name!r}: {files.weights} has no tensor {exc.args[0]!r}; "
                "is it cde-small-v1's model.safetensors?"
            ) from None
        del weights
        stage1 = _session(spec, model1, used1, options.threads)
        stage2 = _session(spec, model2, used2, options.threads)
        truncating, counting, padding = load_tokenizers(spec, files.tokenizer)
        return cls(
            spec,
            shape=shape,
            stage1=stage1,
            stage2=stage2,
            soft_prompt=soft_prompt,
            type0=type0,
            truncating=truncating,
            counting=counting,
            padding=padding,
        )

    # -- Backend -------------------------------------------------------------------------------

    def embed(self, texts: Sequence[str], *, truncate: bool, context: Context | None = None) -> Embeddings:
        encodings = self._encode(texts, truncate=truncate)
        if context is None:
            return self._run_stage1(encodings)
        prefix = self._prefix(context)
        return self._run(encodings, STAGE2_TOKEN_BUDGET, len(prefix), lambda batch: self._forward2(batch, prefix))

    def build_context(self, documents: Sequence[str]) -> FloatMatrix:
        """Dataset embeddings [n, d] of `documents` (prompts applied, already sampled): stage 1."""
        return self._run_stage1(self._encode(documents, truncate=True)).vectors

    def interrupt(self) -> None:
        self._options.terminate = True

    def count_tokens(self, text: str) -> int:
        return len(self._counting.encode(text).ids)

    def token_offsets(self, text: str) -> list[tuple[int, int]]:
        return [(int(a), int(b)) for a, b in self._counting.encode(text, add_special_tokens=False).offsets]

    def health(self) -> None:
        vectors = self.embed([_PROBE_TEXT], truncate=True).vectors
        context = Context.of(np.repeat(vectors, self._shape.corpus_size, axis=0))
        contextual = self.embed([_PROBE_TEXT], truncate=True, context=context).vectors
        for got in (vectors, contextual):
            if got.shape != (1, self._shape.hidden) or not bool(np.isfinite(got).all()):
                raise FailedPreconditionError(
                    f"model {self.spec.name!r} returned an unusable vector of shape {got.shape}"
                )

    def close(self) -> None:
        self._stage1 = None
        self._stage2 = None

    # -- Internals -----------------------------------------------------------------------------

    def _prefix(self, context: Context) -> FloatMatrix:
        """The context's rows of the stage-2 sequence: its first `corpus_size` dataset embeddings and
        the soft prompt, plus the type-0 embedding."""
        cached = self._prefix_cache
        if cached is not None and cached[0] == context.id:
            return cached[1]
        vectors = context.vectors
        if vectors.ndim != 2 or vectors.shape[1] != self._shape.hidden or vectors.shape[0] < self._shape.corpus_size:
            raise InvalidArgumentError(
                f"model {self.spec.name!r} takes a context of {self._shape.corpus_size} x {self._shape.hidden} "
                f"dataset embeddings, not {list(vectors.shape)}"
            )
        rows = np.concatenate([vectors[: self._shape.corpus_size], self._soft_prompt]).astype(np.float32)
        prefix = np.ascontiguousarray(rows + self._type0, dtype=np.float32)
        self._prefix_cache = (context.id, prefix)
        return prefix

    def _encode(self, texts: Sequence[str], *, truncate: bool) -> list[Encoding]:
        tokenizer = self._truncating if truncate else self._counting
        encodings: list[Encoding] = tokenizer.encode_batch_fast(list(texts))
        for index, encoding in enumerate(encodings):
            length = len(encoding.ids)
            if length > self.spec.max_tokens:
                raise InputTooLongError(index, length, self.spec.max_tokens, self.spec.name)
            if length == 0:
                raise InvalidArgumentError(f"input {index} has no tokens for model {self.spec.name!r}")
        return encodings

    def _run_stage1(self, encodings: list[Encoding]) -> Embeddings:
        return self._run(encodings, STAGE1_TOKEN_BUDGET, 0, self._forward1)

    def _run(self, encodings: list[Encoding], budget: int, extra: int, forward: Any) -> Embeddings:
        token_counts = [len(encoding.ids) for encoding in encodings]
        vectors = np.empty((len(encodings), self._shape.hidden), dtype=np.float32)
        order = sorted(range(len(encodings)), key=token_counts.__getitem__, reverse=True)
        # Every row also carries `extra` context positions: the budget counts them.
        padded = [count + extra for count in token_counts]
        try:
            for rows in sub_batches(order, padded, budget):
                vectors[rows] = forward(self._pad([encodings[row] for row in rows]))
        finally:
            self._options = ort.RunOptions()
        return Embeddings(vectors=vectors, token_counts=token_counts)

    def _pad(self, encodings: Sequence[Encoding]) -> tuple[IntMatrix, IntMatrix]:
        width = max(len(encoding.ids) for encoding in encodings)
        ids = np.full((len(encodings), width), self._padding.id, dtype=np.int64)
        mask = np.zeros((len(encodings), width), dtype=np.int64)
        for row, encoding in enumerate(encodings):
            ids[row, : len(encoding.ids)] = encoding.ids
            mask[row, : len(encoding.ids)] = 1
        return ids, mask

    def _forward1(self, batch: tuple[IntMatrix, IntMatrix]) -> FloatMatrix:
        ids, mask = batch
        cos, sin = rotary_tables(self._shape.rotary_base, self._shape.head_dim, ids.shape[1])
        return self._call(self._stage1, {"input_ids": ids, "attention_mask": mask, "cos": cos, "sin": sin})

    def _forward2(self, batch: tuple[IntMatrix, IntMatrix], prefix: FloatMatrix) -> FloatMatrix:
        ids, mask = batch
        positions = len(prefix) + ids.shape[1]
        cos, sin = rotary_tables(
            self._shape.rotary_base, self._shape.head_dim, positions, skip=self._shape.rotary_start
        )
        feeds: dict[str, np.ndarray] = {
            "input_ids": ids,
            "attention_mask": mask,
            "prefix_embeds": prefix,
            "cos": cos,
            "sin": sin,
        }
        return self._call(self._stage2, feeds)

    def _call(self, session: Any | None, feeds: dict[str, np.ndarray]) -> FloatMatrix:
        if session is None:
            raise UnavailableError(f"model {self.spec.name!r} has been unloaded")
        options = self._options
        try:
            (output,) = session.run(None, feeds, options)
        except Exception as exc:
            if options.terminate:
                raise ComputeInterrupted from exc
            raise
        return np.asarray(output, dtype=np.float32)


def _soft_prompt(weights: dict[str, np.ndarray]) -> FloatMatrix:
    """prompt_projection(ones(d)) reshaped to the 8 soft tokens: a constant of the weights."""

    def linear(x: NDArray[np.float64], name: str) -> NDArray[np.float64]:
        return x @ weights[f"{name}.weight"].astype(np.float64).T + weights[f"{name}.bias"].astype(np.float64)

    dim = weights["second_stage_model.prompt_projection.0.weight"].shape[1]
    hidden = np.maximum(linear(np.ones((1, dim)), "second_stage_model.prompt_projection.0"), 0.0)
    soft = linear(hidden, "second_stage_model.prompt_projection.2").reshape(N_SOFT_PROMPT, dim)
    return soft.astype(np.float32)
