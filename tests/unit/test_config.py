"""Config loading: YAML, ORZ__ environment overrides, CLI overrides, and docs/configuration.md."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.config import Config, ConfigError
from services.config_io import config_to_env, env_overrides, load_config, reference_markdown, require_model

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
    with pytest.raises(ConfigError, match=r"learner\.totl_steps: unknown key \(did you mean total_steps\?\)"):
        load_config(environ={"ORZ__LEARNER__TOTL_STEPS": "5"})
    with pytest.raises(ConfigError, match=r"learner\.max_staleness must be >= 0, got -1"):
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


def test_config_reference_page_is_current() -> None:
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert reference_markdown() in page, \
        "regenerate docs/configuration.md's table with services.config_io.reference_markdown()"


@pytest.mark.parametrize(("env", "message"), [
    ({"ORZ__GENERATOR__MAX_INFLGHT_REQUESTS": "4"}, r"generator\.max_inflght_requests: unknown key \(did you mean "
     r"max_inflight_requests\?\)"),
    ({"ORZ__NOPE": "1"}, r"  - nope: unknown key"),
    ({"ORZ__SAMPLING__TOP_P": "0"}, r"sampling\.top_p must be in \(0, 1\], got 0\.0"),
    ({"ORZ__LEARNER__GAMMA": "1.5"}, r"learner\.gamma must be in \[0, 1\], got 1\.5"),
    ({"ORZ__LEARNER__ACTOR_LR": "0"}, r"learner\.actor_lr must be > 0, got 0\.0"),
    ({"ORZ__REWARD__PORT": "70000"}, r"reward\.port must be in \[0, 65535\], got 70000"),
    ({"ORZ__LEARNER__BATCH_PROMPTS": "8", "ORZ__LEARNER__MAX_INFLIGHT_PROMPTS": "4"},
     r"max_inflight_prompts \(4\) is below learner\.batch_prompts \(8\)"),
    ({"ORZ__LEARNER__BATCH_PROMPTS": "2", "ORZ__LEARNER__NUM_PROCESSES": "4"},
     r"batch_prompts \(2\) is below learner\.num_processes \(4\)"),
    ({"ORZ__SAMPLING__MAX_TOKENS": "256"}, r"sampling\.max_tokens \(256\) leaves no room for a prompt"),
    ({"ORZ__REDIS__BLOCK_MS": "20000"}, r"redis\.block_ms \(20000\) must be below redis\.socket_timeout_s"),
    ({"ORZ__LEARNER__BETAS": "[0.9, 1.0]"}, r"learner\.betas must each be in \[0, 1\)"),
    ({"ORZ__REWARD__WORKERS": "two"}, r"reward\.workers: Input should be a valid integer.*got 'two'"),
])
def test_impossible_values_are_refused_naming_the_key(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(environ=env)


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(environ={"ORZ__LEARNER__MAX_STALENESS": "-1", "ORZ__SAMPLING__TOP_P": "2",
                             "ORZ__EVAL__SAMPLES": "0"})
    lines = [x for x in str(info.value).splitlines() if x.startswith("  - ")]
    assert len(lines) == 3, str(info.value)


def test_a_missing_model_is_named(tmp_path: Path) -> None:
    cfg = load_config(environ={"ORZ__MODEL__BASE_PATH": str(tmp_path / "nowhere")})
    with pytest.raises(ConfigError, match="nowhere does not exist: build the tiny model with `orz make-base-model`"):
        require_model(cfg)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="has no config.json"):
        require_model(load_config(environ={"ORZ__MODEL__BASE_PATH": str(tmp_path / "empty")}))


def test_cli_refuses_a_bad_config_with_exit_code_2(tmp_path: Path) -> None:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "services.cli", "learner", "--set",
                          f"model.base_path={tmp_path / 'nowhere'}"], check=False, cwd=ROOT, capture_output=True,
                         text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 2 and "config error" in out.stderr and "nowhere does not exist" in out.stderr
    out = subprocess.run([sys.executable, "-m", "services.cli", "generator", "--set", "learner.max_staleness=-2"],
                         check=False, cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 2 and "learner.max_staleness must be >= 0, got -2" in out.stderr
