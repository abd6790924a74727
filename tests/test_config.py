import re

import pytest

from orchestrator.config import (
    ConfigError,
    check_cluster_locations,
    deep_merge,
    load_config,
    parse_config,
    parse_overrides,
)
from orchestrator.config.locations import checkpoint_location

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
        ({"name": "x", "training": {"attack_bn": "train"}}, "training.attack_bn", "'train'"),
        ({"name": "x", "model": {"arch": "vgg"}}, "model.arch", "'vgg'"),
        ({"name": "x", "data": {"dataset": "mnist"}}, "data.dataset", "'mnist'"),
        ({"name": "x", "training": {"members": ["linf", "l3"]}}, "training.members.1", "'l3'"),
        ({"name": "x", "training": {"lr_typo": 1}}, "training.lr_typo", "1"),
        ({"name": "x", "attacks": {"eval": {"l2": {"eps": -1}}}}, "attacks.eval.l2.eps", "-1"),
        ({"training": {}}, "name", "missing"),
        # an lr written for the old SGD default must not silently drive the members' Adam
        ({"name": "x", "training": {"lr": 0.1}}, "training.lr", "without training.optimizer.name"),
    ],
)
def test_invalid_config_names_field_and_value(data, field, value):
    with pytest.raises(ConfigError) as err:
        parse_config(data, "job.yaml")
    message = str(err.value)
    assert message.startswith("job.yaml: ")
    assert f"'{field}'" in message and value in message


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist") as missing:
        load_config(tmp_path / "nope.yaml")
    # the hint names where the installed examples are, and the copy it suggests loads
    example = str(missing.value).rsplit("cp ", 1)[1].removesuffix(" .")
    assert load_config(example).name == "quickstart"
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


SERVER = {"MLFLOW_TRACKING_URI": "http://h:5000"}


@pytest.mark.parametrize(
    ("sections", "env", "refused"),
    [
        ({"storage": {"path": "./psat_runs"}}, SERVER, "storage.path"),
        ({"storage": {"path": "~/runs"}}, SERVER, "storage.path"),
        ({"storage": {"path": "file://runs"}}, SERVER, "storage.path"),
        ({}, {}, "tracking.uri is unset"),
        ({"tracking": {"uri": "sqlite:///mlflow.db"}}, {}, "tracking.uri 'sqlite:///mlflow.db'"),
        ({}, {"MLFLOW_TRACKING_URI": "./mlruns"}, "tracking.uri './mlruns'"),
        ({}, {"MLFLOW_TRACKING_URI": "file:mlruns"}, "tracking.uri 'file:mlruns'"),
        ({"reproduce": {"output": "out"}}, SERVER, "reproduce.output"),
    ],
)  # fmt: skip
def test_cluster_jobs_refuse_locations_in_rays_temporary_dir(sections, env, refused):
    data = {"name": "x", "storage": {"path": "/mnt/psat/runs"}, "reproduce": {"output": "/o"}}
    job = parse_config(deep_merge(data, sections))
    with pytest.raises(ConfigError, match=re.escape(refused)):
        check_cluster_locations(job, "reproduce", env)


@pytest.mark.parametrize(
    ("storage", "uri"),
    [
        ("/mnt/psat/runs", "http://head:5000"),
        ("s3://bucket/psat", "sqlite:////mnt/psat/mlflow.db"),
        ("file:///mnt/psat/runs", "postgresql://u@db/mlflow"),
    ],
)
def test_cluster_jobs_accept_absolute_paths_and_uris(storage, uri):
    job = parse_config({"name": "x", "storage": {"path": storage}, "tracking": {"uri": uri}})
    check_cluster_locations(job, "train", {})
    with pytest.raises(ConfigError, match="reproduce.output"):  # relative by default
        check_cluster_locations(job, "reproduce", {})


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("training.lr", ".inf", "finite number"),
        ("training.lr", ".nan", "finite number"),
        ("attacks.eval.l2.eps", "-.inf", "finite number"),
        ("training.epochs", "true", "not a boolean"),
        ("data.train_size", "false", "not a boolean"),
        ("resources.cpus_per_worker", "true", "not a boolean"),
    ],
)
def test_non_finite_and_boolean_numbers_are_refused(field, value, message):
    with pytest.raises(ConfigError, match=f"field '{re.escape(field)}'.*{message}"):
        load_config(QUICKSTART, parse_overrides([f"{field}={value}"]))


@pytest.mark.parametrize(
    ("sizes", "message"),
    [
        ({"train_size": 100000}, "data.train_size 100000 + data.val_size 100 exceed the 1437"),
        ({"val_size": 1437}, "data.val_size 1437 leaves no training images"),
        ({"eval_size": 361}, "data.eval_size 361 exceeds the 360 images"),
    ],
)
def test_sizes_larger_than_the_dataset_are_refused(sizes, message):
    overrides = parse_overrides([f"data.{k}={v}" for k, v in sizes.items()])
    with pytest.raises(ConfigError, match=re.escape(message)) as error:
        load_config(QUICKSTART, overrides)
    assert "{" not in str(error.value)  # the fields and sizes, not the whole section
    load_config(QUICKSTART, parse_overrides(["data.train_size=1237", "data.eval_size=360"]))


def test_checkpoint_locations():
    # Ray reports checkpoint paths without the storage's scheme
    assert (
        checkpoint_location("bucket/job/linf/ckpt", "s3://bucket/job")
        == "s3://bucket/job/linf/ckpt"
    )
    assert checkpoint_location("gs://b/c", "/local") == "gs://b/c"
    assert checkpoint_location("relative/dir", "/local").startswith("/")
