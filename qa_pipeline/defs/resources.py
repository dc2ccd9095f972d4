"""Resources: the data directory and the LLM server client (embedded vLLM when no endpoint is set)."""


import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import dagster as dg
from pydantic import PrivateAttr

from qa_pipeline.core import settings as defaults
from qa_pipeline.core.benchmark import EMBEDDED_SERVER_NAME
from qa_pipeline.core.client import ClientConfig, LLMClient
from qa_pipeline.core.layout import DataLayout
from qa_pipeline.core.settings import (
    LLMSettings,
    ModelConfig,
    SettingsError,
    StorageSettings,
    model_config,
    secret_from_environment,
)
from qa_pipeline.core.storage import Storage

API_KEY_ENV = LLMSettings.variable("llm_api_key")


class StorageResource(dg.ConfigurableResource):
    """Where sources and outputs live; defaults to QA_PIPELINE_DATA_DIR (or ./data)."""

    data_dir: str | None = None
    sources_dir: str | None = None

    @property
    def layout(self) -> DataLayout:
        return DataLayout.from_env(self.data_dir, self.sources_dir)

    @property
    def storage(self) -> Storage:
        return Storage(self.layout)


class LLMResource(dg.ConfigurableResource):
    """An async client for an OpenAI-compatible server, opened once per run inside the run's event loop.

    The loaded definitions set endpoint, model and timeouts from the settings (QA_PIPELINE_LLM_BASE_URL,
    comma-separated for replicas, QA_PIPELINE_LLM_MODEL, ...), so the UI shows the values in force;
    the key is read from the variable named by `api_key_env_var` when a run starts and is never part
    of the configuration. With no endpoint, the embedded vLLM server is started (or the running one
    reused); it keeps running for the next runs until `qa-pipeline embedded stop`.
    """

    base_url: str | None = None
    model: str | None = None
    api_key_env_var: str = API_KEY_ENV
    request_timeout_s: defaults.Seconds = defaults.DEFAULT_REQUEST_TIMEOUT_S
    stall_timeout_s: defaults.Seconds = defaults.DEFAULT_STALL_TIMEOUT_S
    outage_timeout_s: defaults.Seconds = defaults.DEFAULT_OUTAGE_TIMEOUT_S
    connect_timeout_s: defaults.Seconds = 10.0
    max_retries: int = 4
    backoff_base_s: float = 0.5
    data_dir: str | None = None
    # Set when the environment's LLM settings are invalid: runs that need the LLM fail with it, while
    # everything else (chunking, the report, the UI) still loads.
    settings_error: str | None = None

    _client: LLMClient | None = PrivateAttr(default=None)

    @classmethod
    def from_settings(cls, settings: LLMSettings, data_dir: str | None = None, judge: bool = False) -> "LLMResource":
        """The generator's client as the settings say (or the judge's, which falls back on the generator's)."""
        base_url, model = settings.llm_base_url, settings.llm_model
        if judge:
            base_url, model = settings.judge_base_url or base_url, settings.judge_model or model
        return cls(
            base_url=base_url,
            model=model,
            request_timeout_s=settings.request_timeout_s,
            stall_timeout_s=settings.stall_timeout_s,
            outage_timeout_s=settings.outage_timeout_s,
            data_dir=data_dir,
        )

    def client_config(self, base_urls: list[str], model: str | None, server_name: str | None = None) -> ClientConfig:
        return ClientConfig(
            base_urls=base_urls,
            model=model,
            server_name=server_name,
            api_key=secret_from_environment(self.api_key_env_var),
            request_timeout_s=self.request_timeout_s,
            connect_timeout_s=self.connect_timeout_s,
            max_retries=self.max_retries,
            backoff_base_s=self.backoff_base_s,
            outage_timeout_s=self.outage_timeout_s,
        )

    @asynccontextmanager
    async def yield_for_execution(self, context: dg.InitResourceContext) -> AsyncIterator["LLMResource"]:
        log = context.log.info if context.log else print
        if self.settings_error:
            raise dg.Failure(self.settings_error)
        base_url, model = self.base_url, self.model
        if base_url is None:
            # A run config that sets some of this resource's fields replaces the ones the code location
            # configured: the settings fill the endpoint in again, rather than starting the embedded server.
            settings = LLMSettings.load()
            base_url, model = settings.llm_base_url, model or settings.llm_model
        server_name = None
        if base_url:
            base_urls = ClientConfig.parse_base_urls(base_url)
        else:
            from qa_pipeline.core.embedded import EmbeddedServer

            # Started once and left running for the next runs (a backfill must not pay the start-up
            # each partition); the CLI stops the one it starts, `qa-pipeline embedded stop` any other.
            layout = DataLayout.from_env(self.data_dir)
            server = await asyncio.to_thread(lambda: EmbeddedServer.for_data_dir(layout, progress=log).start())
            base_urls, model, server_name = [server.base_url], server.model, EMBEDDED_SERVER_NAME
        async with LLMClient(self.client_config(base_urls, model, server_name)) as client:
            await client.resolve_model()
            self._client = client
            yield self

    @property
    def client(self) -> LLMClient:
        if self._client is None:
            raise RuntimeError("LLMResource.client is only available while a run executes")
        return self._client


class ModelsResource(LLMResource):
    """Clients for the named models of QA_PIPELINE_MODELS_FILE, each opened when a run needs it.

    Endpoints default to the generator's (QA_PIPELINE_LLM_BASE_URL); the key, timeouts and retries
    are the generator's. Nothing is opened when the run starts: a run of one model does not reach
    the others' servers, nor start the embedded one.
    """

    @asynccontextmanager
    async def yield_for_execution(self, context: dg.InitResourceContext) -> AsyncIterator["ModelsResource"]:
        yield self

    def named(self, name: str) -> ModelConfig:
        return model_config(DataLayout.from_env(self.data_dir).root, name)

    @asynccontextmanager
    async def client(self, model: ModelConfig) -> AsyncIterator[LLMClient]:
        """A client for one named model, its served name checked against each endpoint's /v1/models."""
        base_url = model.base_url or self.base_url or LLMSettings.load().llm_base_url
        if not base_url:
            raise SettingsError(
                f"model {model.name!r} has no base_url and QA_PIPELINE_LLM_BASE_URL is unset: "
                "give it a base_url in the models file"
            )
        config = self.client_config(ClientConfig.parse_base_urls(base_url), model.model)
        config.model_setting = f"served_name of [models.{model.name}] in the models file"
        async with LLMClient(config) as client:
            await client.resolve_model()
            yield client


@dg.definitions
def resources() -> dg.Definitions:
    """The resources as the environment configures them (read when the code location loads)."""
    layout = DataLayout.from_settings(StorageSettings.load())
    try:
        llm = LLMSettings.load()
        generator = LLMResource.from_settings(llm, data_dir=str(layout.root))
        judge = LLMResource.from_settings(llm, data_dir=str(layout.root), judge=True)
    except SettingsError as error:
        generator = judge = LLMResource(data_dir=str(layout.root), settings_error=str(error))
    models = ModelsResource(**generator.model_dump(exclude_none=True))
    return dg.Definitions(
        resources={
            "llm": generator,
            "judge": judge,
            "models": models,
            "storage": StorageResource(data_dir=str(layout.root), sources_dir=str(layout.sources_dir)),
        }
    )
