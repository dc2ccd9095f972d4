# The image of the qa_pipeline code location, used by the Docker and Kubernetes run launchers (deploy/).
# The same image runs the webserver and the daemon in deploy/docker-compose.yaml.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    QA_PIPELINE_DATA_DIR=/data DAGSTER_HOME=/opt/dagster/home

RUN useradd --create-home --uid 10001 qa \
    && mkdir -p /data /opt/dagster/home \
    && chown -R qa /data /opt/dagster/home

WORKDIR /opt/qa_pipeline
COPY pyproject.toml README.md workspace.yaml ./
COPY qa_pipeline ./qa_pipeline
# Runs launched in their own container or pod load the instance there, so the run launchers'
# packages must be importable in this image (same release train as dagster-postgres in pyproject).
ARG RUN_LAUNCHER_PACKAGES="dagster-docker==0.29.27 dagster-k8s==0.29.27"
RUN pip install --no-cache-dir -e . $RUN_LAUNCHER_PACKAGES

USER qa
EXPOSE 4000
# Inside the container the code server must be reachable by the webserver and daemon containers.
CMD ["dagster", "code-server", "start", "-h", "0.0.0.0", "-p", "4000", "-m", "qa_pipeline.definitions"]
