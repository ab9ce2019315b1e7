"""Configuration: flags > environment (WMS_PILOT_*) > config file (INI or TOML) > defaults."""

from __future__ import annotations

import io

import pytest

from pilots.agent.config import DEFAULTS, OPTIONS, ConfigError, check_payload_user, load


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


def _secret_file(path, text, mode=0o600):
    path.write_text(text)
    path.chmod(mode)
    return str(path)


def test_print_config_hides_secrets(tmp_path):
    token = _secret_file(tmp_path / "token", "s3cret\n")
    password = _secret_file(tmp_path / "password", "pw\n")
    config, _ = load(
        [
            "--register-token-file",
            token,
            "--broker-password-file",
            password,
            "--broker-url",
            "amqp://u@mq:5672//",
        ],
        {},
    )

    shown = config.redacted()

    assert (config.register_token, config.broker_password) == ("s3cret", "pw")
    assert shown["register_token"] == shown["broker_password"] == "***"
    assert "s3cret" not in repr(shown) and "pw@" not in repr(shown)
    assert config.broker_connect_url == "amqp://u:pw@mq:5672//"


# --- secrets: files or standard input, never flags or variables ---------------------------------


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--register-token", "s3cret"], {}, "--register-token on the command line"),
        (["--broker-password", "s3cret"], {}, "--broker-password on the command line"),
        (["--broker-url", "amqp://u:s3cret@mq//"], {}, "--broker-url holds a password"),
        ([], {"WMS_PILOT_REGISTER_TOKEN": "s3cret"}, "WMS_PILOT_REGISTER_TOKEN is set"),
        ([], {"WMS_PILOT_BROKER_PASSWORD": "s3cret"}, "WMS_PILOT_BROKER_PASSWORD is set"),
        ([], {"WMS_PILOT_BROKER_URL": "amqp://u:s3cret@mq//"}, "WMS_PILOT_BROKER_URL holds"),
    ],
)
def test_secrets_on_the_command_line_or_in_the_environment_are_refused(argv, env, message):
    with pytest.raises(ConfigError, match=message) as refused:
        load(argv, env)

    text = str(refused.value)
    assert "-file" in text  # it says what to use instead
    assert "s3cret" not in text  # and does not repeat the secret


def test_secrets_come_from_files_of_mode_0600(tmp_path):
    token = _secret_file(tmp_path / "token", "  tok-1  \n")

    config, _ = load(["--register-token-file", token], {})

    assert config.register_token == "tok-1"
    assert config.secret_files() == [tmp_path / "token"]


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_a_secret_file_others_may_read_is_refused(tmp_path, mode):
    token = _secret_file(tmp_path / "token", "tok", mode)

    with pytest.raises(ConfigError, match=f"mode is {mode:04o}: others may read it"):
        load(["--register-token-file", token], {})


def test_an_empty_or_missing_secret_file_is_refused(tmp_path):
    empty = _secret_file(tmp_path / "empty", "\n")
    with pytest.raises(ConfigError, match="is empty"):
        load(["--register-token-file", empty], {})
    with pytest.raises(ConfigError, match="No such file"):
        load(["--broker-password-file", str(tmp_path / "none")], {})


def test_secrets_on_standard_input_one_line_each_token_first():
    config, _ = load(
        [
            "--register-token-file",
            "-",
            "--broker-password-file",
            "-",
            "--broker-url",
            "amqp://pilot@mq:5672/wms",
        ],
        {},
        stdin=io.StringIO("tok-2\np@ss/word:\n"),
    )

    assert (config.register_token, config.broker_password) == ("tok-2", "p@ss/word:")
    assert config.secret_files() == []  # nothing on disk for a payload to find
    # quoted into the URL kombu gets, read back unquoted by kombu
    assert config.broker_connect_url == "amqp://pilot:p%40ss%2Fword%3A@mq:5672/wms"
    from kombu import Connection

    assert Connection(config.broker_connect_url).password == "p@ss/word:"


def test_too_few_lines_on_standard_input_are_refused():
    with pytest.raises(ConfigError, match="2 secret line"):
        load(
            [
                "--register-token-file",
                "-",
                "--broker-password-file",
                "-",
                "--broker-url",
                "a://u@h",
            ],
            {},
            stdin=io.StringIO("only-one\n"),
        )


def test_a_broker_password_needs_a_user_and_no_second_password(tmp_path):
    password = _secret_file(tmp_path / "pw", "pw")
    with pytest.raises(ConfigError, match="names no user"):
        load(["--broker-password-file", password, "--broker-url", "amqp://mq//"], {})
    conf = tmp_path / "p.ini"
    conf.write_text("[pilot]\nbroker_url = amqp://u:one@mq//\n")
    conf.chmod(0o600)
    with pytest.raises(ConfigError, match="gives one too"):
        load(["--config", str(conf), "--broker-password-file", password], {})


def test_a_config_file_with_secrets_must_be_private(tmp_path):
    conf = tmp_path / "p.toml"
    conf.write_text('register_token = "tok-3"\nbroker_url = "amqp://u:pw@mq//"\n')
    conf.chmod(0o644)

    with pytest.raises(ConfigError, match="holds register_token, a password in broker_url"):
        load(["--config", str(conf)], {})

    conf.chmod(0o600)
    config, _ = load(["--config", str(conf)], {})
    assert (config.register_token, config.broker_connect_url) == ("tok-3", "amqp://u:pw@mq//")
    assert config.secret_files() == [conf]


def test_a_config_file_without_secrets_may_be_readable(ini):
    ini.chmod(0o644)
    config, _ = load(["--config", str(ini)], {})
    assert config.site == "FILE-SITE"


def test_the_payload_environment_never_takes_the_pilot_s_settings():
    config, _ = load(["--payload-env", "X509_CERT_DIR, SITE_NAME"], {})
    assert config.payload_env == ("X509_CERT_DIR", "SITE_NAME")
    with pytest.raises(ConfigError, match="never passed to payloads"):
        load(["--payload-env", "WMS_PILOT_REGISTER_TOKEN_FILE"], {})
    with pytest.raises(ConfigError, match="not an environment variable name"):
        load(["--payload-env", "A=B"], {})


def test_a_root_pilot_needs_a_payload_user():
    config, _ = load([], {})
    with pytest.raises(ConfigError, match="give --payload-user ACCOUNT"):
        check_payload_user(config, 0)
    check_payload_user(config, 1000)  # not root: its own account
    check_payload_user(load(["--payload-user", "nobody"], {})[0], 0)
