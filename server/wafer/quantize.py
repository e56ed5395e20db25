"""int8 quantization of an fp32 ONNX model of the catalog, on the server.

The server does it rather than the client because the weights and the model cache live on the
server: a remote client has neither, and the result must be a file the server may load (the model
cache is one of the folders API-registered models may read from). onnxruntime's dynamic
quantization stores weights as int8 and quantizes activations at run time, so it needs no
calibration data; the result is registered as a new model with the source model's spec (pooling,
prompts, tokenizer) and loaded. Registered models last until the server stops; the file stays in the
cache, so a models.yaml entry can point at it to keep it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import structlog

from wafer.errors import FailedPreconditionError, InvalidArgumentError
from wafer.registry import ModelRegistry, ModelStatus
from wafer.specs import LoadPolicy, ModelSpec

log = structlog.get_logger(__name__)

QUANTIZED_FOLDER = "quantized"


def quantized_path(cache_dir: Path, name: str) -> Path:
    return cache_dir / QUANTIZED_FOLDER / f"{name}.onnx"


def quantize_onnx(source: Path, target: Path, *, per_channel: bool) -> None:
    """Write an int8 (dynamic) quantization of the fp32 ONNX file `source` to `target`."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

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
        quantize_dynamic(source, partial, weight_type=QuantType.QInt8, per_channel=per_channel)
        # Renamed only once complete: a crash never leaves a half-written model under the real name.
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)


async def quantize_model(registry: ModelRegistry, source_model: str, name: str, *, per_channel: bool) -> ModelStatus:
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
    await asyncio.to_thread(quantize_onnx, source, target, per_channel=per_channel)
    quantized = ModelSpec.model_validate(
        {
            **spec.model_dump(exclude_unset=True),
            "name": name,
            "source": str(target),
            "description": f"int8 dynamic quantization of {source_model}, "
            + ("per channel" if per_channel else "per tensor"),
            "load": LoadPolicy.ON_DEMAND,
            "pinned": False,
        }
    )
    return await registry.load(name, spec=quantized)
