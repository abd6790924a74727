import pytest

from orchestrator.config import ConfigError, load_config, parse_config, parse_overrides

QUICKSTART = "jobs/configs/quickstart.yaml"


def test_quickstart_config_is_valid_and_merges_attack_defaults():
    job = load_config(QUICKSTART)
    assert job.data.dataset == "digits"
    train = job.attack_configs("train")
    assert set(train) == {"linf", "l2", "l1"}
    assert job.attack_configs("eval")["l1"].steps >= train["l1"].steps


def test_overrides_deep_merge_into_the_file():
    job = load_config(
        QUICKSTART, parse_overrides(["training.epochs=7", "attacks.train.l1.steps=3"])
    )
    assert job.training.epochs == 7
    assert job.attack_configs("train")["l1"].steps == 3
    assert job.model.arch == "resnet10"  # untouched fields stay


@pytest.mark.parametrize(
    ("data", "field", "value"),
    [
        ({"name": "x", "training": {"epochs": 0}}, "training.epochs", "0"),
        ({"name": "x", "model": {"arch": "vgg"}}, "model.arch", "'vgg'"),
        ({"name": "x", "data": {"dataset": "mnist"}}, "data.dataset", "'mnist'"),
        ({"name": "x", "training": {"members": ["linf", "l3"]}}, "training.members.1", "'l3'"),
        ({"name": "x", "training": {"lr_typo": 1}}, "training.lr_typo", "1"),
        ({"name": "x", "attacks": {"eval": {"l2": {"eps": -1}}}}, "attacks.eval.l2.eps", "-1"),
        ({"training": {}}, "name", "missing"),
    ],
)
def test_invalid_config_names_field_and_value(data, field, value):
    with pytest.raises(ConfigError) as err:
        parse_config(data, "job.yaml")
    message = str(err.value)
    assert message.startswith("job.yaml: ")
    assert f"'{field}'" in message and value in message


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(scalar)


def test_set_needs_key_and_value():
    with pytest.raises(ConfigError, match="section.field=value"):
        parse_overrides(["training.epochs"])
