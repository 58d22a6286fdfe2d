"""Config loading: YAML, ORZ__ environment overrides, CLI overrides, and the README's generated reference."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from services.config import Config, config_to_env, env_overrides, load_config, reference_markdown

ROOT = Path(__file__).resolve().parents[2]


def test_env_overrides_parse_nested_keys_and_yaml_scalars() -> None:
    env = {"ORZ__LEARNER__TOTAL_STEPS": "5", "ORZ__REDIS__URL": "redis://h:1/0", "ORZ__SAMPLING__STOP": "[a, b]",
           "ORZ__LEARNER__NORMALIZE_ADVANTAGES": "false", "PATH": "/bin", "ORZ__REDIS__CLAIM_IDLE_MS": "7"}
    assert env_overrides(env) == {
        "learner": {"total_steps": 5, "normalize_advantages": False},
        "redis": {"url": "redis://h:1/0", "claim_idle_ms": 7}, "sampling": {"stop": ["a", "b"]},
    }


def test_precedence_yaml_then_env_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("learner:\n  total_steps: 3\n  batch_prompts: 4\nrun_name: fromyaml\n")
    cfg = load_config(path, environ={"ORZ__LEARNER__TOTAL_STEPS": "9"}, overrides={"run_name": "fromcli"})
    assert (cfg.learner.total_steps, cfg.learner.batch_prompts, cfg.run_name) == (9, 4, "fromcli")
    assert cfg.max_inflight_prompts == 4 * (cfg.learner.max_staleness + 1)
    assert cfg.namespace == "orz:fromcli"


def test_unknown_keys_and_bad_values_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="totl_steps"):
        load_config(environ={"ORZ__LEARNER__TOTL_STEPS": "5"})
    with pytest.raises(ValidationError, match="max_staleness"):
        load_config(environ={"ORZ__LEARNER__MAX_STALENESS": "-1"})
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="top level must be a mapping"):
        load_config(path, environ={})


def test_config_to_env_round_trips_every_key() -> None:
    cfg = load_config(ROOT / "configs" / "tiny.yaml", environ={})
    cfg.redis.url = "redis://127.0.0.1:6399/0"
    again = load_config(environ=config_to_env(cfg))
    assert again.model_dump() == cfg.model_dump()


def test_shipped_configs_load() -> None:
    for path in (ROOT / "configs").glob("*.yaml"):
        assert isinstance(load_config(path, environ={}), Config)


def test_readme_config_reference_is_current() -> None:
    readme = (ROOT / "README.md").read_text()
    assert reference_markdown() in readme, "regenerate the README table with services.config.reference_markdown()"
