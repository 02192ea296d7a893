"""Capacity and cost estimates for serving a model: `sluice estimate`.

Memory (from a Hugging Face `config.json` of a llama-style decoder and a precision):

- weights: parameters * bytes per parameter. Parameters are counted from the shapes:
  embeddings (vocab * hidden, twice unless tied), per layer the attention projections
  (q and o: hidden * heads*head_dim; k and v: hidden * kv_heads*head_dim), the gated MLP
  (3 * hidden * intermediate) and two norms, plus the final norm.
- KV cache per token: 2 (K and V) * layers * kv_heads * head_dim * bytes per KV element;
  per sequence: that * context length.
- activations (peak of one engine step, an estimate): batched tokens * (4 * hidden +
  2 * intermediate) * activation bytes, plus fp32 logits for each running sequence
  (sequences * vocab * 4).
- the largest batch: how many sequences of the given context length fit in what is left of
  `memory * utilization` after weights, activations and a fixed runtime overhead.

Cost (from a GPU hourly price and measured or given throughput): USD per million input and
output tokens, and the monthly volume at which one always-on GPU costs the same as a paid
API's per-token prices (with a given input:output token mix).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GB = 1_000_000_000
GIB = 1 << 30
HOURS_PER_MONTH = 730.0
BYTES_PER_ELEMENT = {
    "fp32": 4.0,
    "float32": 4.0,
    "fp16": 2.0,
    "float16": 2.0,
    "bf16": 2.0,
    "bfloat16": 2.0,
    "fp8": 1.0,
    "int8": 1.0,
    "int4": 0.5,
}


class EstimateError(ValueError):
    """Input the estimator cannot use; `str(exc)` is one sentence for the user."""


def bytes_per_element(precision: str) -> float:
    try:
        return BYTES_PER_ELEMENT[precision.lower()]
    except KeyError:
        known = ", ".join(sorted(BYTES_PER_ELEMENT))
        raise EstimateError(f"Unknown precision {precision!r}; use one of: {known}.") from None


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a decoder-only transformer that memory depends on."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied_embeddings: bool
    max_context: int | None

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelShape:
        def need(*names: str) -> int:
            for name in names:
                value = config.get(name)
                if value is not None:
                    if not isinstance(value, int) or value <= 0:
                        raise EstimateError(
                            f"config.json field {name!r} must be a positive integer, got {value!r}."
                        )
                    return value
            raise EstimateError(
                f"config.json has no {' or '.join(repr(n) for n in names)}; the estimate "
                "needs a llama-style decoder config."
            )

        hidden = need("hidden_size", "n_embd", "d_model")
        heads = need("num_attention_heads", "n_head")
        kv_heads = config.get("num_key_value_heads") or heads
        head_dim = config.get("head_dim") or hidden // heads
        return cls(
            hidden=hidden,
            layers=need("num_hidden_layers", "n_layer"),
            heads=heads,
            kv_heads=int(kv_heads),
            head_dim=int(head_dim),
            intermediate=need("intermediate_size", "n_inner", "ffn_dim"),
            vocab=need("vocab_size"),
            tied_embeddings=bool(config.get("tie_word_embeddings", False)),
            max_context=config.get("max_position_embeddings"),
        )

    @classmethod
    def from_folder(cls, folder: Path) -> ModelShape:
        path = folder / "config.json" if folder.is_dir() else folder
        try:
            config = json.loads(path.read_text())
        except FileNotFoundError:
            raise EstimateError(
                f"{path} does not exist; pass a model folder with a config.json."
            ) from None
        except json.JSONDecodeError as exc:
            raise EstimateError(f"{path} is not valid JSON ({exc.msg}).") from None
        if not isinstance(config, dict):
            raise EstimateError(f"{path} does not hold a JSON object.")
        return cls.from_config(config)

    @property
    def parameters(self) -> int:
        embeddings = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        attention = 2 * self.hidden * self.heads * self.head_dim
        attention += 2 * self.hidden * self.kv_heads * self.head_dim
        mlp = 3 * self.hidden * self.intermediate
        per_layer = attention + mlp + 2 * self.hidden
        return embeddings + self.layers * per_layer + self.hidden

    def kv_bytes_per_token(self, kv_bytes: float) -> float:
        return 2 * self.layers * self.kv_heads * self.head_dim * kv_bytes


@dataclass(frozen=True)
class MemoryEstimate:
    parameters: int
    weights_bytes: float
    kv_bytes_per_token: float
    kv_bytes_per_sequence: float
    activation_bytes: float
    available_bytes: float
    max_sequences: int


def estimate_memory(
    shape: ModelShape,
    *,
    precision: str,
    kv_precision: str | None = None,
    context_len: int,
    memory_gib: float,
    utilization: float = 0.9,
    batched_tokens: int = 8192,
    overhead_gib: float = 1.0,
) -> MemoryEstimate:
    """Memory for weights, KV cache and activations, and the largest batch that fits."""
    if context_len <= 0:
        raise EstimateError("The context length must be a positive number of tokens.")
    if shape.max_context is not None and context_len > shape.max_context:
        raise EstimateError(
            f"A context of {context_len} tokens is longer than the model supports "
            f"({shape.max_context})."
        )
    if memory_gib <= 0 or not 0 < utilization <= 1:
        raise EstimateError("Memory must be positive and utilization within (0, 1].")
    if batched_tokens <= 0:
        raise EstimateError("Batched tokens per step must be positive.")
    weight_bytes = bytes_per_element(precision)
    kv_bytes = bytes_per_element(kv_precision or precision)
    activation_bytes = max(weight_bytes, 2.0)  # quantised weights still compute in 16 bit
    weights = shape.parameters * weight_bytes
    per_token = shape.kv_bytes_per_token(kv_bytes)
    per_sequence = per_token * context_len
    step_activations = (
        batched_tokens * (4 * shape.hidden + 2 * shape.intermediate) * activation_bytes
    )
    available = memory_gib * GIB * utilization - weights - overhead_gib * GIB
    if available <= step_activations:
        raise EstimateError(
            f"The weights alone ({weights / GB:.1f} GB) plus activations and runtime overhead "
            f"do not fit in {memory_gib:g} GiB at {utilization:.0%} utilization."
        )
    # Each running sequence also needs fp32 logits over the vocabulary.
    sequences = math.floor((available - step_activations) / (per_sequence + shape.vocab * 4))
    logits = sequences * shape.vocab * 4
    return MemoryEstimate(
        parameters=shape.parameters,
        weights_bytes=weights,
        kv_bytes_per_token=per_token,
        kv_bytes_per_sequence=per_sequence,
        activation_bytes=step_activations + logits,
        available_bytes=available,
        max_sequences=max(0, sequences),
    )


@dataclass(frozen=True)
class CostEstimate:
    usd_per_mtok_input: float
    usd_per_mtok_output: float
    monthly_gpu_usd: float
    monthly_capacity_tokens: float
    break_even_tokens_per_month: float | None

    @property
    def breaks_even_within_capacity(self) -> bool:
        return (
            self.break_even_tokens_per_month is not None
            and self.break_even_tokens_per_month <= self.monthly_capacity_tokens
        )


def estimate_cost(
    *,
    gpu_usd_per_hour: float,
    input_tokens_per_s: float,
    output_tokens_per_s: float,
    api_input_usd_per_mtok: float | None = None,
    api_output_usd_per_mtok: float | None = None,
    input_per_output: float = 3.0,
) -> CostEstimate:
    """Self-hosted cost per million tokens and the break-even monthly volume against an API.

    Input and output throughputs are what one replica sustains for each alone; a token mix of
    `input_per_output` input tokens per output token shares the hour between them.
    """
    if gpu_usd_per_hour <= 0 or input_tokens_per_s <= 0 or output_tokens_per_s <= 0:
        raise EstimateError("GPU price and throughputs must be positive numbers.")
    if input_per_output < 0:
        raise EstimateError("The input:output token ratio cannot be negative.")
    per_mtok_input = gpu_usd_per_hour / (input_tokens_per_s * 3600) * 1e6
    per_mtok_output = gpu_usd_per_hour / (output_tokens_per_s * 3600) * 1e6
    monthly = gpu_usd_per_hour * HOURS_PER_MONTH
    # Seconds one (input_per_output input + 1 output) unit of traffic occupies the GPU.
    seconds_per_unit = input_per_output / input_tokens_per_s + 1 / output_tokens_per_s
    capacity = HOURS_PER_MONTH * 3600 / seconds_per_unit * (input_per_output + 1)
    break_even = None
    if api_input_usd_per_mtok is not None and api_output_usd_per_mtok is not None:
        if api_input_usd_per_mtok < 0 or api_output_usd_per_mtok < 0:
            raise EstimateError("API prices cannot be negative.")
        blended = (input_per_output * api_input_usd_per_mtok + api_output_usd_per_mtok) / (
            input_per_output + 1
        )
        if blended > 0:
            break_even = monthly / blended * 1e6
    return CostEstimate(per_mtok_input, per_mtok_output, monthly, capacity, break_even)
