"""Gateway settings precedence: default < .env < NER_* environment < init kwargs (the CLI flags)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from pydantic import ValidationError

from ner_gateway.cli import main
from ner_gateway.settings import GatewaySettings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Empty cwd (no stray .env) and no NER_* variables from the outer environment."""
    for key in list(os.environ):
        if key.upper().startswith("NER_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_defaults() -> None:
    settings = GatewaySettings()
    assert settings.host == "127.0.0.1"
    assert settings.port == 50051
    assert settings.model_repository == Path("model_repository")
    assert settings.triton_url is None
    assert settings.default_model is None
    assert settings.max_texts_per_request == 64
    assert settings.max_text_chars == 100_000
    assert settings.max_request_chars == 400_000
    assert settings.window_stride is None
    assert settings.default_timeout_s == 30.0
    assert (settings.cpu_offload_chars, settings.cpu_offload_threads) == (2000, 2)
    assert (settings.shutdown_drain_s, settings.shutdown_grace_s) == (5.0, 30.0)
    assert (settings.max_inflight_requests, settings.max_inflight_windows, settings.retry_after_ms) == (256, 2048, 200)
    assert (settings.triton_inflight_tokens, settings.request_inflight_tokens) == (8192, 2048)
    assert settings.log_level == "INFO"


def test_environment_overrides_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NER_PORT", "6000")
    monkeypatch.setenv("NER_TRITON_URL", "triton:8001")
    monkeypatch.setenv("NER_MODEL_REPOSITORY", "/models")
    monkeypatch.setenv("NER_MAX_TEXT_CHARS", "100")
    monkeypatch.setenv("NER_LOG_LEVEL", "DEBUG")
    settings = GatewaySettings()
    assert settings.port == 6000
    assert settings.triton_url == "triton:8001"
    assert settings.model_repository == Path("/models")
    assert settings.max_text_chars == 100
    assert settings.log_level == "DEBUG"
    assert settings.host == "127.0.0.1"  # untouched fields keep their defaults


def test_environment_is_case_insensitive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ner_port", "6001")
    assert GatewaySettings().port == 6001


def test_kwargs_override_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NER_PORT", "6000")
    monkeypatch.setenv("NER_HOST", "0.0.0.0")
    settings = GatewaySettings(port=7000)
    assert settings.port == 7000
    assert settings.host == "0.0.0.0"


def test_dotenv_between_default_and_environment(monkeypatch: pytest.MonkeyPatch, clean_env: Path) -> None:
    (clean_env / ".env").write_text("NER_PORT=5000\nNER_HOST=10.0.0.1\nNER_DEFAULT_MODEL=from-dotenv\n")
    assert GatewaySettings().port == 5000
    monkeypatch.setenv("NER_PORT", "6000")
    settings = GatewaySettings()
    assert (settings.port, settings.host, settings.default_model) == (6000, "10.0.0.1", "from-dotenv")
    settings = GatewaySettings(port=7000, default_model="flag")
    assert (settings.port, settings.host, settings.default_model) == (7000, "10.0.0.1", "flag")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("NER_PORT", "notanumber"),
        ("NER_PORT", "65536"),
        ("NER_PORT", "-1"),
        ("NER_MAX_TEXTS_PER_REQUEST", "0"),
        ("NER_MAX_TEXT_CHARS", "0"),
        ("NER_DEFAULT_TIMEOUT_S", "0"),
        ("NER_CPU_OFFLOAD_CHARS", "-1"),
        ("NER_CPU_OFFLOAD_THREADS", "0"),
        ("NER_SHUTDOWN_DRAIN_S", "-1"),
        ("NER_MAX_INFLIGHT_REQUESTS", "0"),
        ("NER_MAX_INFLIGHT_WINDOWS", "0"),
        ("NER_RETRY_AFTER_MS", "-1"),
        ("NER_TRITON_INFLIGHT_TOKENS", "0"),
        ("NER_REQUEST_INFLIGHT_TOKENS", "0"),
        ("NER_LOG_LEVEL", "TRACE"),
    ],
)
def test_invalid_environment(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError):
        GatewaySettings()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"port": 70000},
        {"port": "x"},
        {"max_texts_per_request": 0},
        {"health_check_interval_s": 0},
        {"shutdown_grace_s": -1},
        {"shutdown_drain_s": -1},
        {"log_level": "debug"},
        {"no_such_setting": 1},
    ],
)
def test_invalid_kwargs(kwargs: dict) -> None:
    with pytest.raises(ValidationError):
        GatewaySettings(**kwargs)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"NER_TLS_CERT_FILE": "/tls/tls.crt"}, "TLS needs both NER_TLS_CERT_FILE and NER_TLS_KEY_FILE"),
        ({"NER_TLS_KEY_FILE": "/tls/tls.key"}, "TLS needs both NER_TLS_CERT_FILE and NER_TLS_KEY_FILE"),
        ({"NER_TLS_CLIENT_CA_FILE": "/tls/ca.crt"}, "NER_TLS_CLIENT_CA_FILE (mutual TLS) needs NER_TLS_CERT_FILE"),
        ({"NER_AUTH_TOKENS": " , "}, "NER_AUTH_TOKENS is set but holds no token"),
        ({"NER_AUTH_EXEMPT_REFLECTION": "maybe"}, "auth_exempt_reflection"),
    ],
)
def test_invalid_security_settings(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=re.escape(message)):
        GatewaySettings()
    result = CliRunner().invoke(main, ["serve"])  # refused before anything starts, with the reason
    assert result.exit_code == 1 and message in result.output


def test_security_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NER_TLS_CERT_FILE", "/tls/tls.crt")
    monkeypatch.setenv("NER_TLS_KEY_FILE", "/tls/tls.key")
    monkeypatch.setenv("NER_TLS_CLIENT_CA_FILE", "/tls/ca.crt")
    monkeypatch.setenv("NER_AUTH_TOKENS", "s3cret-one,s3cret-two")
    settings = GatewaySettings()
    assert (settings.tls_cert_file, settings.tls_key_file) == (Path("/tls/tls.crt"), Path("/tls/tls.key"))
    assert settings.auth_tokens is not None and settings.auth_tokens.get_secret_value() == "s3cret-one,s3cret-two"
    assert "s3cret" not in repr(settings)  # a SecretStr: masked wherever the settings are printed
    assert (settings.auth_tokens_file, settings.auth_exempt_reflection) == (None, False)


def test_invalid_kwarg_not_masked_by_valid_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NER_PORT", "6000")
    with pytest.raises(ValidationError):
        GatewaySettings(port=-5)


@pytest.mark.parametrize("name", ["NER_TRITON_GRPC_PORT", "NER_TRITON_HTTP_PORT", "NER_TRITON_METRICS_PORT"])
def test_triton_port_with_a_remote_triton_is_refused(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    # A port of the embedded Triton has no effect on a remote one: refused, not silently ignored.
    monkeypatch.setenv(name, "9000")
    assert getattr(GatewaySettings(), name.removeprefix("NER_").lower()) == 9000  # alone: taken as is
    monkeypatch.setenv("NER_TRITON_URL", "triton:8001")
    with pytest.raises(ValidationError, match=f"{name} set the embedded Triton's ports, but NER_TRITON_URL"):
        GatewaySettings()
    assert GatewaySettings(**{name.removeprefix("NER_").lower(): 0}).triton_url == "triton:8001"  # 0 = unset
    result = CliRunner().invoke(main, ["serve"])
    assert result.exit_code == 1 and name in result.output


def test_unknown_key_in_dotenv_is_rejected(clean_env: Path) -> None:
    (clean_env / ".env").write_text("NER_PROT=5000\n")
    with pytest.raises(ValidationError):
        GatewaySettings()


def test_cli_port_not_a_number() -> None:
    result = CliRunner().invoke(main, ["serve", "--port", "notanumber"])
    assert result.exit_code == 2
    assert "Invalid value for '--port'" in result.output


@pytest.mark.parametrize(
    ("args", "field"),
    [(["--port", "70000"], "port"), (["--max-texts-per-request", "0"], "max_texts_per_request")],
)
def test_cli_out_of_range_is_a_clean_error(args: list[str], field: str) -> None:
    # Validation fails before anything starts: exit 1 with pydantic's message, no traceback.
    result = CliRunner().invoke(main, ["serve", *args])
    assert result.exit_code == 1
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert field in result.output


def test_cli_bad_env_is_a_clean_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NER_PORT", "notanumber")
    result = CliRunner().invoke(main, ["serve"])
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit)
    assert "port" in result.output


def test_cli_flags_beat_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import ner_gateway.transport.server

    seen: list[GatewaySettings] = []

    async def fake_serve(settings: GatewaySettings) -> None:
        seen.append(settings)

    monkeypatch.setattr(ner_gateway.transport.server, "serve", fake_serve)
    monkeypatch.setenv("NER_PORT", "6000")
    monkeypatch.setenv("NER_HOST", "0.0.0.0")
    monkeypatch.setenv("NER_MAX_TEXT_CHARS", "100")
    result = CliRunner().invoke(main, ["serve", "--port", "7000", "--max-text-chars", "50", "--model-repository",
                                       "/repo", "--log-level", "WARNING"])
    assert result.exit_code == 0, result.output
    (settings,) = seen
    assert settings.port == 7000
    assert settings.max_text_chars == 50
    assert settings.host == "0.0.0.0"
    assert settings.model_repository == Path("/repo")
    assert settings.log_level == "WARNING"
    assert settings.max_texts_per_request == 64
