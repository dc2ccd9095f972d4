"""Resources: the data directory and the LLM server client (embedded vLLM when no endpoint is set)."""


import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import dagster as dg
from pydantic import PrivateAttr, SecretStr

from qa_pipeline.core.client import (
    DEFAULT_REQUEST_TIMEOUT_S,
    REQUEST_TIMEOUT_ENV,
    ClientConfig,
    LLMClient,
    seconds_from_env,
)
from qa_pipeline.core.layout import DataLayout
from qa_pipeline.core.storage import Storage

BASE_URL_ENV = "QA_PIPELINE_LLM_BASE_URL"
MODEL_ENV = "QA_PIPELINE_LLM_MODEL"
API_KEY_ENV = "QA_PIPELINE_LLM_API_KEY"


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

    Endpoint, model and key come from QA_PIPELINE_LLM_BASE_URL (comma-separated for replicas),
    QA_PIPELINE_LLM_MODEL and the variable named by `api_key_env_var`, unless set here. With no
    endpoint at all, the embedded vLLM server is started (or an already running one reused).
    """

    base_url: str | None = None
    model: str | None = None
    api_key_env_var: str = API_KEY_ENV
    request_timeout_s: float | None = None  # None: $QA_PIPELINE_REQUEST_TIMEOUT_S, else 300
    connect_timeout_s: float = 10.0
    max_retries: int = 4
    backoff_base_s: float = 0.5
    data_dir: str | None = None

    _client: LLMClient | None = PrivateAttr(default=None)

    def client_config(self, base_urls: list[str], model: str | None) -> ClientConfig:
        key = os.environ.get(self.api_key_env_var)
        return ClientConfig(
            base_urls=base_urls,
            model=model,
            api_key=SecretStr(key) if key else None,
            request_timeout_s=(
                self.request_timeout_s
                if self.request_timeout_s is not None
                else seconds_from_env(REQUEST_TIMEOUT_ENV, DEFAULT_REQUEST_TIMEOUT_S)
            ),
            connect_timeout_s=self.connect_timeout_s,
            max_retries=self.max_retries,
            backoff_base_s=self.backoff_base_s,
        )

    @asynccontextmanager
    async def yield_for_execution(self, context: dg.InitResourceContext) -> AsyncIterator["LLMResource"]:
        log = context.log.info if context.log else print
        base_url = self.base_url or os.environ.get(BASE_URL_ENV)
        model = self.model or os.environ.get(MODEL_ENV) or None
        if base_url:
            base_urls = ClientConfig.parse_base_urls(base_url)
        else:
            from qa_pipeline.core.embedded import EmbeddedServer

            # Started once and left running for the next runs (a backfill must not pay the start-up
            # each partition); the CLI stops the one it starts, `qa-pipeline embedded stop` any other.
            layout = DataLayout.from_env(self.data_dir)
            server = await asyncio.to_thread(lambda: EmbeddedServer.for_data_dir(layout, progress=log).start())
            base_urls, model = [server.base_url], server.model
        async with LLMClient(self.client_config(base_urls, model)) as client:
            await client.resolve_model()
            self._client = client
            yield self

    @property
    def client(self) -> LLMClient:
        if self._client is None:
            raise RuntimeError("LLMResource.client is only available while a run executes")
        return self._client


@dg.definitions
def resources() -> dg.Definitions:
    return dg.Definitions(resources={"llm": LLMResource(), "storage": StorageResource()})
