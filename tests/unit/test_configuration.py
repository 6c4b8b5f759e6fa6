"""Every setting is documented in .env.example, and every documented name is a real setting."""

import re
from pathlib import Path

import yaml

from services.cli.config import CliSettings
from services.cli.stack import StackSettings
from services.common.config import AuthSettings
from services.common.startup import env_name
from services.judge.config import JudgeSettings
from services.query.config import QuerySettings
from services.web.config import WebSettings
from services.writer.config import MigrateSettings, WriterSettings
from trainer_client.config import PredictionsConfig
from trainer_client.credentials import CredentialSettings
from trainer_client.demo import DemoSettings

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = (AuthSettings, WriterSettings, QuerySettings, MigrateSettings, CliSettings,
            StackSettings, PredictionsConfig, DemoSettings, JudgeSettings, CredentialSettings,
            WebSettings)


def known_names() -> set[str]:
    """Each field's environment variable: the class's prefix + its name, or its alias (the
    one EPOCHLENS_SQLITE_DIR every database settings class shares)."""
    return {env_name(cls, name) for cls in SETTINGS for name in cls.model_fields}


def documented_names() -> set[str]:
    text = (ROOT / ".env.example").read_text()
    return set(re.findall(r"^#? ?(EPOCHLENS_[A-Z0-9_]+)=", text, flags=re.MULTILINE))


def test_every_setting_is_in_env_example():
    assert sorted(known_names() - documented_names()) == []


def test_env_example_names_only_real_settings():
    assert sorted(documented_names() - known_names()) == []


def test_every_setting_has_a_description():
    missing = [f"{cls.__name__}.{name}" for cls in SETTINGS
               for name, field in cls.model_fields.items() if not field.description]
    assert missing == []


def test_compose_uses_only_real_settings_and_has_health_checks():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"postgres", "migrate", "judge", "writer", "query", "web"}
    for name in ("judge", "writer", "query", "web"):
        assert services[name]["healthcheck"]["test"][1:3] == ["epochlens", "health"]
    assert services["web"]["healthcheck"]["test"][3:] == ["--url",
                                                          "http://127.0.0.1:8080/healthz"]
    assert services["web"]["depends_on"] == {"query": {"condition": "service_healthy"}}
    used = {key for svc in services.values() for key in (svc.get("environment") or {})
            if key.startswith("EPOCHLENS_")}
    assert used and sorted(used - known_names()) == []


# Settings whose .env.example value deliberately differs from the code default.
EXAMPLE_OVERRIDES = {"AuthSettings.jwt_secret", "QuerySettings.page_token_secret",
                     "WriterSettings.judge_address"}


def test_env_example_values_load_and_match_the_defaults(monkeypatch):
    """Every class loads .env.example (what `make up` copies to .env), and each value the
    example sets is the code's default, except the few it overrides on purpose."""
    for name in [n for n in list(__import__("os").environ) if n.startswith("EPOCHLENS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("EPOCHLENS_AUTH_JWT_SECRET", "x" * 32)
    monkeypatch.setenv("EPOCHLENS_QUERY_PAGE_TOKEN_SECRET", "x")
    differing = []
    for cls in SETTINGS:
        example = cls(_env_file=ROOT / ".env.example").model_dump(mode="json")
        default = cls(_env_file=None).model_dump(mode="json")
        differing += [f"{cls.__name__}.{k}" for k in default if example[k] != default[k]]
    assert sorted(set(differing) - EXAMPLE_OVERRIDES) == []
