"""Configuration: gin binds every hyperparameter; params.yaml supplies the values DVC tracks and sweeps.

The library has no gin imports: its config dataclasses are registered here, dynamically, under short
fully qualified names (``sslkd.<name>``). A stage's root configurable has the stage's name, and each
params.yaml section of that name becomes gin bindings of it (``distill: {seeds: [0]}`` ->
``sslkd.distill.seeds = [0]``), applied after the setting's gin file; no gin file binds a key that
params.yaml supplies (tests/test_config_consistency.py). Parsing is strict: an unknown configurable, an
unknown parameter, an unbound one or a value of the wrong type (checked against the config dataclass's
annotations when parsing, before any config is built) is an error.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import types
import typing
from pathlib import Path
from typing import Any

import gin
import yaml

from sslkd.errors import SslkdError

STAGES = (
    "data",
    "teacher",
    "represent",
    "experts",
    "init",
    "distill",
    "krr_st",
    "mtt_ssl",
    "evaluate",
    "transfer",
    "report",
    "variance",
)
# Stages whose students read ``sslkd.student_input`` besides their root config; params.yaml may hold a
# section of that name too (DVC tracks it for these stages).
STUDENT_STAGES = ("experts", "init", "distill", "krr_st", "mtt_ssl", "evaluate", "transfer", "variance")
PARAMS_SECTIONS = STAGES + ("student_input",)


def configurables() -> dict[str, type]:
    """Every registered name -> config class. Stage roots are named after their stage."""
    from sslkd.data.augmentations import AugmentConfig, DSAConfig
    from sslkd.data.datasets import DataConfig, StudentInputConfig
    from sslkd.evaluation.evaluate_config import EvaluateConfig
    from sslkd.evaluation.probe import FineTuneConfig, PretrainConfig, ProbeConfig
    from sslkd.evaluation.transfer import DownstreamConfig, TransferConfig
    from sslkd.infra.launchers import SlurmConfig
    from sslkd.methods.distill import DistillConfig
    from sslkd.methods.experts import ExpertsConfig
    from sslkd.methods.krr_st import KrrStConfig
    from sslkd.methods.mtt_ssl import MttSslConfig
    from sslkd.methods.selection import InitConfig
    from sslkd.methods.teacher import SSLConfig
    from sslkd.methods.variance import VarianceConfig
    from sslkd.models import BNConvNetConfig, ConvNetConfig, ResNetConfig
    from sslkd.stage_configs import ReportConfig, RepresentConfig, TeacherConfig

    return {
        "data": DataConfig,
        "teacher": TeacherConfig,
        "represent": RepresentConfig,
        "experts": ExpertsConfig,
        "init": InitConfig,
        "distill": DistillConfig,
        "krr_st": KrrStConfig,
        "mtt_ssl": MttSslConfig,
        "evaluate": EvaluateConfig,
        "transfer": TransferConfig,
        "report": ReportConfig,
        "variance": VarianceConfig,
        "convnet": ConvNetConfig,
        "resnet": ResNetConfig,
        "bn_convnet": BNConvNetConfig,
        "augment": AugmentConfig,
        "dsa": DSAConfig,
        "ssl": SSLConfig,
        "pretrain": PretrainConfig,
        "probe": ProbeConfig,
        "fine_tune": FineTuneConfig,
        "downstream": DownstreamConfig,
        "student_input": StudentInputConfig,
        "slurm": SlurmConfig,
    }


_registered: dict[str, Any] = {}


def register() -> dict[str, Any]:
    """Register the config classes with gin once; returns name -> configurable callable."""
    if not _registered:
        for name, cls in configurables().items():
            _registered[name] = gin.external_configurable(cls, name=name, module="sslkd")
    return _registered


@dataclasses.dataclass(frozen=True)
class Params:
    """params.yaml: ``setting`` picks gin/settings/<setting>.gin; stage sections give extra bindings."""

    setting: str
    sections: dict[str, dict[str, Any]]

    def bindings(self) -> list[str]:
        return [
            f"sslkd.{section}.{key} = {value!r}"
            for section, items in self.sections.items()
            for key, value in items.items()
        ]


def read_params(path: Path) -> Params:
    if not path.is_file():
        raise SslkdError(f"params file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise SslkdError(f"{path} is not valid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("setting"), str):
        raise SslkdError(f"{path} must be a mapping with a string 'setting' (the gin/settings/<name>.gin to use)")
    sections = {key: value for key, value in raw.items() if key != "setting"}
    for section, items in sections.items():
        if section not in PARAMS_SECTIONS:
            raise SslkdError(
                f"{path}: unknown section {section!r}; sections are stage names or student_input: "
                f"{', '.join(PARAMS_SECTIONS)}"
            )
        if not isinstance(items, dict):
            raise SslkdError(f"{path}: section {section!r} must map parameter names to values")
    return Params(raw["setting"], sections)


def setting_file(config_dir: Path, setting: str) -> Path:
    path = config_dir / "settings" / f"{setting}.gin"
    if not path.is_file():
        available = sorted(p.stem for p in (config_dir / "settings").glob("*.gin"))
        raise SslkdError(f"unknown setting {setting!r}: no {path}; available: {', '.join(available) or 'none'}")
    return path


def _one_line(error: Exception) -> str:
    text = " ".join(str(error).split())
    return re.sub(r"\s*In file .*$", "", text)[:400]


def parse(config_dir: Path, setting: str, gin_files: list[Path], bindings: list[str]) -> None:
    """Clear gin, register the configurables, parse the setting file, extra files and bindings strictly."""
    gin.clear_config()
    register()
    gin.add_config_file_search_path(str(config_dir))
    files = [str(setting_file(config_dir, setting))] + [str(p) for p in gin_files]
    for path in gin_files:
        if not Path(path).is_file():
            raise SslkdError(f"gin file not found: {path}")
    logging.disable(logging.ERROR)  # gin logs every include path it tries before the search path
    try:
        gin.parse_config_files_and_bindings(files, bindings, skip_unknown=False, finalize_config=False)
    except (OSError, ValueError, SyntaxError, KeyError) as error:
        raise SslkdError(f"config error: {_one_line(error)}") from None
    finally:
        logging.disable(logging.NOTSET)
    check_binding_types()


# Scopes bindings may carry besides the global one (``teacher/sslkd.slurm.time_min``: gin/launch/slurm.gin).
BINDING_SCOPES = ("",) + STAGES


def conforms(value: Any, annotation: Any) -> bool:
    """Whether a bound ``value`` has the type a config field is annotated with.

    Strict where Python is lenient: a bool is not an int, a float is not an int (``iterations = 2.5``),
    a number must be finite; an int is a float; a list stands for a tuple (gin and params.yaml write
    lists). References (``@sslkd.convnet()``) and macros are checked where their own values are bound.
    """
    if isinstance(value, gin.config.ConfigurableReference):
        return True
    origin, arguments = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(conforms(value, arm) for arm in arguments)
    if origin is tuple:
        if not isinstance(value, (tuple, list)):
            return False
        if len(arguments) == 2 and arguments[1] is Ellipsis:
            return all(conforms(item, arguments[0]) for item in value)
        return len(value) == len(arguments) and all(map(conforms, value, arguments))
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def _type_name(annotation: Any) -> str:
    return (
        annotation.__name__
        if isinstance(annotation, type) and not typing.get_args(annotation)
        else str(annotation).replace("typing.", "")
    )


def check_binding_types() -> None:
    """Refuse a bound value whose type is not its config field's annotation, in one line.

    Runs on the parsed bindings, before anything is built: a config's ``__post_init__`` range checks
    then always see values of the right type (``iterations = 'abc'`` never reaches ``iterations < 1``).
    """
    for name, cls in configurables().items():
        annotations = typing.get_type_hints(cls)
        for scope in BINDING_SCOPES:
            selector = f"{scope}/sslkd.{name}" if scope else f"sslkd.{name}"
            bindings = gin.get_bindings(selector, resolve_references=False, inherit_scopes=False)
            for parameter, value in bindings.items():
                annotation = annotations.get(parameter)
                if annotation is not None and not conforms(value, annotation):
                    raise SslkdError(
                        f"config error: {selector}.{parameter} must be {_type_name(annotation)}, "
                        f"got {value!r} ({type(value).__name__})"
                    )


def build(name: str) -> Any:
    """Instantiate configurable ``name`` from the parsed bindings; an unbound parameter is an error."""
    try:
        return register()[name]()
    except TypeError as error:
        match = re.search(r"missing \d+ required (?:positional|keyword-only) arguments?: (.*?)(?:\n|$)", str(error))
        missing = match.group(1) if match else _one_line(error)
        raise SslkdError(f"config error: sslkd.{name} needs a binding for {missing}") from None
    except SslkdError as error:  # gin appends "In call to configurable ..." lines
        raise SslkdError(f"config error in sslkd.{name}: {str(error).splitlines()[0]}") from None


def build_stage(stage: str) -> Any:
    """Instantiate the stage's root config and what else it reads, so that the operative config is the
    stage's whole configuration before it runs (what tracking records); returns the root config."""
    root = build(stage)
    if stage in STUDENT_STAGES:
        build("student_input")
    return root


def operative_config() -> str:
    return gin.operative_config_str()


def parsed_config() -> str:
    """Every parsed binding (not only those used so far): the same in every stage of one configuration."""
    return gin.config_str()


def parameter_names(name: str) -> list[str]:
    return [field.name for field in dataclasses.fields(configurables()[name])]
