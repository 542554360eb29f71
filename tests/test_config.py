"""Configuration validation: errors name the file, the key and what is allowed."""

from pathlib import Path

import pytest
import yaml

from agent.config import ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parent.parent


def minimal() -> dict:
    return {
        "broker": {"host": "127.0.0.1", "port": 1883, "client_id": "gw1"},
        "database": "alarms.db",
        "assets": [{
            "name": "pump1", "sample_period": "1s", "model": "../models/dodgers-unet",
            "channels": [{"name": "flow", "topic": "plant/pump1/flow"}],
        }],
    }


def error_of(raw) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(raw, Path("/etc/segwatch/agent.yaml"))
    return str(info.value)


def test_shipped_configurations_are_valid():
    for path in (ROOT / "edge_configs").glob("*.yaml"):
        if "pump" in path.name:
            raw = yaml.safe_load(path.read_text())
            raw["broker"].pop("password_file")
            parse_config(raw, path)
        else:
            load_config(path)


def test_durations_and_defaults():
    config = parse_config(minimal(), Path("/etc/segwatch/agent.yaml"))
    asset = config.assets[0]
    assert asset.sample_period == 1.0
    assert asset.max_lateness == 2.0
    assert asset.normalization == "bundle" and asset.ensemble == "mean"
    assert asset.alarm.threshold is None and asset.alarm.min_duration is None
    assert config.database == Path("/etc/segwatch/alarms.db")
    assert asset.model == Path("/etc/models/dodgers-unet")


def test_error_names_file_key_and_allowed_values():
    raw = minimal()
    raw["assets"][0]["ensemble"] = "average"
    message = error_of(raw)
    assert "/etc/segwatch/agent.yaml" in message
    assert "assets[0].ensemble" in message
    assert "mean, median, max" in message


def test_unknown_key_is_rejected_with_the_allowed_keys():
    raw = minimal()
    raw["broker"]["hostname"] = "x"
    message = error_of(raw)
    assert "broker.hostname" in message and "unknown key" in message and "host" in message


def test_missing_required_keys():
    raw = minimal()
    del raw["database"]
    assert "'database'" in error_of(raw)
    raw = minimal()
    del raw["assets"][0]["sample_period"]
    assert "assets[0].sample_period" in error_of(raw)


def test_wrong_types_and_ranges():
    raw = minimal()
    raw["broker"]["port"] = "1883"
    assert "broker.port" in error_of(raw) and "integer" in error_of(raw)
    raw = minimal()
    raw["broker"]["port"] = 70000
    assert "above the maximum" in error_of(raw)
    raw = minimal()
    raw["assets"][0]["sample_period"] = "5 fortnights"
    assert "assets[0].sample_period" in error_of(raw)


def test_password_never_in_yaml():
    raw = minimal()
    raw["broker"]["password"] = "secret"
    assert "password_file" in error_of(raw)


def test_password_from_environment(monkeypatch):
    raw = minimal()
    raw["broker"]["password_env"] = "SEGWATCH_TEST_PASSWORD"
    assert "not set" in error_of(raw)
    monkeypatch.setenv("SEGWATCH_TEST_PASSWORD", "s3cret")
    config = parse_config(raw, Path("/tmp/a.yaml"))
    assert config.broker.password == "s3cret"
    assert "s3cret" not in repr(config.broker)


def test_topic_segments_and_wildcards_are_validated():
    raw = minimal()
    raw["assets"][0]["name"] = "pump/1"
    assert "assets[0].name" in error_of(raw)
    raw = minimal()
    raw["assets"][0]["channels"][0]["topic"] = "plant/+/flow"
    assert "wildcards" in error_of(raw)


def test_a_topic_belongs_to_one_asset():
    raw = minimal()
    second = dict(raw["assets"][0], name="pump2")
    raw["assets"].append(second)
    assert "is used by pump1/flow and pump2/flow" in error_of(raw)


def test_asset_needs_topics():
    raw = minimal()
    raw["assets"][0]["channels"] = [{"name": "flow"}]
    assert "assets[0].topic" in error_of(raw)


def test_yaml_syntax_error_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("broker: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(path)
