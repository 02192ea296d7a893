"""vLLM's serve options: sluice's defaults, the `vllm:` settings section and command-line flags,
all through vLLM's own parser."""

from __future__ import annotations

import pytest

from sluice.engine.args import SERVER_ONLY, EngineArgumentError, engine_namespace, model_in

MODEL = "org/model"


def test_cpu_defaults() -> None:
    args = engine_namespace(MODEL)
    assert args.model == MODEL
    assert (args.dtype, args.enforce_eager, args.scheduling_policy) == (
        "float32",
        True,
        "priority",
    )
    assert args.served_model_name is None  # vLLM then serves the model id exactly as given


def test_no_cpu_defaults_elsewhere() -> None:
    args = engine_namespace(MODEL, on_cpu=False)
    assert (args.dtype, args.enforce_eager, args.scheduling_policy) == ("auto", False, "priority")


def test_settings_section_over_defaults_and_flags_over_settings() -> None:
    args = engine_namespace(
        MODEL,
        options={"dtype": "bfloat16", "max_model_len": 512, "enforce_eager": False},
        cli_args=["--max-model-len", "1024"],
    )
    assert args.dtype == "bfloat16"
    assert args.enforce_eager is False
    assert args.max_model_len == 1024


def test_environment_values_are_yaml_scalars() -> None:
    # SLUICE_VLLM__NAME=value arrives as text
    args = engine_namespace(
        MODEL,
        options={
            "enforce_eager": "false",
            "max_num_seqs": "8",
            "served_model_name": "[a, b]",
            "default_chat_template_kwargs": '{"enable_thinking": false}',
        },
    )
    assert (args.enforce_eager, args.max_num_seqs) == (False, 8)
    assert args.served_model_name == ["a", "b"]
    assert args.default_chat_template_kwargs == {"enable_thinking": False}


def test_served_names_default_and_override() -> None:
    assert engine_namespace(MODEL, served_model_names=["x"]).served_model_name == ["x"]
    args = engine_namespace(
        MODEL, served_model_names=["x"], cli_args=["--served-model-name", "a", "b"]
    )
    assert args.served_model_name == ["a", "b"]


def test_lora_modules_reach_vllm() -> None:
    args = engine_namespace(
        MODEL, cli_args=["--enable-lora", "--lora-modules", "tiny=/adapters/tiny"]
    )
    assert args.enable_lora is True
    assert [(m.name, m.path) for m in args.lora_modules] == [("tiny", "/adapters/tiny")]


@pytest.mark.parametrize(
    ("cli_args", "words"),
    [
        (["--max-model-len", "lots"], "max-model-len"),
        (["--frobnicate"], "frobnicate"),
        (["--dtype", "float99"], "dtype"),
        (["--enable-auto-tool-choice"], "tool-call-parser"),
    ],
)
def test_vllm_refusals_are_one_sentence(cli_args: list[str], words: str) -> None:
    with pytest.raises(EngineArgumentError) as caught:
        engine_namespace(MODEL, cli_args=cli_args)
    assert words in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("cli_args", "name"),
    [
        (["--api-key", "secret"], "api_key"),
        (["--ssl-keyfile", "k.pem"], "ssl_keyfile"),
        (["--api-server-count", "2"], "api_server_count"),
        (["--root-path", "/v"], "root_path"),
    ],
)
def test_vllm_http_server_options_are_refused_with_advice(cli_args: list[str], name: str) -> None:
    with pytest.raises(EngineArgumentError) as caught:
        engine_namespace(MODEL, cli_args=cli_args)
    message = str(caught.value)
    assert f"--{name.replace('_', '-')}" in message
    assert SERVER_ONLY[name] in message


def test_server_only_names_are_vllm_options() -> None:
    args = engine_namespace(MODEL)
    assert all(hasattr(args, name) for name in SERVER_ONLY)


def test_model_given_positionally() -> None:
    assert model_in(["org/x", "--dtype", "float32"]) == ("org/x", ["--dtype", "float32"])
    assert model_in(["--max-model-len", "64", "org/x"]) == ("org/x", ["--max-model-len", "64"])
    assert model_in(["--max-model-len", "64"]) == (None, ["--max-model-len", "64"])


def test_two_models_are_refused() -> None:
    with pytest.raises(EngineArgumentError, match="two models"):
        engine_namespace(MODEL, cli_args=["other/model"])
