"""The one place that reads qa_pipeline's environment: every setting, its variable, its default, its range.

Settings come in groups, each read when a command or a Dagster load needs it, so a bad value of one
variable does not break commands that do not use it (`qa-pipeline sql` never reads the LLM's
timeout). The CLI's flags and the assets' run config use the same types, so a value is checked the
same way wherever it comes from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "QA_PIPELINE_"

# Types shared by the environment, the CLI and the assets' config: one range per kind of value.
Seconds = Annotated[float, Field(gt=0, description="a number of seconds > 0")]
Fraction = Annotated[float, Field(ge=0, le=1, description="a fraction from 0 to 1")]
PositiveInt = Annotated[int, Field(ge=1, description="a whole number >= 1")]

# Defaults stated once; the settings below, the CLI and the assets' config read them from here.
DEFAULT_DATA_DIR = Path("data")
DEFAULT_MAX_TOKENS = 1024
DEFAULT_TEMPERATURE = 0.0
DEFAULT_REQUEST_TIMEOUT_S = 300.0
DEFAULT_STALL_TIMEOUT_S = 900.0
DEFAULT_OUTAGE_TIMEOUT_S = 120.0
DEFAULT_FAILURE_THRESHOLD = 0.05
DEFAULT_SAMPLE_SIZE = 100
# `qa-pipeline run` reuses a concurrency benchmark of the same model and server this many days old at most.
BENCHMARK_REUSE_DAYS = 7
# Documents per run of `qa_pairs` (and `chunks`): see README, "Runs span documents", for the measurement.
DEFAULT_DOCUMENTS_PER_RUN = 1000
DEFAULT_SOURCES_CRON = "0 * * * *"
DEFAULT_SENSOR_INTERVAL_S = 60
# The question types asked for per chunk, in this order, each with the one line that tells the model
# what it is; the qa_pairs config (`question_types`, `question_type_descriptions`) chooses others.
DEFAULT_QUESTION_TYPE_DESCRIPTIONS: dict[str, str] = {
    "factual": "asks for a specific fact the passage states",
    "conceptual": "asks why or how something works, answered by the passage's explanation",
    "comparison": "contrasts two things the passage mentions",
}


class SettingsError(ValueError):
    """A setting has a value outside its range; the message names the variable (or flag) and what is expected."""


class _Group(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", validate_default=True)

    @classmethod
    def load(cls: type[_T], flags: dict[str, str] | None = None, **overrides: Any) -> _T:
        """Reads the group's variables once; explicit values (CLI flags) win over the environment.

        `flags` names the command-line flag of an overridden field, for error messages.
        """
        given = {name: value for name, value in overrides.items() if value is not None}
        try:
            return cls(**given)
        except ValidationError as error:
            names = {name: (flags or {}).get(name, f"--{name.replace('_', '-')}") for name in given}
            raise SettingsError(describe_error(cls, error, names)) from None

    @classmethod
    def variable(cls, field: str) -> str:
        """The environment variable that sets `field`."""
        alias = cls.model_fields[field].validation_alias
        if isinstance(alias, AliasChoices):
            return str(alias.choices[0])
        return f"{ENV_PREFIX}{field}".upper()


_T = TypeVar("_T", bound=_Group)


def describe_error(group: type[_Group], error: ValidationError, explicit: dict[str, str]) -> str:
    problems, seen = [], set()
    for item in error.errors():
        field = str(item["loc"][0]) if item["loc"] else "?"
        if field in seen:  # a union reports each of its branches: the first says enough
            continue
        seen.add(field)
        expected = ""
        if field in group.model_fields:
            for constraint in group.model_fields[field].metadata:
                expected = getattr(constraint, "description", "") or expected
            expected = expected or group.model_fields[field].description or ""
        source = explicit.get(field) or group.variable(field)
        value = item.get("input")
        problems.append(
            f"{source}={value!r}: {item['msg'].lower()}" + (f" (expected {expected})" if expected else "")
        )
    return "invalid setting: " + "; ".join(problems)


class StorageSettings(_Group):
    """Where the sources and the outputs are."""

    data_dir: Path = Field(DEFAULT_DATA_DIR, description="data root: outputs, journals, Dagster's instance")
    sources_dir: Path | None = Field(None, description="source documents (default: DATA_DIR/sources)")
    dagster_home: Path | None = Field(
        None, validation_alias=AliasChoices("DAGSTER_HOME"), description="Dagster instance (default: DATA_DIR/dagster_home)"
    )
    follow_external_symlinks: bool = Field(
        False, description="read files and folders that symbolic links in the sources folder lead to outside it"
    )

    @field_validator("data_dir", "sources_dir", "dagster_home", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("data_dir", mode="after")
    @classmethod
    def _default_when_empty(cls, value: Path | None) -> Path:
        return value or DEFAULT_DATA_DIR


class LLMSettings(_Group):
    """How to reach the generating (and judging) server."""

    llm_base_url: str | None = Field(None, description="one or more base URLs, comma-separated; unset: embedded vLLM")
    llm_model: str | None = Field(None, description="served model name (default: the first one the server lists)")
    llm_api_key: SecretStr | None = Field(None, description="bearer token, if the server wants one; never logged")
    judge_base_url: str | None = Field(None, description="the judge's server (default: the generator's)")
    judge_model: str | None = Field(None, description="the judge's model (default: the generator's)")
    request_timeout_s: Seconds = DEFAULT_REQUEST_TIMEOUT_S
    stall_timeout_s: Seconds = DEFAULT_STALL_TIMEOUT_S
    outage_timeout_s: Seconds = DEFAULT_OUTAGE_TIMEOUT_S

    @field_validator("llm_base_url", "llm_model", "judge_base_url", "judge_model", "llm_api_key", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if value == "" else value

    @property
    def embedded(self) -> bool:
        """No endpoint configured: the project serves its own small model."""
        return not self.llm_base_url


class ModelsSettings(_Group):
    """Where the named models to compare are configured (see `ModelConfig`)."""

    models_file: Path | None = Field(
        None, description="TOML file of named models to compare (default: DATA_DIR/models.toml, if present)"
    )

    @field_validator("models_file", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if value == "" else value


# A model's name is a Dagster partition key and a folder name: letters, digits, '.', '_', '-'.
MODEL_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class ModelConfig(BaseModel):
    """One named model of a comparison: where it is served, under which name, with which sampling."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=MODEL_NAME, description="the name runs and tables use (a partition key)")
    base_url: str | None = Field(None, description="one or more base URLs, comma-separated (default: QA_PIPELINE_LLM_BASE_URL)")
    served_name: str | None = Field(None, description="the model id the server lists in /v1/models (default: name)")
    temperature: float | None = Field(None, ge=0, description="sampling temperature (default: the run's)")
    max_tokens: PositiveInt | None = Field(None, description="output budget per request (default: the run's)")
    engine: Literal["served", "offline"] = Field(
        "served", description="served: requests to base_url; offline: batch files run by batch_command"
    )
    batch_command: str = Field(
        "vllm run-batch",
        description="offline: run as `COMMAND -i IN -o OUT --model NAME` (no --model added when it names one); "
        "`embedded`: the embedded model through vLLM's batch runner",
    )
    requests_per_file: PositiveInt = Field(
        500, description="offline: requests per batch file; each file's results are kept as soon as it finishes"
    )
    prompt_version: str | None = Field(
        None, description="the prompt version its requests are worded with (default: the current one)"
    )

    @field_validator("prompt_version")
    @classmethod
    def _known_prompt_version(cls, value: str | None) -> str | None:
        # Imported here: prompts reads this module's defaults, so it cannot be imported at the top.
        from qa_pipeline.core.prompts import check_prompt_version

        return None if value is None else check_prompt_version(value)

    @property
    def model(self) -> str:
        return self.served_name or self.name


def model_config(data_dir: Path, name: str) -> ModelConfig:
    """The named model's configuration; an error naming the models file and its models when it has none."""
    models = load_models(data_dir)
    if name not in models:
        where = ModelsSettings.load().models_file or Path(data_dir) / "models.toml"
        known = ", ".join(models) or "none"
        raise SettingsError(
            f"no model named {name!r} in {where} (it names: {known}); add a [models.{name}] table with its base_url"
        )
    return models[name]


def load_models(data_dir: Path, settings: ModelsSettings | None = None) -> dict[str, ModelConfig]:
    """The named models, by name, from QA_PIPELINE_MODELS_FILE (or DATA_DIR/models.toml when it exists).

    The file has one table per model: `[models.NAME]` with `base_url`, `served_name`, `temperature`,
    `max_tokens`, `prompt_version`, and for the offline engine `engine`, `batch_command`, `requests_per_file`. No file: no named model (the run uses QA_PIPELINE_LLM_* as always).
    """
    import tomllib

    settings = settings or ModelsSettings.load()
    path = (settings.models_file or Path(data_dir) / "models.toml").expanduser()
    if settings.models_file is None and not path.exists():
        return {}
    where = f"{path} ({ModelsSettings.variable('models_file')})"
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SettingsError(f"the models file {where} does not exist; create it or unset the variable") from None
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise SettingsError(f"cannot read the models file {where}: {error}") from None
    tables = document.get("models")
    if not isinstance(tables, dict) or not all(isinstance(t, dict) for t in tables.values()):
        raise SettingsError(f"the models file {where} needs one table per model: [models.NAME] with base_url = ...")
    models = {}
    for name, table in tables.items():
        try:
            models[name] = ModelConfig(name=name, **table)
        except ValidationError as error:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or name}: {e['msg'].lower().removeprefix('value error, ')}" for e in error.errors()
            )
            raise SettingsError(f"model {name!r} in {path}: {problems}") from None
    return models


class RunSettings(_Group):
    """How runs are cut and scheduled."""

    documents_per_run: PositiveInt | Literal["all"] = Field(
        DEFAULT_DOCUMENTS_PER_RUN, description="documents per run of chunks and qa_pairs: a number >= 1 or 'all'"
    )
    sources_cron: str = Field(DEFAULT_SOURCES_CRON, description="when the schedule checks the sources folder")
    sources_sensor_interval_s: PositiveInt = DEFAULT_SENSOR_INTERVAL_S

    @field_validator("documents_per_run", mode="before")
    @classmethod
    def _words(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip().lower()
            return value if value == "all" else (int(value) if value.isdigit() else value)
        return value

    @field_validator("sources_cron", mode="after")
    @classmethod
    def _cron(cls, value: str) -> str:
        if len(value.split()) not in (5, 6):
            raise ValueError("a cron expression has 5 fields, e.g. '0 * * * *'")
        return value


def documented_variables() -> list[tuple[str, str, str]]:
    """(variable, default, meaning) of every setting, for README's table and `qa-pipeline settings`."""
    rows = []
    for group in (StorageSettings, LLMSettings, ModelsSettings, RunSettings):
        for name, field in group.model_fields.items():
            description = field.description or next(
                (c.description for c in field.metadata if getattr(c, "description", None)), ""
            )
            default = "" if field.default is None else str(field.default)
            rows.append((group.variable(name), default, description))
    return rows


def secret_from_environment(variable: str) -> SecretStr | None:
    """A secret (an API key) from the variable a resource names; read when a run starts, never stored."""
    import os

    value = os.environ.get(variable)
    return SecretStr(value) if value else None


def use_dagster_home(storage: StorageSettings, data_root: Path) -> Path:
    """The Dagster instance folder ($DAGSTER_HOME, else DATA_DIR/dagster_home), created and exported so
    that Dagster, here and in the processes it starts, records runs where `dagster dev` shows them."""
    import os

    home = (storage.dagster_home or data_root / "dagster_home").expanduser().absolute()
    home.mkdir(parents=True, exist_ok=True)
    os.environ["DAGSTER_HOME"] = str(home)
    return home


def child_environment(extra: dict[str, str], python_path_first: str | None = None) -> dict[str, str]:
    """The environment of a process the project starts (vLLM, a model conversion): this process's, with
    `extra` on top and `python_path_first` ahead of any PYTHONPATH."""
    import os

    env = {**os.environ, **extra}
    if python_path_first:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (python_path_first, os.environ.get("PYTHONPATH")) if p)
    return env
