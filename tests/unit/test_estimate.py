"""The estimator against hand-computed examples."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sluice.bench.estimate import (
    GB,
    EstimateError,
    ModelShape,
    estimate_cost,
    estimate_memory,
)
from sluice.cli import main

LLAMA_7B = {
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "intermediate_size": 11008,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
}


def test_llama_7b_at_fp16_has_14_gb_of_weights_and_half_a_mib_of_kv_per_token() -> None:
    shape = ModelShape.from_config(LLAMA_7B)
    # 2 x 32000 x 4096 embeddings + 32 x (4 x 4096^2 + 3 x 4096 x 11008 + 2 x 4096) + 4096
    assert shape.parameters == 6_738_415_616
    memory = estimate_memory(shape, precision="fp16", context_len=4096, memory_gib=80)
    assert memory.weights_bytes / GB == pytest.approx(13.48, abs=0.01)  # "14 GB"
    assert memory.kv_bytes_per_token == 2 * 32 * 32 * 128 * 2 == 524_288  # 0.5 MiB
    assert memory.kv_bytes_per_sequence == 524_288 * 4096  # 2 GiB at full context


def test_largest_batch_follows_from_what_is_left() -> None:
    shape = ModelShape.from_config(LLAMA_7B)
    memory = estimate_memory(
        shape,
        precision="fp16",
        context_len=4096,
        memory_gib=80,
        utilization=0.9,
        batched_tokens=8192,
        overhead_gib=1.0,
    )
    available = 80 * 2**30 * 0.9 - memory.weights_bytes - 2**30
    step = 8192 * (4 * 4096 + 2 * 11008) * 2
    expected = int((available - step) // (524_288 * 4096 + 32000 * 4))
    # (77.31 GB - 13.48 GB weights - 1.07 GB overhead - 0.63 GB step) / 2.15 GB = 28.9
    assert memory.max_sequences == expected == 28


def test_grouped_query_attention_and_kv_precision() -> None:
    shape = ModelShape.from_config({**LLAMA_7B, "num_key_value_heads": 8})
    memory = estimate_memory(
        shape, precision="bf16", kv_precision="fp8", context_len=1024, memory_gib=80
    )
    assert memory.kv_bytes_per_token == 2 * 32 * 8 * 128 * 1


def test_costs_and_break_even_by_hand() -> None:
    cost = estimate_cost(
        gpu_usd_per_hour=2.0,
        input_tokens_per_s=10_000,
        output_tokens_per_s=1_000,
        api_input_usd_per_mtok=1.0,
        api_output_usd_per_mtok=3.0,
        input_per_output=1.0,
    )
    assert cost.usd_per_mtok_input == pytest.approx(2.0 / 36_000_000 * 1e6)
    assert cost.usd_per_mtok_output == pytest.approx(2.0 / 3_600_000 * 1e6)
    assert cost.monthly_gpu_usd == pytest.approx(1460.0)
    # blended API price 2 USD/Mtok: 1460 USD buys 730 M tokens
    assert cost.break_even_tokens_per_month == pytest.approx(730e6)
    # a 1:1 pair takes 0.0001 + 0.001 s: 2 tokens per 1.1 ms over 730 h
    assert cost.monthly_capacity_tokens == pytest.approx(730 * 3600 / 0.0011 * 2)
    assert cost.breaks_even_within_capacity


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({k: v for k, v in LLAMA_7B.items() if k != "hidden_size"}, "hidden_size"),
        ({**LLAMA_7B, "num_hidden_layers": -1}, "positive integer"),
    ],
)
def test_bad_configs_get_one_clear_sentence(config: dict[str, object], message: str) -> None:
    with pytest.raises(EstimateError, match=message):
        ModelShape.from_config(config)


def test_impossible_numbers_are_refused() -> None:
    shape = ModelShape.from_config(LLAMA_7B)
    with pytest.raises(EstimateError, match="do not fit"):
        estimate_memory(shape, precision="fp16", context_len=4096, memory_gib=8)
    with pytest.raises(EstimateError, match="longer than the model supports"):
        estimate_memory(shape, precision="fp16", context_len=9000, memory_gib=80)
    with pytest.raises(EstimateError, match="Unknown precision"):
        estimate_memory(shape, precision="fp12", context_len=1024, memory_gib=80)
    with pytest.raises(EstimateError, match="positive"):
        estimate_cost(gpu_usd_per_hour=0, input_tokens_per_s=1, output_tokens_per_s=1)


def test_cli_prints_a_table_and_refuses_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_7B))
    assert (
        main(
            [
                "estimate",
                "--model",
                str(tmp_path),
                "--dtype",
                "fp16",
                "--memory-gib",
                "80",
                "--gpu-usd-per-hour",
                "2",
                "--input-tokens-per-s",
                "10000",
                "--output-tokens-per-s",
                "1000",
                "--api-input-usd-per-mtok",
                "1",
                "--api-output-usd-per-mtok",
                "3",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "13.48 GB" in out
    assert "512.0 KiB" in out
    assert "break-even" in out
    assert main(["estimate", "--model", str(tmp_path / "missing")]) == 2
    assert main(["estimate", "--model", str(tmp_path), "--gpu-usd-per-hour", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("sluice:") == 2
    assert "Traceback" not in err
