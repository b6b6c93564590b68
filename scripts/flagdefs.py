"""Flags the scripts share, declared from the library's own tables: the data sets from
tfsubspace.data.DATASETS, compress()'s options from the fields of CompressionConfig (name,
default, type and help), so that a new option or data set needs no copy here; and the
tf.distribute strategy, which two scripts take."""

import dataclasses
import types
import typing

from absl import app, flags

from tfsubspace.data.datasets import DATASETS

_CHOICES = {"init": ("teacher", "random"), "schedule": ("end_to_end", "stage_wise"), "verbose": ("auto", "0", "1", "2")}


def define_dataset(help_text: str, default: str = "mnist"):
    return flags.DEFINE_enum("dataset", default, list(DATASETS), help_text)


def define_strategy():
    """--strategy, the tf.distribute strategy by name (tfsubspace.train.distribute.STRATEGIES)."""
    return flags.DEFINE_enum(
        "strategy",
        "default",
        ["default", "mirrored", "multi_worker"],
        "tf.distribute strategy: one device, the devices of this host (MirroredStrategy), "
        "or several hosts (MultiWorkerMirroredStrategy from TF_CONFIG; run the same "
        "command on every worker). --batch_size is the global batch.",
    )


def _types(config_class, name: str) -> set:
    hint = typing.get_type_hints(config_class)[name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return set(typing.get_args(hint)) - {type(None)}
    return {hint}


def define_config_flags(config_class, skip=()) -> dict:
    """One flag per field of the dataclass `config_class` (except `skip`): name -> FlagHolder."""
    holders = {}
    for field in dataclasses.fields(config_class):
        if field.name in skip:
            continue
        kinds, default = _types(config_class, field.name), field.default
        help_text = field.metadata.get("help", field.name)
        if field.name in _CHOICES:
            holders[field.name] = flags.DEFINE_enum(field.name, str(default), list(_CHOICES[field.name]), help_text)
        elif kinds == {bool}:
            holders[field.name] = flags.DEFINE_boolean(field.name, default, help_text)
        elif kinds == {int}:
            holders[field.name] = flags.DEFINE_integer(field.name, default, help_text)
        elif float in kinds:
            holders[field.name] = flags.DEFINE_float(field.name, default, help_text)
        else:
            holders[field.name] = flags.DEFINE_string(field.name, default, help_text)
    return holders


def config_from_flags(config_class, holders: dict) -> dict:
    """The flags' values as the config's fields take them (a whole number given to a field that
    also takes an integer, a budget's count, becomes an int when over 1; verbose's digits become
    numbers), checked by the config's validate(): a bad value stops the script as a usage error
    that names the flag."""
    values = {}
    for field in dataclasses.fields(config_class):
        if field.name not in holders:
            continue
        value = holders[field.name].value
        if isinstance(value, float) and int in _types(config_class, field.name) and value > 1 and value.is_integer():
            value = int(value)
        if field.name == "verbose" and value != "auto":
            value = int(value)
        values[field.name] = value
    try:
        config_class(**values).validate()
    except (ValueError, TypeError) as e:
        raise app.UsageError(f"--{e}") from None
    return values
