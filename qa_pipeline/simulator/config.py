"""The simulator's options (capacity model, faults) and their command-line form."""

from __future__ import annotations

import argparse
import json
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from qa_pipeline.simulator.content import EvidenceRates

HOST = "127.0.0.1"
DEFAULT_MODEL_NAME = "sim-model"


class FaultKind(StrEnum):
    """What can go wrong with one request."""

    HTTP_500 = "500"
    HTTP_502 = "502"
    HTTP_503 = "503"
    HTTP_429 = "429"
    HANG = "hang"
    RESET = "reset"
    MALFORMED = "malformed"
    MISSING_FIELD = "missing_field"
    TRUNCATE = "truncate"


class FaultConfig(BaseModel):
    """Fault injection; the body of POST /simulator/faults, which replaces it as a whole."""

    model_config = ConfigDict(extra="forbid")

    fault_rate: float = Field(0.0, ge=0.0, le=1.0, description="probability that a request gets a fault")
    fault_kinds: list[FaultKind] = Field(
        default_factory=lambda: list(FaultKind), description="faults to draw from, comma-separated"
    )
    fault_seed: int = Field(0, description="seed of the fault draws, taken in arrival order")
    retry_after_s: int = Field(1, ge=0, description="Retry-After of 429 answers, seconds")
    hang_s: float = Field(600.0, gt=0, description="seconds a hanging request holds its connection before dropping it")
    fail_if_contains: list[str] = Field(
        default_factory=list, description="prompts containing this text get HTTP 500; repeatable"
    )
    api_key: str | None = Field(None, description="if set, /v1 requests need `Authorization: Bearer <key>`")

    @model_validator(mode="after")
    def _kinds_when_faulting(self) -> FaultConfig:
        if self.fault_rate > 0 and not self.fault_kinds:
            raise ValueError("fault_rate > 0 needs at least one fault kind in fault_kinds")
        return self


class ModelProfile(BaseModel):
    """How one served model differs from the server's defaults: its own speed, faults and answer quality.
    Each profiled model decodes on an engine of its own, as a model on its own GPU would."""

    model_config = ConfigDict(extra="forbid")

    max_num_seqs: int | None = Field(None, ge=1)
    step_base_ms: float | None = Field(None, ge=0)
    step_per_seq_ms: float | None = Field(None, ge=0)
    output_tokens_mean: float | None = Field(None, gt=0)
    fault_rate: float | None = Field(None, ge=0.0, le=1.0)
    fault_kinds: list[FaultKind] | None = None
    ungrounded_rate: float | None = Field(None, ge=0.0, le=1.0)


class SimulatorConfig(FaultConfig):
    """Every simulator option; the fault options are inherited so the CLI, this model and
    POST /simulator/faults share one set of names."""

    port: int = Field(0, ge=0, le=65535, description="port on 127.0.0.1; 0 picks a free one")
    served_model_name: list[str] = Field(
        default_factory=lambda: [DEFAULT_MODEL_NAME],
        min_length=1,
        description="model names to serve (vLLM --served-model-name)",
    )
    max_num_seqs: int = Field(64, ge=1, description="sequences decoded together (vLLM --max-num-seqs)")
    step_base_ms: float = Field(10.0, ge=0, description="fixed cost of one decode step, ms")
    step_per_seq_ms: float = Field(0.25, ge=0, description="added cost of one decode step per running sequence, ms")
    zero_latency: bool = Field(False, description="answer at once, without the capacity model")
    output_tokens_mean: float = Field(300.0, gt=0, description="mean output length (lognormal), tokens")
    output_tokens_sigma: float = Field(0.8, ge=0, description="lognormal shape of the output length (its tail)")
    output_tokens_min: int = Field(16, ge=1, description="shortest output, tokens")
    output_tokens_max: int = Field(2048, ge=1, description="longest output, tokens")
    kv_cache_tokens: int = Field(131072, ge=1, description="tokens the KV cache holds across running sequences")
    max_model_len: int = Field(32768, ge=1, description="longest prompt plus max_tokens accepted, tokens")
    evidence_paraphrase_rate: float = Field(
        0.0, ge=0, le=1, description="share of evidence quotes reworded (case, spacing, a word dropped)"
    )
    evidence_invented_rate: float = Field(
        0.0, ge=0, le=1, description="share of evidence quotes made up: sentences the passage does not contain"
    )
    evidence_seed: int = Field(0, description="seed of the draws of each quote's kind")
    ungrounded_rate: float = Field(
        0.0, ge=0.0, le=1.0, description="share of answers made up from text that is not in the passage"
    )
    model_profiles: dict[str, ModelProfile] = Field(
        default_factory=dict,
        description="per served model, its own speed, faults and quality, as JSON: "
        '{"NAME": {"step_base_ms": 20, "fault_rate": 0.1, "ungrounded_rate": 0.5}}; its names are served too',
    )

    @model_validator(mode="after")
    def _output_range(self) -> SimulatorConfig:
        if self.output_tokens_min > self.output_tokens_max:
            raise ValueError(
                f"output_tokens_min ({self.output_tokens_min}) is above output_tokens_max ({self.output_tokens_max})"
            )
        return self

    @model_validator(mode="after")
    def _profiled_models_are_served(self) -> SimulatorConfig:
        missing = [name for name in self.model_profiles if name not in self.served_model_name]
        if missing:
            self.served_model_name = [*self.served_model_name, *missing]
        return self

    def for_model(self, name: str) -> SimulatorConfig:
        """The options one served model works with: the server's, with its profile's on top."""
        profile = self.model_profiles.get(name)
        if profile is None:
            return self
        update = {key: value for key, value in profile.model_dump().items() if value is not None}
        return self.model_copy(update={**update, "model_profiles": {}})

    @property
    def instant(self) -> bool:
        return self.zero_latency or (self.step_base_ms == 0 and self.step_per_seq_ms == 0)

    @property
    def ceiling_output_tokens_per_s(self) -> float | None:
        """Output tokens per second with every slot busy; None when answers are instant."""
        if self.instant:
            return None
        return self.max_num_seqs / ((self.step_base_ms + self.step_per_seq_ms * self.max_num_seqs) / 1000)

    def fault_config(self) -> FaultConfig:
        return FaultConfig.model_validate(self.model_dump(include=set(FaultConfig.model_fields)))

    def evidence(self) -> EvidenceRates:
        return EvidenceRates(self.evidence_paraphrase_rate, self.evidence_invented_rate, self.evidence_seed)

    @model_validator(mode="after")
    def _evidence_rates(self) -> SimulatorConfig:
        if self.evidence_paraphrase_rate + self.evidence_invented_rate > 1:
            raise ValueError(
                f"evidence_paraphrase_rate ({self.evidence_paraphrase_rate}) plus evidence_invented_rate "
                f"({self.evidence_invented_rate}) is above 1"
            )
        return self



def _fault_kinds(text: str) -> list[FaultKind]:
    try:
        return [FaultKind(kind.strip()) for kind in text.split(",") if kind.strip()]
    except ValueError:
        choices = ", ".join(FaultKind)
        raise argparse.ArgumentTypeError(f"unknown fault kind in {text!r}; choose from {choices}") from None


# How options that are not a plain number are given on the command line.
_OPTION_FORMS: dict[str, dict[str, Any]] = {
    "served_model_name": {"action": "extend", "nargs": "+", "metavar": "NAME"},
    "zero_latency": {"action": "store_true"},
    "fault_kinds": {"action": "extend", "type": _fault_kinds, "metavar": "KIND[,KIND...]"},
    "fail_if_contains": {"action": "append", "metavar": "TEXT"},
    "api_key": {"metavar": "KEY"},
    "model_profiles": {"type": json.loads, "metavar": "JSON"},
}


def add_simulator_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one option per SimulatorConfig field (`--max-num-seqs` for max_num_seqs); options not given
    keep the config defaults."""
    server = parser.add_argument_group("simulated server and its capacity model (continuous batching)")
    faults = parser.add_argument_group("fault injection (replaceable at runtime: POST /simulator/faults)")
    for name, info in SimulatorConfig.model_fields.items():
        default = info.get_default(call_default_factory=True)
        shown = ",".join(default) if isinstance(default, list) else default
        (faults if name in FaultConfig.model_fields else server).add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            default=argparse.SUPPRESS,
            help=f"{info.description} (default: {shown})",
            **_OPTION_FORMS.get(name, {"type": info.annotation}),
        )


def config_from_args(args: argparse.Namespace) -> SimulatorConfig:
    """The SimulatorConfig for options parsed by a parser set up with add_simulator_arguments."""
    given = {name: getattr(args, name) for name in SimulatorConfig.model_fields if hasattr(args, name)}
    return SimulatorConfig(**given)


def to_argv(config: SimulatorConfig) -> list[str]:
    """Command-line options that reproduce a config (`--name=value`, so values may start with '-')."""
    argv = []
    for name, value in config.model_dump(mode="json", exclude_defaults=True).items():
        option = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            argv += [option] if value else []
        elif isinstance(value, dict):
            argv.append(f"{option}={json.dumps(value)}")
        elif isinstance(value, list):
            argv += [f"{option}={item}" for item in value]
        elif value is not None:
            argv.append(f"{option}={value}")
    return argv

