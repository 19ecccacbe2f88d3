"""The YAML files staff edit: a mistake names the file and the key."""

from __future__ import annotations

import shutil

import pytest

from analysis import ConfigError, load_config
from analysis.config import DEFAULT_CONFIG_DIR


@pytest.fixture()
def config_copy(tmp_path):
    target = tmp_path / "config"
    shutil.copytree(DEFAULT_CONFIG_DIR, target)
    return target


def test_packaged_config_loads_and_is_consistent():
    config = load_config()
    assert "其他" in config.taxonomy.names and len(config.taxonomy.names) >= 11
    assert set(config.gazetteer.district_names) >= {"江南区", "江北区", "滨湖区", "高新区", "老城区", "新港区"}
    assert config.defaults.duplicates.threshold == 0.85


@pytest.mark.parametrize(
    ("file", "old", "new", "message"),
    [
        ("taxonomy.yaml", '"路灯.{0,6}(坏|不亮|灭|闪)"', '"路灯(坏"', "bad regular expression"),
        ("taxonomy.yaml", "keywords: [路灯,", "keywords: [123,", "list of non-empty strings"),
        ("urgency.yaml", "high: 4.5", "high: 0.5", "high > medium"),
        ("departments.yaml", "  教育服务:", "  教育服:", "not in the taxonomy"),
        ("departments.yaml", "      高新区: 高新区建设管理局", "      高薪区: 高新区建设管理局", "unknown district"),
        ("departments.yaml", '    district: "{district}教育局"', '    district: "教育局"', "must contain {district}"),
        ("defaults.yaml", "threshold: 0.85", "threshold: 3", "duplicates.threshold"),
        ("defaults.yaml", "  min_score: 0.2", "  min_scor: 0.2", "unknown keys"),
        ("gazetteer.yaml", "city: 滨江市", "city: [", "not valid YAML"),
    ],
)
def test_mistakes_are_reported_with_the_file(config_copy, file, old, new, message):
    path = config_copy / file
    text = path.read_text(encoding="utf-8")
    assert old in text, f"test needs {old!r} in {file}"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")
    with pytest.raises(ConfigError, match=message) as raised:
        load_config(config_copy)
    assert raised.value.path.name == file


def test_missing_file(config_copy):
    (config_copy / "gazetteer.yaml").unlink()
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(config_copy)


def test_config_dir_from_environment(config_copy, monkeypatch):
    path = config_copy / "departments.yaml"
    path.write_text(path.read_text(encoding="utf-8").replace("fallback: 滨江市12345热线办公室", "fallback: 测试热线"), encoding="utf-8")
    monkeypatch.setenv("HOTLINE_ANALYSIS_CONFIG", str(config_copy))
    assert load_config().matrix.fallback == "测试热线"
