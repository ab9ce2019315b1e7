"""Configuration: flags > environment (WMS_PILOT_*) > config file (INI or TOML) > defaults."""

from __future__ import annotations

import pytest

from pilots.agent.config import DEFAULTS, OPTIONS, ConfigError, load


@pytest.fixture
def ini(tmp_path):
    path = tmp_path / "pilot.ini"
    path.write_text(
        "[pilot]\n"
        "server_url = http://file.example:8000/\n"
        "site = FILE-SITE\n"
        "slots = 3\n"
        "grace-period = 7\n"
        "device_type = gpu\n"
        "broker_data_folder_in = /from/file\n"
    )
    return path


def test_defaults_when_nothing_is_set():
    config, _ = load([], {})
    assert config == DEFAULTS
    assert (config.slots, config.device_type, config.bus_prefix) == (1, "cpu", "wms")
    assert config.spool_path == config.work_path / "spool"


def test_flags_beat_env_beat_file_beat_defaults(ini):
    env = {"WMS_PILOT_CONFIG": str(ini), "WMS_PILOT_SLOTS": "5", "WMS_PILOT_SITE": "ENV-SITE"}

    config, _ = load(["--site", "FLAG-SITE"], env)

    assert config.site == "FLAG-SITE"  # flag over env over file
    assert config.slots == 5  # env over file
    assert config.grace_period == 7.0 and config.device_type == "gpu"  # file over defaults
    assert config.server_url == "http://file.example:8000"  # trailing slash dropped
    assert config.heartbeat_interval == DEFAULTS.heartbeat_interval  # default


def test_the_config_flag_beats_the_config_variable(ini, tmp_path):
    other = tmp_path / "other.ini"
    other.write_text("[pilot]\nsite = OTHER\n")

    config, _ = load(["--config", str(ini)], {"WMS_PILOT_CONFIG": str(other)})

    assert config.site == "FILE-SITE"


def test_toml_files_with_a_pilot_table_or_top_level_keys(tmp_path):
    table = tmp_path / "a.toml"
    table.write_text('[pilot]\nslots = 4\nidle_timeout = 60\nkeep_job_dirs = true\nsite = "T"\n')
    flat = tmp_path / "b.toml"
    flat.write_text('slots = 2\nstage-in = "copy"\n')

    a, _ = load(["--config", str(table)], {})
    b, _ = load(["--config", str(flat)], {})

    assert (a.slots, a.idle_timeout, a.keep_job_dirs, a.site) == (4, 60.0, True, "T")
    assert (b.slots, b.stage_in) == (2, "copy")


def test_broker_transport_options_merge_key_by_key(ini):
    env = {"WMS_PILOT_BROKER_DATA_FOLDER_OUT": "/from/env", "WMS_PILOT_BROKER_URL": "memory://"}

    config, _ = load(["--config", str(ini), "--broker-option", "data_folder_out=/from/flag"], env)

    assert config.broker_url == "memory://"
    assert config.broker_options == {
        "data_folder_in": "/from/file",
        "data_folder_out": "/from/flag",
    }


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--slots", "0"], {}, "slots = '0' (from --slots): must be at least 1"),
        ([], {"WMS_PILOT_DEVICE_TYPE": "tpu"}, "from WMS_PILOT_DEVICE_TYPE"),
        ([], {"WMS_PILOT_HEARTBEAT_INTERVAL": "soon"}, "heartbeat_interval"),
        (["--keep-job-dirs", "maybe"], {}, "not a boolean"),
        (["--broker-option", "novalue"], {}, "want KEY=VALUE"),
    ],
)
def test_bad_values_are_refused_with_their_source(argv, env, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load(argv, env)


def test_an_unknown_key_in_the_file_is_an_error(tmp_path):
    path = tmp_path / "p.ini"
    path.write_text("[pilot]\nslot = 2\n")  # a typo must not pass silently

    with pytest.raises(ConfigError, match="unknown option 'slot'"):
        load(["--config", str(path)], {})


def test_every_option_has_a_flag_a_variable_and_a_default():
    for option in OPTIONS:
        assert option.flag == "--" + option.name.replace("_", "-")
        assert option.env == "WMS_PILOT_" + option.name.upper()
        assert hasattr(DEFAULTS, option.name)


def test_print_config_hides_secrets():
    config, _ = load(["--register-token", "s3cret", "--broker-url", "amqp://u:pw@mq:5672//"], {})

    shown = config.redacted()

    assert shown["register_token"] == "***"
    assert shown["broker_url"] == "amqp://u:***@mq:5672//"
