"""int8 quantization of an fp32 ONNX model of the catalog, on the server.

The server does it rather than the client because the weights and the model cache live on the
server: a remote client has neither, and the result must be a file the server may load (the model
cache is one of the folders API-registered models may read from). onnxruntime's dynamic
quantization stores weights as int8 and quantizes activations at run time, so it needs no
calibration data; the result is registered as a new model with the source model's spec (pooling,
prompts, tokenizer) and loaded. Registered models last until the server stops; the file stays in the
cache, so a models.yaml entry can point at it to keep it.

Static quantization (`static=True`) also fixes the activations' ranges, calibrated once on texts
built here (CALIBRATION_TEXTS), and stores them in the graph as QDQ pairs: onnxruntime then runs
the matrix products in int8 end to end (VNNI). Its fidelity on BERT encoders is measured, not
assumed (bench/RESULTS.md, "Static int8"); the catalog offers no static variant, since none
reached a median cosine of 0.999 and a minimum of 0.99 to fp32. A source that stores int8 weights
but multiplies in fp32 (DequantizeLinear on constants, as the shipped MiniLM does) is first folded
into a plain fp32 graph.
"""

from __future__ import annotations

import asyncio
import itertools
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from wafer.errors import FailedPreconditionError, InvalidArgumentError
from wafer.registry import ModelRegistry, ModelStatus
from wafer.specs import LoadPolicy, ModelSpec

log = structlog.get_logger(__name__)

QUANTIZED_FOLDER = "quantized"
# Static quantization's calibration: rows padded to one width (the range collectors stack them).
CALIBRATION_BATCH = 32
CALIBRATION_WIDTH = 128
CALIBRATION_TEXTS = 256

_SUBJECTS = ["The meeting", "My train", "Your parcel", "The new phone", "Our dinner", "The concert", "This offer"]
_VERBS = ["was moved to", "is delayed until", "arrives on", "costs less than", "starts at", "ends before"]
_OBJECTS = [
    "Thursday afternoon.",
    "the end of the month, sorry!",
    "3pm in room B, bring the slides",
    "£150 if you reply STOP now",
    "tomorrow morning unless it rains",
    "the weekend 🙂 call me when you can",
]
_TAILS = ["", " Text WIN to 87121 for a free entry.", " Love you, see you soon x", " Ok lar... joking wif u"]


def quantized_path(cache_dir: Path, name: str) -> Path:
    return cache_dir / QUANTIZED_FOLDER / f"{name}.onnx"


def calibration_texts(count: int = CALIBRATION_TEXTS) -> list[str]:
    """Short messages of varied length and content (chat, notices, spam), built from templates."""
    sentences = (
        f"{subject} {verb} {obj}{tail}"
        for subject, verb, obj, tail in itertools.product(_SUBJECTS, _VERBS, _OBJECTS, _TAILS)
    )
    texts = list(itertools.islice(sentences, 0, None, 3))
    # Some longer rows too: a few sentences joined.
    texts += [" ".join(texts[i : i + 1 + i % 6]) for i in range(0, len(texts), 2)]
    return texts[:count]


def quantize_onnx(
    source: Path, target: Path, *, per_channel: bool, static: bool = False, tokenizer: Path | None = None
) -> None:
    """Write an int8 quantization of the fp32 ONNX file `source` to `target`: dynamic, or static
    (QDQ, calibrated with `tokenizer` on `calibration_texts()`)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    work = Path(tempfile.mkdtemp(prefix="wafer-quantize-"))
    if static:
        if tokenizer is None:
            raise FailedPreconditionError(f"{source.name}: static quantization needs the model's tokenizer")
        source = _folded(source, work / "folded.onnx")
    model = onnx.load(str(source), load_external_data=False)
    float_weights = [
        init for init in model.graph.initializer if init.data_type == onnx.TensorProto.FLOAT and len(init.dims) >= 2
    ]
    if not float_weights:
        raise FailedPreconditionError(
            f"{source.name} has no fp32 weight matrices to quantize (is it quantized already?)"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    try:
        if static:
            assert tokenizer is not None
            _quantize_static(source, partial, work, tokenizer=tokenizer, per_channel=per_channel)
        else:
            quantize_dynamic(source, partial, weight_type=QuantType.QInt8, per_channel=per_channel)
        # Renamed only once complete: a crash never leaves a half-written model under the real name.
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)


def _folded(source: Path, target: Path) -> Path:
    """`source` with its constant subgraphs folded (int8 weights and their DequantizeLinear become
    fp32 weights); an fp32 graph comes out as it went in, its constants folded."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(target)
    ort.InferenceSession(str(source), sess_options=options, providers=["CPUExecutionProvider"])
    return target


def _quantize_static(source: Path, target: Path, work: Path, *, tokenizer: Path, per_channel: bool) -> None:
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process
    from tokenizers import Tokenizer

    prepared = work / "prepared.onnx"
    quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
    inputs = {node.name for node in onnx.load(str(prepared), load_external_data=False).graph.input}
    reader = Tokenizer.from_file(str(tokenizer))
    reader.no_padding()
    reader.enable_truncation(max_length=CALIBRATION_WIDTH)

    def feeds() -> Iterator[dict[str, Any]]:
        texts = calibration_texts()
        for start in range(0, len(texts) - CALIBRATION_BATCH + 1, CALIBRATION_BATCH):
            encodings = reader.encode_batch(texts[start : start + CALIBRATION_BATCH])
            ids = np.zeros((len(encodings), CALIBRATION_WIDTH), dtype=np.int64)
            mask = np.zeros_like(ids)
            for row, encoding in enumerate(encodings):
                ids[row, : len(encoding.ids)] = encoding.ids
                mask[row, : len(encoding.ids)] = 1
            arrays = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
            yield {key: value for key, value in arrays.items() if key in inputs}

    class Calibration(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self._feeds = feeds()

        def get_next(self) -> dict[str, Any] | None:
            return next(self._feeds, None)

    # Matrix products with constant weights only: int8 x int8 with VNNI. Min-max ranges, weights
    # per channel, the full int8 range (reduce_range is for CPUs without VNNI).
    quantize_static(
        str(prepared),
        str(target),
        Calibration(),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["MatMul"],
        per_channel=per_channel,
        reduce_range=False,
        weight_type=QuantType.QInt8,
        activation_type=QuantType.QUInt8,
        calibrate_method=CalibrationMethod.MinMax,
        extra_options={"MatMulConstBOnly": True},
    )


async def quantize_model(
    registry: ModelRegistry, source_model: str, name: str, *, per_channel: bool, static: bool = False
) -> ModelStatus:
    """Quantize `source_model` into a new model `name`, register it and load it."""
    spec = registry.spec(source_model)
    if spec.backend != "onnx":
        raise FailedPreconditionError(
            f"model {source_model!r} runs on the {spec.backend!r} backend; only ONNX models can be quantized here "
            "(GGUF models come quantized: pick another GGUF file)"
        )
    if registry.knows(name):
        raise InvalidArgumentError(f"a model named {name!r} exists already; choose another name for the quantized one")
    registry.check_new_name(name)
    source = await asyncio.to_thread(registry.resolver.resolve, spec.source, model=source_model)
    target = quantized_path(registry.resolver.cache_dir, name)
    log.info("quantizing", model=source_model, into=name, file=str(target))
    tokenizer = (
        await asyncio.to_thread(registry.resolver.resolve, spec.tokenizer, model=source_model)
        if static and spec.tokenizer
        else None
    )
    await asyncio.to_thread(quantize_onnx, source, target, per_channel=per_channel, static=static, tokenizer=tokenizer)
    quantized = ModelSpec.model_validate(
        {
            **spec.model_dump(exclude_unset=True),
            "name": name,
            "source": str(target),
            "description": f"int8 {'static (QDQ)' if static else 'dynamic'} quantization of {source_model}, "
            + ("per channel" if per_channel else "per tensor"),
            "load": LoadPolicy.ON_DEMAND,
            "pinned": False,
        }
    )
    return await registry.load(name, spec=quantized)
